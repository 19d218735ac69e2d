"""Chain templates: user chains of one shape compiled once, their constants in a map.

kube-proxy writes three chains per Service (KUBE-SVC-*, two KUBE-SEP-*), each of the
same rules but for addresses, ports, a probability and the chains they jump to: as
code, 10,000 Services pass the 1,000,000 instructions BPF allows a program, and
verifying 1,000 takes long. Chains of one shape (the same rules, but for those
constants) that are at least TEMPLATE_MIN are a template: one subprogram, called with
an instance number, which reads each constant ("hole") from the instance's record in
INSTANCES. A Service is then a record, whatever the number of Services.

Shapes: a rule's shape is its rule with its holes taken out, and for each hole what
the emitters' choices of code depend on (zero, all ones, its size; a port range's
bounds equal or not): every instance of a template gets the code of the first, its exemplar, whose
model holds Holes (packet.primitives) where the constants were; they compare as the
exemplar's values and do no arithmetic. What can hold holes: IPv4 and IPv6 addresses
under a mask, tcp and udp port ranges, statistic's probability (random mode), a NAT range, and
a jump to a chain of another template (its instance number); the other parts of a
shape must be the same in every instance: the rest of the ip part, comment (no code),
mark, MARK, ACCEPT, DROP, RETURN, jumps to other chains. A match or target with state
of its own per rule (limit, statistic's nth, the kernel's own matches) is never in a
template.

Levels: a chain's shape depends on whether the chains it jumps to are templates, so
chains are shaped callees first (by their height in the call graph).

Counters: a chain's entries are consecutive, its first one is its record's first
word; rule i counts entry first + i, the implicit RETURN first + len(rules).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from ..bpf.insn import MapRef
from ..ext.comment import CommentMatch
from ..ext.mark import MarkMatch, MarkTarget
from ..ext.nat import NatTarget
from ..ext.ports import PortRange
from ..ext.statistic import XT_STATISTIC_MODE_RANDOM, StatisticMatch
from ..ext.tcp import TcpMatch
from ..ext.udp import UdpMatch
from ..model import (Accept, Chain, Drop, Fallthrough, Goto, Ip6Header, IpHeader, Jump, Return,
                     Table)
from ..packet.primitives import Hole, HoleBlock

TEMPLATE_MIN = 8
TEMPLATE_MAX_RULES = 12
INSTANCES = MapRef("chain_instances")
HEADER = 4   # a record's first word: its chain's first entry


@dataclass(frozen=True)
class TemplateCall:
    """In a template's rules: -j or -g (`goto`) to an instance of template `index`,
    its number the record's word `instance`."""

    index: int
    goto: bool
    instance: Hole


@dataclass
class Template:
    index: int
    exemplar: Chain
    rules: list          # the exemplar's rules, Holes in place of their constants
    size: int            # its records' bytes
    instances: list[str] = field(default_factory=list)   # chain keys, in instance order


@dataclass
class Templates:
    templates: list[Template] = field(default_factory=list)
    instance_of: dict[str, tuple[int, int]] = field(default_factory=dict)   # key -> (t, n)
    record_size: int = 0
    records: bytes = b""

    @property
    def count(self) -> int:
        return len(self.instance_of)


class _Holes:
    """The holes of one chain's rules as they are taken out: values, then offsets."""

    def __init__(self):
        self.words: list = []     # int (a u32) or bytes (a block), in record order
        self.offset = HEADER

    def word(self, value: int) -> Hole:
        hole = Hole(self.offset, value)
        self.words.append(value)
        self.offset += 4
        return hole

    def block(self, value: bytes) -> HoleBlock:
        block = HoleBlock(value, self.offset)
        self.words.append(bytes(value))
        self.offset += len(value)
        return block


def _predicates(value: int) -> tuple:
    """What the emitters' choices of code may ask of a hole's value."""
    return (value == 0, value == 0xFFFF, value > 0xFFFF, value >= 1 << 31,
            value == 0xFFFFFFFF)


def _prefix(prefix, holes: _Holes):
    if not any(prefix.mask):
        return prefix, prefix
    if len(prefix.addr) == 16:   # IPv6's code never looks at the address's value
        return ("addr6", prefix.mask, prefix.invert), \
            prefix._replace(addr=holes.block(prefix.addr))
    value = int.from_bytes(prefix.addr, "little")
    return ("addr", prefix.mask, prefix.invert, _predicates(value)), \
        prefix._replace(addr=holes.word(value))


def _ports(ports: PortRange, holes: _Holes, build: bool):
    if (ports.lo, ports.hi, ports.invert) == (0, 0xFFFF, False):
        return ports, ports
    shape = ("ports", ports.invert, _predicates(ports.lo), _predicates(ports.hi),
             ports.lo == ports.hi)
    lo, hi = holes.word(ports.lo), holes.word(ports.hi)
    return shape, build and replace(ports, lo=lo, hi=hi)


def _match(match, holes: _Holes, build: bool = False):
    """(shape, holed match: only if `build`, for a template's exemplar), or None."""
    if isinstance(match, CommentMatch):
        return ("comment",), match
    if isinstance(match, (TcpMatch, UdpMatch)):
        (sport_shape, sport), (dport_shape, dport) = _ports(match.sport, holes, build), \
            _ports(match.dport, holes, build)
        rest = (type(match), *(getattr(match, f) for f in _FIELDS[type(match)]))
        return (rest, sport_shape, dport_shape), \
            build and replace(match, sport=sport, dport=dport)
    if isinstance(match, StatisticMatch) and match.mode == XT_STATISTIC_MODE_RANDOM:
        hole = holes.word(match.probability)
        return (StatisticMatch, match.invert, _predicates(match.probability)), \
            build and replace(match, probability=hole)
    if isinstance(match, MarkMatch):
        return match, match
    return None


# what else than ports a tcp or udp match's code depends on
_FIELDS = {TcpMatch: ("flags_mask", "flags_cmp", "invert_flags", "option", "invert_option"),
           UdpMatch: ()}


class _HoledRange:
    """A NAT range whose bytes are a template's HoleBlock (NatTarget's emitter only
    packs it)."""

    def __init__(self, block: HoleBlock):
        self.block = block

    def packed(self) -> bytes:
        return self.block


def _target(target, holes: _Holes, template_of: dict[str, int], build: bool):
    if isinstance(target, (Accept, Drop, Return, Fallthrough, MarkTarget)):
        return target, target
    if isinstance(target, (Jump, Goto)):
        index = template_of.get(target.chain)
        if index is None:
            return target, target
        goto = isinstance(target, Goto)
        return ("call", index, goto), (target.chain, goto)   # instance: filled by the caller
    if isinstance(target, NatTarget):
        block = holes.block(target.range.packed())
        return (NatTarget, target.name, target.revision, target.how, target.family), \
            build and replace(target, range=_HoledRange(block))
    return None


class _Parts:
    """The shapes and hole values of ip parts and matches, by object: the decoder
    shares these between the rules that repeat them (decode.table_from_raw), so each
    is shaped once. An entry keeps its object, so that its id is not another's."""

    def __init__(self):
        self.seen: dict[int, tuple] = {}

    def get(self, part, shape_of) -> tuple:
        """(shape or None, hole values) of `part`."""
        known = self.seen.get(id(part))
        if known is None:
            holes = _Holes()
            made = shape_of(part, holes)
            known = self.seen[id(part)] = (part, made and made[0], holes.words)
        return known[1], known[2]


def _ip_shape(ip, holes: _Holes):
    if not isinstance(ip, (IpHeader, Ip6Header)):
        return None
    (src_shape, src), (dst_shape, dst) = _prefix(ip.src, holes), _prefix(ip.dst, holes)
    return (ip._replace(src=None, dst=None), src_shape, dst_shape), ip._replace(src=src, dst=dst)


def _rules_shape(chain: Chain) -> bool:
    """Whether the chain's rules can be a template's instance, whatever their parts."""
    rules = chain.rules
    if not 0 < len(rules) <= TEMPLATE_MAX_RULES or not all(r.reachable for r in rules):
        return False
    first = rules[0].entry
    return all(r.entry == first + i for i, r in enumerate(rules)) and \
        chain.tail_entry == first + len(rules)


def _shape(chain: Chain, template_of: dict[str, int], instance_of: dict[str, tuple],
           parts: "_Parts | None" = None):
    """(shape, holes, holed rules) of a chain, or None if it cannot be a template.
    With `parts`, its rules' parts are shaped once there and no holed rules are made
    (an instance's); without, they are (the exemplar's)."""
    if not _rules_shape(chain):
        return None
    build = parts is None
    holes = _Holes()
    shape, holed = [], []
    for rule in chain.rules:
        if build:
            ip_shape, ip = _ip_shape(rule.ip, holes) or (None, None)
        else:
            ip_shape, words = parts.get(rule.ip, _ip_shape)
            holes.words += words
        if ip_shape is None:
            return None
        matches, match_shapes = [], []
        for match in rule.matches:
            if build:
                match_shape, holed_match = _match(match, holes, True) or (None, None)
                matches.append(holed_match)
            else:
                match_shape, words = parts.get(match, _match)
                holes.words += words
            if match_shape is None:
                return None
            match_shapes.append(match_shape)
        made = _target(rule.target, holes, template_of, build)
        if made is None:
            return None
        target_shape, target = made
        if isinstance(target, tuple):   # a jump to a template's instance
            key, goto = target
            target = TemplateCall(template_of[key], goto, holes.word(instance_of[key][1]))
        shape.append((ip_shape, tuple(match_shapes), target_shape))
        if build:
            holed.append(replace(rule, ip=ip, matches=matches, target=target))
    return tuple(shape), holes, holed


def _heights(table: Table) -> dict[str, int]:
    """Chain key -> 1 + the height of the highest chain it jumps to (0: none)."""
    heights: dict[str, int] = {}
    for root in table.chains:
        stack = [(root, False)]
        while stack:
            key, expanded = stack.pop()
            if key in heights:
                continue
            callees = [r.target.chain for r in table.chains[key].rules
                       if r.reachable and isinstance(r.target, (Jump, Goto))]
            if expanded:
                heights[key] = 1 + max((heights.get(c, 0) for c in callees), default=-1)
                continue
            stack.append((key, True))
            stack.extend((c, False) for c in callees if c not in heights)
    return heights


def plan(table: Table) -> Templates:
    """The table's templates and their instances' records."""
    out = Templates()
    parts = _Parts()
    heights = _heights(table)
    template_of: dict[str, int] = {}
    records: list[bytes] = []
    user = [c for c in table.chains.values() if not c.builtin]
    for height in sorted({heights.get(c.key, 0) for c in user}):
        groups: dict = {}
        for chain in user:
            if heights.get(chain.key, 0) != height:
                continue
            made = _shape(chain, template_of, out.instance_of, parts)
            if made is not None:
                groups.setdefault(made[0], []).append((chain, made[1]))
        for members in groups.values():
            if len(members) < TEMPLATE_MIN:
                continue
            exemplar, holes = members[0]
            _, _, holed = _shape(exemplar, template_of, out.instance_of)
            template = Template(len(out.templates), exemplar, holed, holes.offset)
            out.templates.append(template)
            for chain, chain_holes in members:
                template_of[chain.key] = template.index
                out.instance_of[chain.key] = (template.index, len(records))
                template.instances.append(chain.key)
                records.append(struct.pack("<I", chain.rules[0].entry) + b"".join(
                    struct.pack("<I", w) if isinstance(w, int) else w
                    for w in chain_holes.words))
    if records:
        out.record_size = -(-max(len(r) for r in records) // 8) * 8
        out.records = b"".join(r.ljust(out.record_size, b"\0") for r in records)
    return out

