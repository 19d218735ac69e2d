"""parse_replace is exactly as strict as the kernel, for ip_tables and ip6_tables:
every corruption of a valid blob gets the kernel's errno and first error from the
codec and the decoder (codec.parse_replace, then decode.table_from_raw: the
extensions' checks and __do_replace's), and the same errno from the kernel itself
when setsockopt hands it the same bytes (after which the kernel's table is
unchanged). Every case runs for both families on a base table of the same shape."""
import errno
import random
import re
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
from families import FAMILIES, FAMILY_IDS
from test_abi_codec import ENTRY6_PAD_AT, IP6_PAD_AT, Scratch

from bpfilter.abi import codec
from bpfilter.abi import xtables as X
from bpfilter.decode import table_from_raw
from bpfilter.errors import BpfilterError
from bpfilter.model import Family

BASE = {
    Family.IPV4: """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:user - [0:0]
-A INPUT -p tcp --dport 22 -j user
-A INPUT -s 10.0.0.1 -j DROP
-A OUTPUT -p udp -j ACCEPT
-A user -p tcp -j ACCEPT
COMMIT
""",
    Family.IPV6: """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:user - [0:0]
-A INPUT -p tcp --dport 22 -j user
-A INPUT -s 2001:db8::1 -j DROP
-A OUTPUT -p udp -j ACCEPT
-A user -p tcp -j ACCEPT
COMMIT
""",
}
# Entry indices in BASE's blob, either family.
JUMP, COND_DROP, INPUT_POLICY, FORWARD_POLICY, OUT_RULE, OUTPUT_POLICY, USER_HEAD, USER_RULE, USER_RETURN, END = range(10)
INPUT, FORWARD, OUTPUT = X.NF_INET_LOCAL_IN, X.NF_INET_FORWARD, X.NF_INET_LOCAL_OUT


def codec_outcome(blob: bytes, optlen=None, family=Family.IPV4) -> "BpfilterError | None":
    """What the service does with a replace up to the live table, in the kernel's
    order: translate_table (parse_replace), then find_check_entry per entry (the
    extensions, the built-in targets) and __do_replace (both in table_from_raw).
    bpfilter's own refusals (EOPNOTSUPP) come last, once the kernel's checks all
    passed: such a blob is one the kernel accepts."""
    try:
        table_from_raw(codec.parse_replace(blob, optlen, family=family))
    except BpfilterError as err:
        return err
    return None


def kernel_outcome(ns: Scratch, blob: bytes, optlen=None) -> "int | None":
    try:
        ns.set_replace(blob, optlen)
    except BpfilterError as err:
        return err.errno
    return None


# -------------------------------------------------------------- corruptions


class Blob:
    """A mutable copy of the base blob, addressed by entry index and field."""

    def __init__(self, blob: bytes, family: Family):
        self.b = bytearray(blob)
        self.family = family
        self.t = codec.parse_replace(blob, family=family)
        self.layout = self.t.abi
        self.optlen = None

    def off(self, i: int) -> int:
        return X.SIZEOF_IPT_REPLACE + self.t.entries[i].offset

    def put(self, fmt: str, at: int, *values):
        struct.pack_into("<" + fmt, self.b, at, *values)

    def header(self, field: str, value, index: int = 0):
        at = {"valid_hooks": 32, "num_entries": 36, "size": 40, "hook_entry": 44, "underflow": 64, "num_counters": 84}
        self.put("I", at[field] + 4 * index, value)

    def entry(self, i: int, field: str, value):
        """An entry's field, by its name in the family's entry layout ("ip.proto")."""
        at, fmt = self.layout.entry_packed.field(field)
        fmt.pack_into(self.b, self.off(i) + at, value)

    def ip6_padding(self, i: int, value: bytes):
        at = self.off(i) + IP6_PAD_AT
        self.b[at : at + 3] = value

    def entry_padding(self, i: int, value: bytes):
        at = self.off(i) + ENTRY6_PAD_AT
        self.b[at : at + 4] = value

    def target(self, i: int, field: str, value):
        to = self.off(i) + self.t.entries[i].target_offset
        if field == "name":
            self.b[to + 2 : to + 31] = X.name_field(value, 29)
        else:
            fmt, at = {"size": ("H", 0), "revision": ("B", 31), "verdict": ("i", 32)}[field]
            self.put(fmt, to + at, value)

    def match_size(self, i: int, value):
        self.put("H", self.off(i) + self.layout.entry_size, value)

    def e(self, i: int) -> X.RawEntry:
        return self.t.entries[i]


@dataclass
class Case:
    id: str
    mutate: Callable[[Blob], None]
    errno: int
    # a regular expression, or one made from the family's entry size E
    message: "str | Callable[[int], str]"
    entry: "int | None" = None
    shift: int = 0  # how far the corruption moved the entry named in the message
    families: tuple = FAMILIES

    def message_for(self, entry_size: int) -> str:
        return self.message if isinstance(self.message, str) else self.message(entry_size)


def _truncate(b: Blob, keep: int):
    b.optlen = len(b.b)
    del b.b[keep:]


def _shrink_last_entry(b: Blob):
    size = b.e(END).offset + 100
    b.header("size", size)
    del b.b[X.SIZEOF_IPT_REPLACE + size :]


def _errorname_unterminated(b: Blob):
    to = b.off(USER_HEAD) + b.layout.entry_size + 32
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
    Case("next_offset_too_small",
         lambda b: b.entry(FORWARD_POLICY, "next_offset", b.layout.entry_size + 24),
         errno.EINVAL, lambda E: f"next_offset {E + 24} is smaller", FORWARD_POLICY),
    Case("entry_cut_short", _shrink_last_entry, errno.EINVAL, "not enough for an entry", END),
    # the first bit beyond IPT_F_MASK / IP6T_F_MASK, beyond IPT_INV_MASK / IP6T_INV_MASK
    Case("unknown_flag", lambda b: b.entry(COND_DROP, "ip.flags", b.layout.flags_mask + 1),
         errno.EINVAL, "unknown ip flags", COND_DROP),
    Case("unknown_invflag", lambda b: b.entry(COND_DROP, "ip.invflags", b.layout.invflags_mask + 1),
         errno.EINVAL, "unknown ip invflags", COND_DROP),
    Case("unknown_flag_high", lambda b: b.entry(OUT_RULE, "ip.flags", 0x80), errno.EINVAL,
         "unknown ip flags 0x80", OUT_RULE),
    # xt_check_entry_offsets()
    Case("target_inside_entry", lambda b: b.entry(COND_DROP, "target_offset", b.layout.entry_size - 8),
         errno.EINVAL, "points inside", COND_DROP),
    Case("target_header_past_next",
         lambda b: b.entry(COND_DROP, "target_offset", b.layout.entry_size + 16), errno.EINVAL,
         "no room for a target", COND_DROP),
    Case("target_size_tiny", lambda b: b.target(COND_DROP, "size", 16), errno.EINVAL, "target_size 16",
         COND_DROP),
    Case("target_size_past_next", lambda b: b.target(COND_DROP, "size", 48), errno.EINVAL, "runs past next_offset",
         COND_DROP),
    Case("standard_target_next_offset", lambda b: b.target(USER_HEAD, "name", ""), errno.EINVAL,
         lambda E: f"needs next_offset {E + 40}", USER_HEAD),
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
    Case("chain_without_return", lambda b: b.entry(USER_RETURN, "ip.proto", 6), errno.ELOOP,
         "falls through past the last entry", END),
    # unconditional() compares the whole ip6t_ip6, its padding included: junk there
    # makes a policy no policy, and a RETURN a conditional one the chain falls past
    Case("underflow_ip6_padding", lambda b: b.ip6_padding(INPUT_POLICY, b"\0\x01\0"), errno.EINVAL,
         "not an unconditional ACCEPT or DROP", INPUT_POLICY, families=(Family.IPV6,)),
    Case("return_ip6_padding", lambda b: b.ip6_padding(USER_RETURN, b"\0\0\x80"), errno.ELOOP,
         "falls through past the last entry", END, families=(Family.IPV6,)),
    Case("underflow_tos", lambda b: b.entry(OUTPUT_POLICY, "ip.tos", 0x10), errno.EINVAL,
         "not an unconditional ACCEPT or DROP", OUTPUT_POLICY, families=(Family.IPV6,)),
    Case("underflow_proto", lambda b: b.entry(FORWARD_POLICY, "ip.proto", 17), errno.EINVAL,
         "not an unconditional ACCEPT or DROP", FORWARD_POLICY),
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
    ns, blob, _ = base
    t = ns.parse(blob)
    assert [e.target.name for e in t.entries] == ["", "", "", "", "", "", "ERROR", "", "", "ERROR"]
    assert [e.target.verdict for e in t.entries][INPUT_POLICY:OUTPUT_POLICY + 1:2] == [-2, -2]
    assert t.entries[JUMP].target.verdict == t.entries[USER_RULE].offset
    assert t.entries[USER_RETURN].target.verdict == X.XT_RETURN
    assert (t.entries[USER_HEAD].target.errorname, t.entries[END].target.errorname) == ("user", "ERROR")
    assert t.num_entries == 10 and t.num_counters == 10


CORRUPTIONS = [(family, case) for family in FAMILIES for case in CASES if family in case.families]


@pytest.fixture(scope="module")
def bases():
    """The base of each family, made once when a test asks for a family's."""
    made = {}

    def of(family):
        if family not in made:
            ns = Scratch(family)
            made[family] = ns
            ns.restore(BASE[family])
        ns = made[family]
        blob, _, entries = ns.kernel()
        return ns, blob, entries

    yield of
    for ns in made.values():
        ns.delete()


@pytest.fixture(params=FAMILIES, ids=FAMILY_IDS)
def base(request, bases):
    return bases(request.param)


@pytest.mark.parametrize("family,case", CORRUPTIONS,
                         ids=[f"{FAMILY_IDS[FAMILIES.index(f)]}-{c.id}" for f, c in CORRUPTIONS])
def test_corruption(bases, family, case):
    ns, blob, kernel_entries = bases(family)
    b = Blob(blob, family)
    case.mutate(b)
    bad = bytes(b.b)
    err = codec_outcome(bad, b.optlen, family)
    assert err is not None, "the codec accepted it"
    assert (err.errno, err.entry) == (case.errno, case.entry), str(err)
    assert re.search(case.message_for(b.layout.entry_size), str(err)), str(err)
    if case.entry is not None:
        assert f"entry {case.entry}: offset {b.e(case.entry).offset + case.shift}: " in str(err)
    assert kernel_outcome(ns, bad, b.optlen) == case.errno
    assert ns.kernel()[2] == kernel_entries, "the kernel's table changed"
    if b.optlen is None:
        return
    # Without an option length the blob is all the memory there is.
    if len(bad) < b.optlen and case.errno == errno.EFAULT:
        assert codec_outcome(bad, family=family).errno == errno.EFAULT


def test_codec_never_tracebacks_on_cut_blobs(base):
    """Every prefix of a valid blob, taken as all the caller's memory, is an
    EFAULT; with its own length as optlen, an EINVAL."""
    ns, blob, _ = base
    for n in range(0, len(blob), 7):
        assert codec_outcome(blob[:n], family=ns.family).errno == errno.EFAULT
        assert codec_outcome(blob[:n], n, ns.family).errno == errno.EINVAL


def test_codec_never_tracebacks_on_garbage(base):
    """Overwrite each 2-byte field-sized slot of the blob with a few values:
    the codec either accepts or raises BpfilterError, nothing else."""
    ns, blob, _ = base
    for at in range(0, len(blob) - 1, 2):
        for value in (0, 1, 0x8000, 0xFFFF):
            bad = bytearray(blob)
            struct.pack_into("<H", bad, at, value)
            codec_outcome(bytes(bad), family=ns.family)


def _error_name_tail(b: Blob):
    to = b.off(USER_HEAD) + b.layout.entry_size + 32
    b.b[to + 5 : to + 30] = b"z" * 25


def _paddings_everywhere(b: Blob):
    """ip6t_entry's padding on every entry, policies included (unconditional()
    does not read it), ip6t_ip6's on the rules with a condition."""
    for e in b.t.entries:
        b.entry_padding(e.index, bytes([0xE0 + e.index]) * 4)
    for i in (JUMP, COND_DROP, OUT_RULE, USER_RULE):
        b.ip6_padding(i, b"\x5a\xa5\xff")


def _tos(b: Blob):
    """IP6T_F_TOS and a tos: checkentry takes them, ip6_packet_match ignores them."""
    b.entry(COND_DROP, "ip.flags", 0x02)
    b.entry(COND_DROP, "ip.tos", 0xB8)
    b.entry(OUT_RULE, "ip.tos", 0x10)


# (what, mutation, families, bpfilter's own refusal of it or None)
ACCEPTED = [
    ("unchanged", lambda b: None, FAMILIES, None),
    ("name_tail", lambda b: b.b.__setitem__(slice(20, 32), b"junk-after-0"), FAMILIES, None),
    ("queue_verdict", lambda b: b.target(COND_DROP, "verdict", -X.NF_QUEUE - 1), FAMILIES,
     "chain INPUT rule 2 .*QUEUE"),
    ("error_name_tail", _error_name_tail, FAMILIES, None),
    ("ip6_paddings", _paddings_everywhere, (Family.IPV6,), None),
    ("ip6_tos", _tos, (Family.IPV6,), None),
]
ACCEPTED_CASES = [(family, case) for family in FAMILIES for case in ACCEPTED if family in case[2]]


@pytest.mark.parametrize("family,case", ACCEPTED_CASES,
                         ids=[f"{FAMILY_IDS[FAMILIES.index(f)]}-{c[0]}" for f, c in ACCEPTED_CASES])
def test_kernel_and_codec_accept(family, case):
    """What the kernel takes the codec takes (bpfilter may then refuse what it
    cannot do, EOPNOTSUPP), and GET_ENTRIES answers alike, the caller's odd bytes
    included."""
    _, mutate, _, refusal = case
    ns = Scratch(family)
    try:
        ns.restore(BASE[family])
        blob, _, _ = ns.kernel()
        b = Blob(blob, family)
        mutate(b)
        ours = codec_outcome(bytes(b.b), family=family)
        if refusal is None:
            assert ours is None, str(ours)
        else:
            assert ours.errno == errno.EOPNOTSUPP and re.search(refusal, str(ours)), str(ours)
        assert kernel_outcome(ns, bytes(b.b)) is None
        parsed = ns.parse(bytes(b.b))
        _, _, entries = ns.kernel()
        assert codec.entries_as_kernel_returns(parsed, [(0, 0)] * parsed.num_entries) == entries
    finally:
        ns.delete()


# ------------------------------------------------- synthetic tables


def _entry(layout, verdict=None, *, proto=0, error=None) -> X.RawEntry:
    ip = layout.raw_ip(*layout.ip_packed.unpack_from(layout.unconditional_ip))
    ip.proto = proto
    if error is not None:
        target = X.RawTarget("ERROR", 0, 64, X.name_field(error, 32), errorname=error)
    else:
        target = X.RawTarget("", 0, 40, bytes(8), verdict=verdict)
    return X.RawEntry(index=0, offset=0, ip=ip, nfcache=0, target_offset=layout.entry_size,
                      next_offset=layout.entry_size + target.size, comefrom=0, pcnt=0, bcnt=0,
                      matches=[], target=target, raw=b"")


def _table(layout, entries, hooks: "dict[int, tuple[int, int]]", num_counters: int) -> X.RawTable:
    off = 0
    for i, e in enumerate(entries):
        e.index, e.offset = i, off
        off += e.next_offset
    hook_entry = [0] * 5
    underflow = [0] * 5
    for h, (first, policy) in hooks.items():
        hook_entry[h], underflow[h] = entries[first].offset, entries[policy].offset
    return X.RawTable(layout, "filter", 0x0E, hook_entry, underflow, len(entries), off, num_counters, 0, entries)


ACCEPT = -X.NF_ACCEPT - 1


def test_return_falls_off_the_end(base):
    """OUTPUT starts at the last entry, a conditional jump; coming back from
    it there is no next entry (mark_source_chains' "move along one")."""
    ns, _, kernel_entries = base
    L = ns.layout
    entries = [_entry(L, ACCEPT), _entry(L, ACCEPT), _entry(L, ACCEPT), _entry(L, 0, proto=6)]
    table = _table(L, entries, {INPUT: (0, 0), FORWARD: (1, 1), OUTPUT: (3, 2)}, 10)
    # Offset 0 is no jump target (verdict 0 is refused): jump to FORWARD's policy.
    entries[3].target.verdict = entries[1].offset
    blob = codec.build_replace(table)
    err = codec_outcome(blob, family=ns.family)
    assert (err.errno, err.entry) == (errno.ELOOP, 3) and "returning from a jump falls off the end" in str(err)
    assert kernel_outcome(ns, blob) == errno.ELOOP
    assert ns.kernel()[2] == kernel_entries


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_synthetic_comefrom_matches_kernel(family):
    """A table iptables would not write: hooks sharing a chain, a chain
    reached twice, a QUEUE policy-less rule; comefrom must still be the
    kernel's."""
    ns = Scratch(family)
    try:
        _, info, first = ns.kernel()
        n = codec.parse_getinfo(info)["num_entries"]
        L = ns.layout
        entries = [
            _entry(L, 0, proto=6),   # 0 INPUT: jump to the shared chain
            _entry(L, ACCEPT),       # 1 INPUT policy
            _entry(L, 0, proto=17),  # 2 FORWARD: jump to the shared chain
            _entry(L, ACCEPT),       # 3 FORWARD policy
            _entry(L, ACCEPT),       # 4 OUTPUT policy
            _entry(L, error="shared"),
            _entry(L, -X.NF_QUEUE - 1, proto=1),
            _entry(L, X.XT_RETURN),
            _entry(L, error="ERROR"),
        ]
        table = _table(L, entries, {INPUT: (0, 1), FORWARD: (2, 3), OUTPUT: (4, 4)}, n)
        for i in (0, 2):
            entries[i].target.verdict = entries[6].offset
        blob = codec.build_replace(table)
        parsed = ns.parse(blob)   # translate_table's part: bpfilter refuses QUEUE later
        assert kernel_outcome(ns, blob) is None
        _, _, kentries = ns.kernel()
        assert codec.entries_as_kernel_returns(parsed, [(0, 0)] * len(entries)) == kentries
        assert [e.hook_mask for e in parsed.entries] == [2, 2, 4, 4, 8, 0, 6, 6, 0]
        assert first != kentries
    finally:
        ns.delete()


# num_counters: its EAGAIN compares it with the table in place, which the kernel's
# table and the decoder's (none) are not the same one of.
NUM_COUNTERS_BYTES = set(range(84, 88))


def test_random_corruptions_differential(base):
    """Seeded random byte/field corruptions of the base blob, the extensions' bytes
    included: the codec and decoder agree with the kernel on every one. bpfilter's
    own refusal (EOPNOTSUPP, after every check of the kernel's) must be of a blob the
    kernel accepts."""
    ns, blob, kernel_entries = base
    rnd = random.Random(20261123 + ns.family)
    tried = 0
    outcomes = {}
    while tried < 1000:
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
                e = ns.layout.entry_size
                value = rnd.choice((0, 8, e + 40, 2 * (e + 40), 3 * (e + 40), 0xFFFFFFFF, 0xFFFFFFFE,
                                    0xFFFFFFFB, rnd.randrange(2000)))
                struct.pack_into("<I", bad, at, value)
                touched.update(range(at, at + 4))
        if touched & NUM_COUNTERS_BYTES:
            continue
        tried += 1
        bad = bytes(bad)
        ours = codec_outcome(bad, len(bad), ns.family)
        theirs = kernel_outcome(ns, bad)
        if ours is not None and ours.errno == errno.EOPNOTSUPP:
            assert theirs is None, (str(ours), theirs, sorted(touched))
        else:
            assert (ours.errno if ours else None) == theirs, (str(ours), theirs, sorted(touched))
        outcomes[theirs] = outcomes.get(theirs, 0) + 1
        if theirs is None:
            assert kernel_outcome(ns, blob) is None
    assert ns.kernel()[2] == kernel_entries
    # the corruptions reached every kind of check
    assert {None, errno.EINVAL, errno.ELOOP, errno.ENOENT} <= outcomes.keys(), outcomes
