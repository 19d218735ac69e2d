"""Long runs of simple rules, classified by a tuple space search instead of a walk.

Where it applies (chosen per run of a chain, see `segments`): a run is a maximal
sequence of consecutive rules, each
  - with a final verdict (ACCEPT or DROP),
  - matching on source/destination under any mask (no `!`), on the protocol exactly
    or any (no `!`), on no interface and no fragment flag,
  - with at most one match: tcp or udp port ranges (no `!`, no tcp flag test).
Blocklists, per-port service lists and ClassBench-style 5-tuple ACLs are such runs.
Runs shorter than MIN_RUN stay plain code: a few compares are cheaper than hashing,
and plain code handles every rule shape.

How: each rule becomes keys of one or more "tuples", a tuple being one combination of
field masks (a port range becomes the prefix blocks covering it). All keys live in one
hash map per table, the tuple id being part of the key, and map to the first rule (the
smallest entry index) having that key. A packet costs one lookup per tuple of the run,
whatever the number of rules; the smallest entry found is the kernel's first match.

Exactness where the kernel is subtle:
  - tcp/udp matches never match a non-first fragment: their rules require an "l4" bit
    in the key that such packets do not set.
  - a packet whose transport header is too short for tcp/udp, or a tcp fragment at
    offset 1, makes the first rule whose ip part matches drop it ("hotdrop") if that
    rule has a port match. Such packets look up the run's projection on the ip part
    (ports ignored): its value says whether the first rule there hotdrops.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

from ..ext.tcp import TcpMatch
from ..ext.udp import UdpMatch
from ..model import Accept, Drop, Rule

MIN_RUN = 16
# A run is classified only when its lookups are few and far fewer than its rules: a
# lookup costs about what a dozen compares do, and each one adds paths the verifier
# walks. Runs of varied prefixes and port ranges (more tuples than rules) stay code.
MAX_TUPLES = 32
RULES_PER_TUPLE = 4
INF = 0xFFFFFFFF
VERDICT_DROP, VERDICT_ACCEPT, VERDICT_HOTDROP = 0, 1, 2

# The lookup key, as built on the stack.
KEY_SIZE = 24
K_TUPLE, K_SADDR, K_DADDR, K_SPORT, K_DPORT, K_PROTO, K_L4 = 0, 4, 8, 12, 14, 16, 17
VALUE_SIZE = 8   # u32 entry, u32 verdict


class Masks(NamedTuple):
    """One tuple: which bits of each field its keys compare. (A NamedTuple: runs of
    100k rules hash these a few times per rule.)"""

    saddr: int
    daddr: int
    proto: int
    sport: int
    dport: int
    l4: int
    ip_only: bool = False   # the projection's tuples: their values say "hotdrop"


@dataclass
class Run:
    rules: list[Rule]
    keys: list = field(default_factory=list)   # (entry, rule_keys) of each rule
    tuples: list[tuple[int, Masks]] = field(default_factory=list)        # (id, masks)
    ip_tuples: list[tuple[int, Masks]] = field(default_factory=list)     # projection


Segment = Union[Rule, Run]


def _port_match(rule: Rule) -> Optional[Union[TcpMatch, UdpMatch]]:
    return rule.matches[0] if rule.matches else None


def eligible(rule: Rule) -> bool:
    ip = rule.ip
    if not isinstance(rule.target, (Accept, Drop)):
        return False
    if ip.src.invert or ip.dst.invert or ip.invert_proto or ip.fragment or ip.invert_fragment:
        return False
    if not (ip.in_iface.is_any and ip.out_iface.is_any):
        return False
    if len(ip.src.addr) != 4 or len(rule.matches) > 1:
        return False
    if not rule.matches:
        return True
    m = rule.matches[0]
    if isinstance(m, TcpMatch):
        if m.flags_mask or m.invert_flags:
            return False
    elif not isinstance(m, UdpMatch):
        return False
    return not (m.sport.invert or m.dport.invert)


def segments(rules: list[Rule], space: "TupleSpace") -> list[Segment]:
    """The chain's rules, with runs worth classifying grouped (and their keys added to
    `space`). A run ends where a rule is not eligible or would take the run past
    MAX_TUPLES lookups; what is left of a run too short or too varied stays code."""
    out: list[Segment] = []
    run = Run([])
    masks: set[Masks] = set()

    def flush() -> None:
        nonlocal run
        if len(run.rules) >= MIN_RUN and space.add_run(run):
            out.append(run)
        else:
            out.extend(run.rules)
        run = Run([])
        masks.clear()

    for rule in rules:
        found = space.classify(rule)
        if found is None:
            flush()
            out.append(rule)
            continue
        keys, mine = found
        if not mine <= masks and len(masks | mine) > MAX_TUPLES:
            flush()
        run.rules.append(rule)
        run.keys.append((rule.entry, keys))
        masks.update(mine)
    flush()
    return out


@functools.lru_cache(maxsize=4096)
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


def _le32(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


# A table has a few distinct masks and many rules: one object each.
_masks = functools.lru_cache(maxsize=1024)(Masks)


def rule_keys(rule: Rule) -> tuple:
    """(masks, key fields, verdict) of every key a rule puts in its run's tuples, its
    ip projection included; none for a rule the kernel can never match. The key
    fields are the key's bytes after the tuple id."""
    ip = rule.ip
    smask, dmask = _le32(ip.src.mask), _le32(ip.dst.mask)
    saddr, daddr = _le32(ip.src.addr), _le32(ip.dst.addr)
    if saddr & ~smask or daddr & ~dmask:
        return ()   # the kernel compares (packet & mask) == addr: never true
    pmask = 0xFF if ip.proto else 0
    verdict = VERDICT_ACCEPT if isinstance(rule.target, Accept) else VERDICT_DROP
    ports = _port_match(rule)
    ip_only = _KEY_FIELDS.pack(saddr, daddr, 0, 0, ip.proto, 0)
    if ports is None:
        keys = [(_masks(smask, dmask, pmask, 0, 0, 0), ip_only, verdict)]
    else:
        keys = [(_masks(smask, dmask, pmask, spm, dpm, 1),
                 _KEY_FIELDS.pack(saddr, daddr, sp, dp, ip.proto, 1), verdict)
                for sp, spm in port_blocks(ports.sport.lo, ports.sport.hi)
                for dp, dpm in port_blocks(ports.dport.lo, ports.dport.hi)]
    keys.append((_masks(smask, dmask, pmask, 0, 0, 0, True), ip_only,
                 VERDICT_HOTDROP if ports is not None else verdict))
    return tuple(keys)


class TupleSpace:
    """The keys of every run of a table, in one map per table.

    How each rule classifies is remembered (`memo`): a table replacing this one
    passes it on, and the rules it took over unchanged from this table's model
    (abi.decode.table_from_raw's `previous`) are not classified again."""

    def __init__(self, memo: "Optional[dict]" = None) -> None:
        self.entries: dict[bytes, tuple[int, int]] = {}   # key -> (entry, verdict)
        self.tuple_count = 0   # ids are per run: two runs never see each other's keys
        # id(rule.ip) -> (rule.ip, rule.matches, target class, classify's answer). The
        # model's objects are immutable, and kept alive here so that no other
        # object takes their id: the same objects, the same answer.
        self.memo: dict[int, tuple] = {}
        self._previous = memo or {}

    def classify(self, rule: Rule) -> "Optional[tuple[tuple, frozenset]]":
        """None for a rule no run can hold, else its rule_keys and their masks."""
        ip, matches, kind = rule.ip, rule.matches, type(rule.target)
        known = self._previous.get(id(ip))
        if known is not None and known[0] is ip and known[1] is matches and known[2] is kind:
            self.memo[id(ip)] = known
            return known[3]
        if eligible(rule):
            keys = rule_keys(rule)
            answer = keys, frozenset(k[0] for k in keys)
        else:
            answer = None
        self.memo[id(ip)] = (ip, matches, kind, answer)
        return answer

    def add_run(self, run: Run) -> bool:
        """Adds the run's keys if classifying it pays (see MAX_TUPLES)."""
        groups: dict[Masks, list] = {}
        for entry, keys in run.keys:
            for masks, fields, verdict in keys:
                groups.setdefault(masks, []).append((fields, entry, verdict))
        if len(groups) > MAX_TUPLES or len(groups) * RULES_PER_TUPLE > len(run.rules):
            return False
        entries = self.entries
        for masks, members in groups.items():
            tid = self.tuple_count
            self.tuple_count += 1
            (run.ip_tuples if masks.ip_only else run.tuples).append((tid, masks))
            prefix = _TUPLE_ID.pack(tid)
            for fields, entry, verdict in members:
                key = prefix + fields
                # the first rule (smallest entry) having a key is the one it finds
                if key not in entries or entries[key][0] > entry:
                    entries[key] = (entry, verdict)
        return True


# The key after its tuple id: saddr, daddr, sport, dport, proto, l4, padding.
_TUPLE_ID = struct.Struct("<I")
_KEY_FIELDS = struct.Struct("<IIHHBB6x")
assert _TUPLE_ID.size == K_SADDR and _TUPLE_ID.size + _KEY_FIELDS.size == KEY_SIZE
assert struct.calcsize("<IIIHH") == K_PROTO
