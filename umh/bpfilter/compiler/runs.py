"""What both classifiers share (classifier.py's tuple space, multifield.py's merged
tuples): the rules they take, lowered once to numbers; the runs they make; the ids and
record slots a table's successive rulesets share."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from ..ext.comment import CommentMatch
from ..ext.tcp import TcpMatch
from ..ext.udp import UdpMatch
from ..model import Accept, Drop, Family, Goto, Interface, Ip6Header, IpHeader, Jump, Rule

INF = 0xFFFFFFFF
VERDICT_DROP, VERDICT_ACCEPT, VERDICT_HOTDROP = 0, 1, 2
# A rule jumping to a user chain (-j or -g): its key's value is CALLS + the index of its
# target in its run's `calls` (classifier.py; multifield takes no such rule).
VERDICT_CALL = 3
CALLS = 4
# A jump to a chain template's instance (templates.py): its key's value is CALLS + the
# index of its TemplateCase in the run's calls, plus the instance's number above
# CASE_BITS; a run has at most MAX_CASES calls.
CASE_BITS = 12
MAX_CASES = (1 << CASE_BITS) - CALLS
# multifield.RECORDS' values
RECORD_SIZE = 32

# Which packets look a tuple up (Masks.structure):
#   MAIN        those whose transport header the run's port matches can read, or
#               need not (no port match applies: other protocols, later fragments);
#   PROJECTION  those a port match would drop (short transport header, tcp's
#               fragment at offset 1): the run's projection on the ip part, whose
#               port rules say "hotdrop";
#   UNWALKED    IPv6's whose extension headers cannot be walked to the protocol:
#               there a rule with -p drops the packet wherever its addresses match,
#               a rule without matches it (ip6_packet_match()).
MAIN, PROJECTION, UNWALKED = 0, 1, 2


class TemplateCase(NamedTuple):
    """A run's jumps (-j, or -g: `goto`) to instances of template `index`."""

    index: int
    goto: bool


class Masks(NamedTuple):
    """One tuple: which bits of each field its keys compare. (A NamedTuple: runs of
    100k rules hash these a few times per rule.)"""

    saddr: int
    daddr: int
    proto: int
    sport: int
    dport: int
    l4: int
    structure: int = MAIN


_serials = itertools.count()


@dataclass
class Classified:
    """A run of rules with what classifies it: its keys in MAP and (multifield) its
    records. Entries there are relative to the run's first rule, so a run stays valid
    wherever its rules move in the table (see `segments`, which takes runs over from
    the ruleset being replaced)."""

    rules: list[Rule]
    keys: dict[bytes, tuple[int, int]]   # MAP's entries: key -> its two u32s
    records: bytearray                   # multifield.RECORDS' values, RECORD_SIZE bytes each
    record_base: int                     # its records' first slot in multifield.RECORDS
    cut_by: Optional[Rule]               # the rule it ended at for want of room, if any
    # the distinct jumps (Jump or Goto targets) of its rules, a key's value CALLS + index
    calls: list = field(default_factory=list)
    # one per run classified, kept when it is taken over
    serial: int = field(default_factory=_serials.__next__)

    @property
    def record_count(self) -> int:
        return len(self.records) // RECORD_SIZE

    @property
    def base(self) -> int:
        """Its first rule's entry: what its relative entries count from."""
        return self.rules[0].entry


def _packet_matches(rule: Rule) -> list:
    matches = rule.matches
    if not matches or (len(matches) == 1 and not isinstance(matches[0], CommentMatch)):
        return matches   # most rules: no copy
    return [m for m in matches if not isinstance(m, CommentMatch)]


@functools.lru_cache(maxsize=1024)
def _mask(mask: bytes) -> tuple[int, int]:
    """A wire-order mask as facts hold it (a little-endian load) and its prefix length."""
    bits = 8 * len(mask)
    return (int.from_bytes(mask, "little"),
            bits - (~int.from_bytes(mask, "big") & ((1 << bits) - 1)).bit_length())


_VERDICTS = {Accept: VERDICT_ACCEPT, Drop: VERDICT_DROP, Jump: VERDICT_CALL, Goto: VERDICT_CALL}
_NO_INTERFACE = Interface(bytes(16), bytes(16))   # what iptables writes without -i/-o


class Lowered(NamedTuple):
    """An eligible rule in the terms of keys and records, made once per rule: addresses
    and masks as facts hold them (little-endian loads of the wire bytes; IPv4's 4
    bytes, IPv6's 16)."""

    entry: int
    saddr: int
    smask: int
    slen: int      # the prefix the mask is, if it is one (its leading ones)
    daddr: int
    dmask: int
    dlen: int
    proto: int     # 0: any (IPv6: also a rule without -p, whose proto is not looked at)
    ports: Optional[tuple[int, int, int, int]]   # sport lo, hi, dport lo, hi; None: no match
    verdict: int
    walks: bool    # IPv6 -p: a packet whose extension headers cannot be walked is
    #                dropped (uncounted) wherever the rule's addresses match

    @property
    def never_matches(self) -> bool:
        """Address bits outside the mask: IPv4's kernel compares (packet & mask) ==
        addr, never true then. (IPv6's ignores them: its rules are lowered without.)"""
        return bool(self.saddr & ~self.smask or self.daddr & ~self.dmask)


def _ipv4_part(ip: IpHeader) -> Optional[tuple]:
    """(src, dst, in_iface, out_iface, proto, walks) of an IPv4 ip part the classifiers
    take (ip_packet_match()), None for one they do not."""
    src, dst, in_iface, out_iface, proto, invert_proto, fragment, invert_fragment = ip
    if invert_proto or fragment or invert_fragment:
        return None
    return src, dst, in_iface, out_iface, proto, False


def _ipv6_part(ip: Ip6Header) -> Optional[tuple]:
    """The same for IPv6 (ip6_packet_match()): without -p (IP6T_F_PROTO) the proto field
    is not looked at, whatever it holds; with it the walk's protocol is compared."""
    src, dst, in_iface, out_iface, proto, invert_proto, proto_given = ip
    if not proto_given:
        return src, dst, in_iface, out_iface, 0, False
    # a protocol past 0xFF never matches the walk's, yet drops what cannot be walked
    if invert_proto or proto > 0xFF:
        return None
    return src, dst, in_iface, out_iface, proto, True


_IP_PARTS = {IpHeader: _ipv4_part, Ip6Header: _ipv6_part}


def lower(rule: Rule) -> Optional[Lowered]:
    """The rule as the classifier takes it, or None if it is not eligible (see the
    module docstring). (Made for every rule of a chain: unpacked, not attribute by
    attribute.)"""
    verdict = _VERDICTS.get(type(rule.target))
    if verdict is None:
        return None
    part = _IP_PARTS[type(rule.ip)](rule.ip)
    if part is None:
        return None
    src, dst, in_iface, out_iface, proto, walks = part
    saddr, smask, sinvert = src
    daddr, dmask, dinvert = dst
    if sinvert or dinvert:
        return None
    if not ((in_iface == _NO_INTERFACE or in_iface.is_any)
            and (out_iface == _NO_INTERFACE or out_iface.is_any)):
        return None
    matches = _packet_matches(rule)
    if len(matches) > 1:
        return None
    ports = None
    if matches:
        m = matches[0]
        if isinstance(m, TcpMatch):
            if m.flags_mask or m.invert_flags or m.option:
                return None
        elif not isinstance(m, UdpMatch):
            return None
        sport, dport = m.sport, m.dport
        if sport.invert or dport.invert:
            return None
        ports = (sport.lo, sport.hi, dport.lo, dport.hi)
    smask, slen = _mask(smask)
    dmask, dlen = _mask(dmask)
    saddr, daddr = int.from_bytes(saddr, "little"), int.from_bytes(daddr, "little")
    if type(rule.ip) is Ip6Header:
        # ipv6_masked_addr_cmp(): ((packet ^ addr) & mask), the bits of addr outside
        # mask do not count
        saddr &= smask
        daddr &= dmask
    return tuple.__new__(Lowered, (rule.entry, saddr, smask, slen, daddr, dmask, dlen, proto,
                                   ports, verdict, walks))


def eligible(rule: Rule) -> bool:
    return lower(rule) is not None


def same_rule(old: Rule, new: Rule) -> bool:
    """Whether `new` is `old` again, wherever its entry now is. Decoding shares the ip
    header and the match list of an entry with the same bytes as one of the table in
    place (decode.table_from_raw), so identity answers at once for most rules; equal
    rules that are not the same objects (duplicates) compare field by field."""
    return ((old.ip is new.ip or old.ip == new.ip)
            and (old.matches is new.matches or old.matches == new.matches)
            and old.target == new.target)


@functools.lru_cache(maxsize=1 << 16)
def port_blocks(lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """(value, mask) prefix blocks covering exactly [lo, hi] of 16-bit ports."""
    blocks = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        blocks.append((lo, 0xFFFF & ~(size - 1)))
        lo += size
    return tuple(blocks)


class TupleSpace:
    """Tuple ids and record slots of a table's runs (its family's: the keys' layout
    depends on it), handed out for good: the successive rulesets of a table share its
    maps (loader.ClassifierMaps), where a run taken over keeps its keys and records,
    and a new run gets ids and slots no run in them has."""

    def __init__(self, family: Family = Family.IPV4) -> None:
        self.family = family
        self.next_tid = 0
        self.next_record = 0
        # chain key -> (template, instance) of the chain templates of the ruleset
        # being classified (compile_table sets it)
        self.instances: dict[str, tuple[int, int]] = {}

    def new_tid(self) -> int:
        self.next_tid += 1
        return self.next_tid - 1

    def record_slots(self, count: int) -> int:
        """The first of `count` new record slots."""
        self.next_record += count
        return self.next_record - count

    def wasteful(self, live_records: int) -> bool:
        """Whether slots of runs gone outnumber those in use: time for new maps."""
        return self.next_record > 2 * live_records + 65536 or self.next_tid >= 1 << 31
