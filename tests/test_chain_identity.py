"""Chains are what the kernel says they are: places in the blob, not names.

The kernel accepts a blob whose user chains share a name, or where a user chain is
named like a built-in one (ERROR entries only label a chain for iptables), and runs
every jump to the entry it names; and it checks only the jumps a hook reaches
(mark_source_chains), so an entry none reaches may jump anywhere, even into itself's
chain or to no entry at all. Each blob here is given to the kernel's ip_tables and to
bpfilter: the same verdicts and counters for packets out of OUTPUT, or the same errno.
"""
from __future__ import annotations

import errno

import pytest

from bpfilter.abi import codec, sockopt
from bpfilter.abi.xtables import SIZEOF_IPT_REPLACE, SIZEOF_XT_ENTRY_HEADER, ipt_replace
from bpfilter.errors import BpfilterError
from bpfilter.loader import load_filter_table
from bpfilter.model import Family
from bpfilter.netns import entered
from bpfilter_lab.packets import Packet
from bpfilter_lab.scratch import replace_blob
from verdicts import OUT, kernel_send, ruleset, verdict_name

pytestmark = pytest.mark.kernel

A, B = "10.1.2.3", "192.168.7.8"
UDP = Packet(A, B, "udp", sport=40000, dport=53)
TCP = Packet(A, B, "tcp", sport=40000, dport=80, tcp_flags=0x02)
ICMP = Packet(A, B, "icmp", icmp_type=8, icmp_code=0)
PACKETS = [UDP, TCP, ICMP]

# OUTPUT sends udp to a, tcp to b; a accepts, b drops, and both count.
RULES = """
:a -
:b -
-A OUTPUT -p udp -j a
-A OUTPUT -p tcp -j b
-A a -j ACCEPT
-A b -j DROP
"""
TWO_CHAINS = ruleset(RULES)


def renamed(blob: bytes, old: str, new: str) -> bytes:
    """The blob with user chain `old`'s ERROR head naming `new` instead."""
    raw = codec.parse_replace(blob)
    (head,) = [e for e in raw.entries if e.target.errorname == old]
    at = SIZEOF_IPT_REPLACE + head.offset + head.target_offset + codec._ERRORNAME_AT
    out = bytearray(blob)
    out[at:at + 32] = new.encode().ljust(32, b"\0")
    return bytes(out)


def jump_of(blob: bytes, index: int, verdict: int) -> bytes:
    """The blob with entry `index`'s standard target set to `verdict`."""
    e = codec.parse_replace(blob).entries[index]
    at = SIZEOF_IPT_REPLACE + e.offset + e.target_offset + SIZEOF_XT_ENTRY_HEADER
    out = bytearray(blob)
    out[at:at + 4] = verdict.to_bytes(4, "little", signed=True)
    return bytes(out)


def kernel(netns: str, blob: bytes):
    """(errno, None) if the kernel refuses the blob, else (0, (verdicts, counters))."""
    b = bytearray(blob)   # (no iptables here: it cannot read what the last test left)
    with entered(netns):
        header = ipt_replace.parse(bytes(b[:SIZEOF_IPT_REPLACE]))
        header.num_counters = codec.parse_getinfo(sockopt.get_info("filter"))["num_entries"]
        b[:SIZEOF_IPT_REPLACE] = ipt_replace.build(header)
        try:
            sockopt.set_replace(bytes(b))
        except BpfilterError as err:
            return err.errno, None
    return 0, kernel_send(netns, PACKETS)


def ours(blob: bytes):
    try:
        table = load_filter_table(blob, attach=False)
    except BpfilterError as err:
        return err.errno, str(err)
    try:
        verdicts = [verdict_name(table.test_run(OUT, p.build(1, 0))) for p in PACKETS]
        return 0, (verdicts, table.counters())
    finally:
        table.close()


def same_as_kernel(kernel_netns, blob: bytes):
    theirs, ours_ = kernel(kernel_netns, blob), ours(blob)
    assert ours_ == theirs
    return theirs


def test_reference():
    """The blob before any renaming: udp accepted by a, tcp dropped by b."""
    assert ours(replace_blob(TWO_CHAINS))[1][0] == ["ACCEPT", "DROP", "ACCEPT"]


@pytest.mark.parametrize("name", ["a", "INPUT", "OUTPUT", "FORWARD"])
def test_a_user_chain_named_like_another_runs_as_the_kernel_runs_it(kernel_netns, name):
    """b renamed to a (two chains named a) or to a built-in chain's name: the kernel
    runs each jump to its own chain; bpfilter merged them by name (both jumps went to
    one chain), or failed with an internal error."""
    blob = renamed(replace_blob(TWO_CHAINS), "b", name)
    errno_, (verdicts, _) = same_as_kernel(kernel_netns, blob)
    assert errno_ == 0 and verdicts == ["ACCEPT", "DROP", "ACCEPT"]


def test_listing_names_each_chain(kernel_netns):
    """`bpfilter show`'s listing: both chains named a, each with its own rule and one
    reference, as the blob has them."""
    from bpfilter import listing
    from bpfilter.decode import table_from_blob
    _, table = table_from_blob(renamed(replace_blob(TWO_CHAINS), "b", "a"), Family.IPV4)
    text = listing.render(table, [(0, 0)] * table.num_entries)
    assert text.count("Chain a (1 references)") == 2
    assert "DROP" in text.split("Chain a (1 references)")[2]


# Unreachable entries: after an unconditional ACCEPT in a, nothing of a runs.
UNREACHED = ruleset(RULES.replace("-A a -j ACCEPT\n", "-A a -j ACCEPT\n-A a -j b\n"))


def _a_second(blob: bytes) -> int:
    raw = codec.parse_replace(blob)
    (head,) = [e for e in raw.entries if e.target.errorname == "a"]
    return head.index + 2


@pytest.mark.parametrize("where", ["own chain", "middle of an entry", "past the table",
                                   "a rule inside b"])
def test_an_unreached_jump_anywhere_is_accepted_as_the_kernel_does(kernel_netns, where):
    """The kernel checks only reached jumps: an unreached one to a's own start (a
    loop), into the middle of an entry, past the table or to a rule that starts no
    chain is accepted; bpfilter answered EIO or refused it."""
    blob = replace_blob(UNREACHED)
    raw = codec.parse_replace(blob)
    index = _a_second(blob)
    (a_head,) = [e for e in raw.entries if e.target.errorname == "a"]
    (b_head,) = [e for e in raw.entries if e.target.errorname == "b"]
    verdict = {"own chain": raw.entries[a_head.index + 1].offset,
               "middle of an entry": raw.entries[index].offset + 8,
               "past the table": raw.size + 64,
               "a rule inside b": raw.entries[b_head.index + 2].offset}[where]
    errno_, (verdicts, _) = same_as_kernel(kernel_netns, jump_of(blob, index, verdict))
    assert errno_ == 0 and verdicts == ["ACCEPT", "DROP", "ACCEPT"]


def test_a_reached_jump_to_no_entry_is_eloop(kernel_netns):
    """The same jump, reached (b's DROP made a conditional jump target): ELOOP."""
    blob = replace_blob(UNREACHED)
    raw = codec.parse_replace(blob)
    (b_head,) = [e for e in raw.entries if e.target.errorname == "b"]
    errno_, detail = ours(jump_of(blob, b_head.index + 1, raw.entries[b_head.index + 1].offset + 8))
    assert (errno_, kernel(kernel_netns, jump_of(blob, b_head.index + 1,
                                                  raw.entries[b_head.index + 1].offset + 8))[0]) \
        == (errno.ELOOP, errno.ELOOP), detail
