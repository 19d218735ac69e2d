"""parse_replace is exactly as strict as the kernel: every corruption of a
valid blob gets the kernel's errno from the codec, and the same errno from
the kernel itself when setsockopt hands it the same bytes (after which the
kernel's table is unchanged)."""
import errno
import re
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
from test_abi_codec import Scratch

from bpfilter import netns
from bpfilter.abi import codec, sockopt
from bpfilter.abi import ipv4
from bpfilter.abi import xtables as X
from bpfilter.errors import BpfilterError

BASE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:user - [0:0]
-A INPUT -p tcp --dport 22 -j user
-A INPUT -s 10.0.0.1 -j DROP
-A OUTPUT -p udp -j ACCEPT
-A user -p tcp -j ACCEPT
COMMIT
"""
# Entry indices in BASE's blob.
JUMP, COND_DROP, INPUT_POLICY, FORWARD_POLICY, OUT_RULE, OUTPUT_POLICY, USER_HEAD, USER_RULE, USER_RETURN, END = range(10)
INPUT, FORWARD, OUTPUT = X.NF_INET_LOCAL_IN, X.NF_INET_FORWARD, X.NF_INET_LOCAL_OUT


@pytest.fixture(scope="module")
def base():
    ns = Scratch()
    try:
        ns.restore(BASE)
        blob, _, entries = ns.kernel()
        yield ns, blob, entries
    finally:
        ns.delete()


def codec_outcome(blob: bytes, optlen=None) -> "BpfilterError | None":
    """The kernel's order: translate_table, find_check_entry (only the
    built-in targets here), then __do_replace."""
    try:
        table = codec.parse_replace(blob, optlen)
        for e in table.entries:
            if e.target.name in (X.XT_STANDARD_TARGET, X.XT_ERROR_TARGET):
                codec.check_builtin_target(e)
        codec.check_do_replace(table)
    except BpfilterError as err:
        return err
    return None


def kernel_outcome(ns: Scratch, blob: bytes, optlen=None) -> "int | None":
    try:
        with netns.entered(ns.name):
            sockopt.set_replace(blob, optlen)
    except BpfilterError as err:
        return err.errno
    return None


# -------------------------------------------------------------- corruptions


class Blob:
    """A mutable copy of the base blob, addressed by entry index and field."""

    def __init__(self, blob: bytes):
        self.b = bytearray(blob)
        self.t = codec.parse_replace(blob)
        self.optlen = None

    def off(self, i: int) -> int:
        return X.SIZEOF_IPT_REPLACE + self.t.entries[i].offset

    def put(self, fmt: str, at: int, *values):
        struct.pack_into("<" + fmt, self.b, at, *values)

    def header(self, field: str, value, index: int = 0):
        at = {"valid_hooks": 32, "num_entries": 36, "size": 40, "hook_entry": 44, "underflow": 64, "num_counters": 84}
        self.put("I", at[field] + 4 * index, value)

    def entry(self, i: int, field: str, value):
        fmt, at = {"proto": ("H", 80), "flags": ("B", 82), "invflags": ("B", 83), "target_offset": ("H", 88),
                   "next_offset": ("H", 90)}[field]
        self.put(fmt, self.off(i) + at, value)

    def target(self, i: int, field: str, value):
        to = self.off(i) + self.t.entries[i].target_offset
        if field == "name":
            self.b[to + 2 : to + 31] = X.name_field(value, 29)
        else:
            fmt, at = {"size": ("H", 0), "revision": ("B", 31), "verdict": ("i", 32)}[field]
            self.put(fmt, to + at, value)

    def match_size(self, i: int, value):
        self.put("H", self.off(i) + ipv4.SIZEOF_IPT_ENTRY, value)

    def e(self, i: int) -> X.RawEntry:
        return self.t.entries[i]


@dataclass
class Case:
    id: str
    mutate: Callable[[Blob], None]
    errno: int
    message: str
    entry: "int | None" = None
    shift: int = 0  # how far the corruption moved the entry named in the message


def _truncate(b: Blob, keep: int):
    b.optlen = len(b.b)
    del b.b[keep:]


def _shrink_last_entry(b: Blob):
    size = b.e(END).offset + 100
    b.header("size", size)
    del b.b[X.SIZEOF_IPT_REPLACE + size :]


def _errorname_unterminated(b: Blob):
    to = b.off(USER_HEAD) + ipv4.SIZEOF_IPT_ENTRY + 32
    b.b[to : to + 30] = b"A" * 30


def _huge_size(b: Blob):
    size = X.XT_MAX_TABLE_SIZE - X.SIZEOF_XT_TABLE_INFO
    b.header("size", size)
    b.optlen = X.SIZEOF_IPT_REPLACE + size


def _swap(b: Blob, field: str, h1: int, h2: int):
    v = getattr(b.t, field)
    b.header(field, v[h2], h1)
    b.header(field, v[h1], h2)


CASES = [
    # do_replace() header checks
    Case("num_counters_zero", lambda b: b.header("num_counters", 0), errno.EINVAL, "num_counters is 0"),
    Case("num_counters_overflow", lambda b: b.header("num_counters", X.INT_MAX // 16), errno.ENOMEM, "num_counters"),
    Case("optlen_below_header", lambda b: setattr(b, "optlen", 95), errno.EINVAL, "shorter than struct ipt_replace"),
    Case("optlen_below_size", lambda b: setattr(b, "optlen", len(b.b) - 1), errno.EINVAL, "option length"),
    Case("entries_unreadable", lambda b: _truncate(b, len(b.b) - 8), errno.EFAULT, "would fault"),
    Case("header_unreadable", lambda b: _truncate(b, 60), errno.EFAULT, "would fault"),
    Case("size_too_large", _huge_size, errno.ENOMEM, "table size"),
    Case("size_zero", lambda b: b.header("size", 0), errno.EINVAL, "hold 0 entries"),
    Case("num_entries_plus_one", lambda b: b.header("num_entries", 11), errno.EINVAL, "num_entries is 11"),
    Case("num_entries_minus_one", lambda b: b.header("num_entries", 9), errno.EINVAL, "num_entries is 9"),
    Case("num_entries_huge", lambda b: b.header("num_entries", 2**27 + 1), errno.ENOMEM, "num_entries"),
    # check_entry_size_and_hooks()
    Case("entry_misaligned", lambda b: b.entry(USER_HEAD, "next_offset", b.e(USER_HEAD).next_offset + 4),
         errno.EINVAL, "not 8-byte aligned", USER_RULE, shift=4),
    Case("next_offset_past_end", lambda b: b.entry(END, "next_offset", b.e(END).next_offset + 8),
         errno.EINVAL, "past the end of the table", END),
    Case("next_offset_too_small", lambda b: b.entry(FORWARD_POLICY, "next_offset", 136),
         errno.EINVAL, "next_offset 136 is smaller", FORWARD_POLICY),
    Case("entry_cut_short", _shrink_last_entry, errno.EINVAL, "not enough for an entry", END),
    Case("unknown_flag", lambda b: b.entry(COND_DROP, "flags", 0x04), errno.EINVAL, "unknown ip flags", COND_DROP),
    Case("unknown_invflag", lambda b: b.entry(COND_DROP, "invflags", 0x80), errno.EINVAL, "unknown ip invflags",
         COND_DROP),
    # xt_check_entry_offsets()
    Case("target_inside_entry", lambda b: b.entry(COND_DROP, "target_offset", 104), errno.EINVAL,
         "points inside", COND_DROP),
    Case("target_header_past_next", lambda b: b.entry(COND_DROP, "target_offset", 128), errno.EINVAL,
         "no room for a target", COND_DROP),
    Case("target_size_tiny", lambda b: b.target(COND_DROP, "size", 16), errno.EINVAL, "target_size 16",
         COND_DROP),
    Case("target_size_past_next", lambda b: b.target(COND_DROP, "size", 48), errno.EINVAL, "runs past next_offset",
         COND_DROP),
    Case("standard_target_next_offset", lambda b: b.target(USER_HEAD, "name", ""), errno.EINVAL,
         "needs next_offset 152", USER_HEAD),
    Case("verdict_stolen", lambda b: b.target(COND_DROP, "verdict", -3), errno.EINVAL, "verdict -3", COND_DROP),
    Case("verdict_zero", lambda b: b.target(COND_DROP, "verdict", 0), errno.EINVAL, "verdict 0", COND_DROP),
    Case("verdict_below_return", lambda b: b.target(COND_DROP, "verdict", -6), errno.EINVAL, "verdict -6",
         COND_DROP),
    Case("error_target_size", lambda b: b.target(USER_HEAD, "size", 56), errno.EINVAL, "ERROR target size 56",
         USER_HEAD),
    Case("error_name_unterminated", _errorname_unterminated, errno.EINVAL, "not NUL-terminated", USER_HEAD),
    # xt_check_entry_match()
    Case("match_size_tiny", lambda b: b.match_size(JUMP, 16), errno.EINVAL, "match_size 16", JUMP),
    Case("match_past_target", lambda b: b.match_size(JUMP, b.e(JUMP).matches[0].size + 8), errno.EINVAL,
         "runs past target_offset", JUMP),
    Case("match_leaves_misaligned", lambda b: b.match_size(JUMP, b.e(JUMP).matches[0].size - 4), errno.EINVAL,
         "not 8-byte aligned", JUMP),
    Case("match_leaves_scrap", lambda b: b.match_size(JUMP, b.e(JUMP).matches[0].size - 8), errno.EINVAL,
         "less than a match header", JUMP),
    # check_underflow()
    Case("underflow_conditional", lambda b: b.header("underflow", b.e(COND_DROP).offset, INPUT), errno.EINVAL,
         "underflow", COND_DROP),
    Case("underflow_return", lambda b: b.target(INPUT_POLICY, "verdict", X.XT_RETURN), errno.EINVAL,
         "not an unconditional ACCEPT or DROP", INPUT_POLICY),
    Case("underflow_queue", lambda b: b.target(INPUT_POLICY, "verdict", -X.NF_QUEUE - 1), errno.EINVAL,
         "not an unconditional ACCEPT or DROP", INPUT_POLICY),
    Case("underflow_error_target", lambda b: b.header("underflow", b.e(USER_HEAD).offset, OUTPUT), errno.EINVAL,
         "underflow", USER_HEAD),
    # xt_check_table_hooks()
    Case("hook_entry_mid_entry", lambda b: b.header("hook_entry", 8, INPUT), errno.EINVAL,
         "hook INPUT: hook_entry does not point"),
    Case("underflow_mid_entry", lambda b: b.header("underflow", b.e(FORWARD_POLICY).offset + 8, FORWARD),
         errno.EINVAL, "hook FORWARD: underflow does not point"),
    Case("hook_entry_unsorted", lambda b: _swap(b, "hook_entry", FORWARD, OUTPUT), errno.EINVAL,
         "hook OUTPUT: hook_entry .* is below"),
    Case("hook_entry_duplicate", lambda b: b.header("hook_entry", b.t.hook_entry[FORWARD], OUTPUT), errno.EINVAL,
         "hook OUTPUT: hook_entry .* duplicates"),
    Case("underflow_unsorted", lambda b: _swap(b, "underflow", INPUT, FORWARD), errno.EINVAL,
         "hook FORWARD: underflow .* is below"),
    Case("underflow_duplicate", lambda b: b.header("underflow", b.t.underflow[FORWARD], OUTPUT), errno.EINVAL,
         "hook OUTPUT: underflow .* duplicates"),
    Case("hook_without_entry", lambda b: b.header("valid_hooks", 0x0F), errno.EINVAL,
         "hook PREROUTING: hook_entry does not point"),
    # mark_source_chains()
    Case("jump_to_self", lambda b: b.target(USER_RULE, "verdict", b.e(USER_RULE).offset), errno.ELOOP,
         "rule loop", USER_RULE),
    Case("jump_to_own_chain_head", lambda b: b.target(USER_RULE, "verdict", b.e(USER_HEAD).offset), errno.ELOOP,
         "rule loop", USER_RULE),
    Case("jump_mid_entry", lambda b: b.target(JUMP, "verdict", b.e(USER_RULE).offset + 8), errno.ELOOP,
         "not the start of an entry", JUMP),
    Case("jump_past_table", lambda b: b.target(JUMP, "verdict", b.t.size + 1000), errno.ELOOP,
         "not the start of an entry", JUMP),
    Case("jump_to_final_error", lambda b: b.target(JUMP, "verdict", b.e(END).offset), errno.ELOOP,
         "falls through past the last entry", END),
    Case("chain_without_return", lambda b: b.entry(USER_RETURN, "proto", 6), errno.ELOOP,
         "falls through past the last entry", END),
    # find_check_entry() for ip_tables' own targets
    Case("standard_target_short", lambda b: b.target(COND_DROP, "size", 32), errno.EINVAL,
         "standard target size 32", COND_DROP),
    Case("standard_target_revision", lambda b: b.target(COND_DROP, "revision", 1), errno.ENOENT,
         "no revision 1", COND_DROP),
    Case("error_target_revision", lambda b: b.target(USER_HEAD, "revision", 1), errno.ENOENT,
         "no revision 1", USER_HEAD),
    # __do_replace()
    Case("counters_too_many", lambda b: b.header("num_counters", 2**25 + 1), errno.ENOMEM, "num_counters"),
    Case("unknown_table", lambda b: b.b.__setitem__(slice(0, 6), b"nosuch"), errno.ENOENT, "no table named"),
    Case("valid_hooks_beyond_hooks", lambda b: b.header("valid_hooks", 0x2E), errno.EINVAL, "valid_hooks 0x2e"),
]


def test_base_layout(base):
    _, blob, _ = base
    t = codec.parse_replace(blob)
    assert [e.target.name for e in t.entries] == ["", "", "", "", "", "", "ERROR", "", "", "ERROR"]
    assert [e.target.verdict for e in t.entries][INPUT_POLICY:OUTPUT_POLICY + 1:2] == [-2, -2]
    assert t.entries[JUMP].target.verdict == t.entries[USER_RULE].offset
    assert t.entries[USER_RETURN].target.verdict == X.XT_RETURN
    assert (t.entries[USER_HEAD].target.errorname, t.entries[END].target.errorname) == ("user", "ERROR")
    assert t.num_entries == 10 and t.num_counters == 10


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corruption(base, case):
    ns, blob, kernel_entries = base
    b = Blob(blob)
    case.mutate(b)
    bad = bytes(b.b)
    err = codec_outcome(bad, b.optlen)
    assert err is not None, "the codec accepted it"
    assert (err.errno, err.entry) == (case.errno, case.entry), str(err)
    assert re.search(case.message, str(err)), str(err)
    if case.entry is not None:
        assert f"entry {case.entry}: offset {b.e(case.entry).offset + case.shift}: " in str(err)
    assert kernel_outcome(ns, bad, b.optlen) == case.errno
    assert ns.kernel()[2] == kernel_entries, "the kernel's table changed"
    if b.optlen is None:
        return
    # Without an option length the blob is all the memory there is.
    if len(bad) < b.optlen and case.errno == errno.EFAULT:
        assert codec_outcome(bad).errno == errno.EFAULT


def test_codec_never_tracebacks_on_cut_blobs(base):
    """Every prefix of a valid blob, taken as all the caller's memory, is an
    EFAULT; with its own length as optlen, an EINVAL."""
    _, blob, _ = base
    for n in range(0, len(blob), 7):
        assert codec_outcome(blob[:n]).errno == errno.EFAULT
        assert codec_outcome(blob[:n], n).errno == errno.EINVAL


def test_codec_never_tracebacks_on_garbage(base):
    """Overwrite each 2-byte field-sized slot of the blob with a few values:
    the codec either accepts or raises BpfilterError, nothing else."""
    _, blob, _ = base
    for at in range(0, len(blob) - 1, 2):
        for value in (0, 1, 0x8000, 0xFFFF):
            bad = bytearray(blob)
            struct.pack_into("<H", bad, at, value)
            codec_outcome(bytes(bad))


@pytest.mark.parametrize("what", ["unchanged", "name_tail", "queue_verdict", "error_name_tail"])
def test_kernel_and_codec_accept(what):
    ns = Scratch()
    try:
        ns.restore(BASE)
        blob, _, _ = ns.kernel()
        b = Blob(blob)
        if what == "name_tail":
            b.b[20:32] = b"junk-after-0"
        elif what == "queue_verdict":
            b.target(COND_DROP, "verdict", -X.NF_QUEUE - 1)
        elif what == "error_name_tail":
            to = b.off(USER_HEAD) + ipv4.SIZEOF_IPT_ENTRY + 32
            b.b[to + 5 : to + 30] = b"z" * 25
        assert codec_outcome(bytes(b.b)) is None
        assert kernel_outcome(ns, bytes(b.b)) is None
        parsed = codec.parse_replace(bytes(b.b))
        _, _, entries = ns.kernel()
        assert codec.entries_as_kernel_returns(parsed, [(0, 0)] * parsed.num_entries) == entries
    finally:
        ns.delete()


# ------------------------------------------------- synthetic tables


def _entry(verdict=None, *, proto=0, error=None) -> X.RawEntry:
    ip = ipv4.RawIp(bytes(4), bytes(4), bytes(4), bytes(4), bytes(16), bytes(16), bytes(16), bytes(16), proto, 0, 0)
    if error is not None:
        target = X.RawTarget("ERROR", 0, 64, X.name_field(error, 32), errorname=error)
    else:
        target = X.RawTarget("", 0, 40, bytes(8), verdict=verdict)
    return X.RawEntry(index=0, offset=0, ip=ip, nfcache=0, target_offset=112, next_offset=112 + target.size,
                      comefrom=0, pcnt=0, bcnt=0, matches=[], target=target, raw=b"")


def _table(entries, hooks: "dict[int, tuple[int, int]]", num_counters: int) -> X.RawTable:
    off = 0
    for i, e in enumerate(entries):
        e.index, e.offset = i, off
        off += e.next_offset
    hook_entry = [0] * 5
    underflow = [0] * 5
    for h, (first, policy) in hooks.items():
        hook_entry[h], underflow[h] = entries[first].offset, entries[policy].offset
    return X.RawTable(ipv4.IPV4, "filter", 0x0E, hook_entry, underflow, len(entries), off, num_counters, 0, entries)


ACCEPT = -X.NF_ACCEPT - 1


def test_return_falls_off_the_end(base):
    """OUTPUT starts at the last entry, a conditional jump; coming back from
    it there is no next entry (mark_source_chains' "move along one")."""
    ns, _, kernel_entries = base
    entries = [_entry(ACCEPT), _entry(ACCEPT), _entry(ACCEPT), _entry(0, proto=6)]
    table = _table(entries, {INPUT: (0, 0), FORWARD: (1, 1), OUTPUT: (3, 2)}, 10)
    # Offset 0 is no jump target (verdict 0 is refused): jump to FORWARD's policy.
    entries[3].target.verdict = entries[1].offset
    blob = codec.build_replace(table)
    err = codec_outcome(blob)
    assert (err.errno, err.entry) == (errno.ELOOP, 3) and "returning from a jump falls off the end" in str(err)
    assert kernel_outcome(ns, blob) == errno.ELOOP
    assert ns.kernel()[2] == kernel_entries


def test_synthetic_comefrom_matches_kernel():
    """A table iptables would not write: hooks sharing a chain, a chain
    reached twice, a QUEUE policy-less rule; comefrom must still be the
    kernel's."""
    ns = Scratch()
    try:
        _, _, first = ns.kernel()
        n = codec.parse_getinfo(_info(ns))["num_entries"]
        entries = [
            _entry(0, proto=6),   # 0 INPUT: jump to the shared chain
            _entry(ACCEPT),       # 1 INPUT policy
            _entry(0, proto=17),  # 2 FORWARD: jump to the shared chain
            _entry(ACCEPT),       # 3 FORWARD policy
            _entry(ACCEPT),       # 4 OUTPUT policy
            _entry(error="shared"),
            _entry(-X.NF_QUEUE - 1, proto=1),
            _entry(X.XT_RETURN),
            _entry(error="ERROR"),
        ]
        table = _table(entries, {INPUT: (0, 1), FORWARD: (2, 3), OUTPUT: (4, 4)}, n)
        for i in (0, 2):
            entries[i].target.verdict = entries[6].offset
        blob = codec.build_replace(table)
        assert codec_outcome(blob) is None
        assert kernel_outcome(ns, blob) is None
        parsed = codec.parse_replace(blob)
        _, _, kentries = ns.kernel()
        assert codec.entries_as_kernel_returns(parsed, [(0, 0)] * len(entries)) == kentries
        assert [e.hook_mask for e in parsed.entries] == [2, 2, 4, 4, 8, 0, 6, 6, 0]
        assert first != kentries
    finally:
        ns.delete()


def _info(ns: Scratch) -> bytes:
    with netns.entered(ns.name):
        return sockopt.get_info("filter")


def test_random_corruptions_differential(base):
    """Seeded random byte/field corruptions of the base blob: the codec and
    the kernel agree on every one.  Bytes only the extension layer or the live
    table judge are left alone: match payloads, target names and revisions,
    proto and invflags (tcp/udp insist on them), num_counters (EAGAIN)."""
    import random

    ns, blob, kernel_entries = base
    t = codec.parse_replace(blob)
    judged_elsewhere = set(range(84, 88))
    for e in t.entries:
        at = X.SIZEOF_IPT_REPLACE + e.offset
        judged_elsewhere.update((at + 80, at + 81, at + 83))
        pos = at + ipv4.SIZEOF_IPT_ENTRY
        for m in e.matches:
            judged_elsewhere.update(range(pos + 2, pos + m.size))
            pos += m.size
        judged_elsewhere.update(range(at + e.target_offset + 2, at + e.target_offset + 32))
    rnd = random.Random(20261123)
    tried = 0
    while tried < 400:
        bad = bytearray(blob)
        touched = set()
        for _ in range(rnd.choice((1, 1, 2, 3))):
            at = rnd.randrange(len(bad) - 4)
            kind = rnd.random()
            if kind < 0.4:
                bad[at] = rnd.randrange(256)
                touched.add(at)
            elif kind < 0.7:
                old = struct.unpack_from("<H", bad, at)[0]
                struct.pack_into("<H", bad, at, (old + rnd.choice((-8, -4, -1, 1, 4, 8, 16, 32))) & 0xFFFF)
                touched.update((at, at + 1))
            else:
                value = rnd.choice((0, 8, 152, 304, 456, 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFB, rnd.randrange(2000)))
                struct.pack_into("<I", bad, at, value)
                touched.update(range(at, at + 4))
        if touched & judged_elsewhere:
            continue
        tried += 1
        bad = bytes(bad)
        ours = codec_outcome(bad, len(bad))
        theirs = kernel_outcome(ns, bad)
        assert (ours.errno if ours else None) == theirs, (str(ours), theirs, sorted(touched))
        if theirs is None:
            assert kernel_outcome(ns, blob) is None
    assert ns.kernel()[2] == kernel_entries
