"""Long runs of simple rules, classified by a tuple space search instead of a walk.

Where it applies (chosen per run of a chain, see `segments`): a run is a maximal
sequence of consecutive rules, each
  - with a final verdict (ACCEPT or DROP) or a jump to a user chain (-j, -g),
  - matching on source/destination under any mask (no `!`), on the protocol exactly
    or any (no `!`), on no interface and no fragment flag,
  - with at most one match that looks at packets: tcp or udp port ranges (no `!`,
    no tcp flag test); comments do not count.
Blocklists, per-port service lists and ClassBench-style 5-tuple ACLs are such runs.
Runs shorter than MIN_RUN stay plain code: a few compares are cheaper than hashing,
and plain code handles every rule shape. Runs with too many tuples (ACLs mixing
prefixes and port ranges) go to the merged tuples of multifield.py when they are long
enough to pay, to plain code otherwise.

How: each rule becomes keys of one or more "tuples", a tuple being one combination of
field masks (a port range becomes the prefix blocks covering it). All keys live in one
hash map per table, the tuple id being part of the key, and map to the first rule (the
smallest entry index, counted from the run's first rule) having that key. A packet
costs one lookup per tuple of the run, whatever the number of rules; the smallest entry
found is the kernel's first match. A lookup is a helper hashing the whole key (two
16-byte addresses for IPv6): each tuple also has a filter, a bit per slot of a
multiplicative hash of its keys in the records array, which an array read the verifier
inlines checks first, so that most tuples a packet has no key in cost no lookup.

Replaces: iptables sends the whole table for every command, and most commands change
one rule. Runs of the ruleset in place whose rules come again are taken over, their
keys and records already in the maps the table's rulesets share (EarlierRuns,
loader.ClassifierMaps): an append to a 100k-rule chain classifies one rule.

Both families: a table's keys are laid out for its family (KEYS: IPv6's hold two
16-byte addresses), and its runs are of its family's rules. Multifield's merged tuples
take IPv4 runs only: an IPv6 run the tuple space cannot take stays code.

Exactness where the kernel is subtle:
  - tcp/udp matches never match a non-first fragment: their rules require an "l4" bit
    in the key that such packets do not set.
  - a packet whose transport header is too short for tcp/udp, or a tcp fragment at
    offset 1, makes the first rule whose ip part matches drop it ("hotdrop") if that
    rule has a port match. Such packets look up the run's projection on the ip part
    (ports ignored): its value says whether the first rule there hotdrops.
  - IPv6 addresses compare as ((packet ^ addr) & mask): a rule's address bits
    outside its mask are left out of its keys (IPv4's never match: no keys at all).
  - an IPv6 rule's protocol is the one found by walking the extension headers, and
    only with -p (runs.lower()). A packet whose walk fails is dropped by the first rule
    with -p whose addresses match, and matched by a rule without -p: such packets look
    up a second projection (runs.UNWALKED), on addresses only, whose values say
    "hotdrop" for the rules with -p.
A projection whose keys and values are those of a main tuple (a blocklist's: no port
rule, no -p) is that tuple: it shares its id, keys and filter.

Runs of jumps (kube-proxy's KUBE-SERVICES: one `-d VIP -p tcp --dport P -j KUBE-SVC-X`
per service): a key's value names the rule's jump among its run's `calls`, and the
program calls the run's dispatch, which jumps to that chain. A chain jumped to with -j
may return, and the kernel then goes on with the rule after the one that jumped: the
next rule the packet matches. Each tuple's lookup finds the first rule holding the
packet's key there, so the lookups are made again, for entries past the one that
returned, at most once per tuple (codegen's rounds). That finds the kernel's next
rule only if no later rule shares a key with a -j rule in one tuple (the lookup would
find the -j rule again, never the later one): such a rule starts a new run. A run of
jumps has at most MAX_CALL_TUPLES tuples (its rounds cost a lookup of every tuple
each).
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional, Union

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW,
                        BPF_EMIT_CALL, BPF_H, BPF_JMP_IMM, BPF_LD_MAP_FD, BPF_LDX_MEM,
                        BPF_MOV32_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W, FP, R0, R1,
                        R2, R6, R9, MapRef)
from ..model import Family, Goto, IpHeader, Jump, Rule
from ..packet import facts
from . import multifield
from .runs import (CALLS, CASE_BITS, MAIN, MAX_CASES, PROJECTION, RECORD_SIZE, UNWALKED,
                   VERDICT_CALL, VERDICT_HOTDROP, Classified, Lowered, Masks, TemplateCase,
                   TupleSpace, eligible, lower, port_blocks, same_rule)

MIN_RUN = 16
# Runs of the ruleset being replaced are taken over from this size (EarlierRuns).
TAKEOVER_MIN = 256
# A run is classified only when its lookups are few and far fewer than its rules: a
# lookup costs about what a dozen compares do, and each one adds paths the verifier
# walks. Runs of varied prefixes and port ranges (more tuples than rules) stay code.
MAX_TUPLES = 32
RULES_PER_TUPLE = 4
MAX_CALL_TUPLES = 4

# The hash map of every run's keys (the tuple space's and multifield's).
MAP = MapRef("classifier")
VALUE_SIZE = 8   # u32 entry, u32 verdict


@dataclass(frozen=True)
class KeyLayout:
    """A family's lookup key: where its fields are, as built on the stack (8-aligned:
    addresses move 8 bytes at a time where their masks allow), and how it is packed
    for the map. The protocol, the l4 bit and the padding are its last 8 bytes."""

    size: int
    saddr: int
    daddr: int
    sport: int
    dport: int
    proto: int
    addr_size: int
    pack: Callable   # (tid, saddr, daddr, sport, dport, proto, l4) -> bytes
    tuple: int = 0

    @property
    def l4(self) -> int:
        return self.proto + 1


_pack6 = struct.Struct("<IHH16s16sBB6x").pack


def _key6(tid: int, saddr: int, daddr: int, sport: int, dport: int, proto: int, l4: int) -> bytes:
    return _pack6(tid, sport, dport, saddr.to_bytes(16, "little"), daddr.to_bytes(16, "little"),
                  proto, l4)


KEYS = {
    Family.IPV4: KeyLayout(24, saddr=4, daddr=8, sport=12, dport=14, proto=16, addr_size=4,
                           pack=struct.Struct("<IIIHHBB6x").pack),
    Family.IPV6: KeyLayout(48, saddr=8, daddr=24, sport=4, dport=6, proto=40, addr_size=16,
                           pack=_key6),
}


# A tuple's filter: bits = the power of two at least FILTER_BITS_PER_KEY a key (a packet
# without a key there finds its bit set about once in that many), in RECORD_SIZE
# records of the records array (multifield.RECORDS).
FILTER_BITS_PER_KEY = 32
FILTER_MIN_BITS, FILTER_MAX_BITS = 8, 26           # log2: one record, 2M of them
_RECORD_BITS_LOG2 = (8 * RECORD_SIZE).bit_length() - 1
# The filter's hash: the xor of the key's 32-bit words (its tuple id aside), each times
# its own odd multiplier (mod 2^32), then its top bits.
FILTER_MULTIPLIERS = tuple((0x9E3779B1 * (2 * i + 1) | 1) & 0xFFFFFFFF for i in range(12))


class LookupTuple(NamedTuple):
    """A tuple of a run as its lookups see it: its id in the keys, what they keep of
    each field, and its filter (first record in the records array, log2 of its bits)."""

    tid: int
    masks: Masks
    filter: int
    bits: int


@dataclass
class Run(Classified):
    """A run in the tuple space; `records` are its tuples' filters."""

    tuples: list[LookupTuple] = field(default_factory=list)
    ip_tuples: list[LookupTuple] = field(default_factory=list)          # projection
    unwalked_tuples: list[LookupTuple] = field(default_factory=list)    # IPv6's


Segment = Union[Rule, Run, "multifield.MultiFieldRun"]


def segments(rules: list[Rule], space: "TupleSpace",
             earlier: "Optional[EarlierRuns]" = None) -> list[Segment]:
    """The chain's rules, with runs worth classifying grouped (their keys and records
    allocated in `space`). A run ends where a rule is not eligible or would take the
    run past MAX_TUPLES lookups. Consecutive runs too short or too varied for the
    tuple space are pooled for multifield (IPv4); what it does not take stays code.
    Runs of the ruleset being replaced whose rules come again are taken over
    (`earlier`)."""
    out: list[Segment] = []
    run: list[Lowered] = []
    count = TupleCount(space.family)
    pooled: list[Lowered] = []
    by_entry = {rule.entry: rule for rule in rules}
    merged = space.family in multifield.FAMILIES
    # the run's keys a -j rule holds, with what a later rule must not share (see the
    # module docstring); and whether it jumps at all
    jump_keys: set[tuple] = set()
    jumps = False

    def flush(cut_by: Optional[Rule] = None) -> None:
        nonlocal run, count, jumps
        classified = tuple_space_run(space, run, by_entry, cut_by) if len(run) >= MIN_RUN else None
        if classified:
            flush_pooled()
            out.append(classified)
        elif jumps:   # multifield takes no jumps
            flush_pooled()
            out.extend(by_entry[low.entry] for low in run)
        else:
            pooled.extend(run)
        run = []
        count = TupleCount(space.family)
        jump_keys.clear()
        jumps = False

    def flush_pooled() -> None:
        rest = pooled[:]
        pooled.clear()
        while merged and len(rest) >= MIN_RUN:
            plan = multifield.Plan(rest, by_entry)
            taken = len(plan.rules)
            if plan.pays():
                out.append(plan.commit(space, by_entry[rest[taken].entry]
                                       if taken < len(rest) else None))
            else:
                out.extend(plan.rules)
            rest = rest[taken:]
        out.extend(by_entry[low.entry] for low in rest)

    def fits(low: Lowered) -> bool:
        """Count `low` in the run if it can join it."""
        calls = jumps or low.verdict == VERDICT_CALL
        limit = MAX_CALL_TUPLES if calls else MAX_TUPLES
        if not count.add(low, limit) or count.count > limit:
            return False
        if calls:
            keys = [(masks, fields, verdict) for masks, fields, _, verdict
                    in rule_keys(low, space.family)]
            if jump_keys.intersection((masks, fields) for masks, fields, _ in keys):
                return False
            if isinstance(by_entry[low.entry].target, Jump):
                jump_keys.update((masks, fields) for masks, fields, verdict in keys
                                 if verdict == VERDICT_CALL)
        return True

    at = 0
    while at < len(rules):
        rule = rules[at]
        low = lower(rule)
        if low is None:
            flush()
            flush_pooled()
            out.append(rule)
            at += 1
            continue
        taken = earlier and earlier.take(rules, at)
        if taken:
            flush()
            flush_pooled()
            out.append(taken)
            at += len(taken.rules)
            continue
        if not fits(low):
            flush(cut_by=rule)
            fits(low)
        jumps = jumps or low.verdict == VERDICT_CALL
        run.append(low)
        at += 1
    flush()
    flush_pooled()
    return out


class EarlierRuns:
    """The classified runs of the ruleset being replaced, to take over where their
    rules come again: an append to a 100k-rule chain then classifies one rule, and
    the run keeps its keys and records in the table's maps, which the replace leaves
    alone."""

    def __init__(self, runs: list[Classified]):
        self.by_first: dict[IpHeader, list[Classified]] = {}   # by their first rule's
        for run in runs:
            # (instance numbers are the ruleset's own: runs jumping to templates' are
            # classified anew)
            if not any(isinstance(call, TemplateCase) for call in run.calls):
                self.by_first.setdefault(run.rules[0].ip, []).append(run)
        self.rules: list[Rule] = []   # the chain being segmented
        self.stretch = (0, 0)         # eligible rules from, to (last one found)
        self.merging_until = 0

    def _stretch_end(self, rules: list[Rule], at: int) -> int:
        """Where the stretch of eligible rules from rules[at] on ends."""
        if rules is not self.rules:
            self.rules, self.stretch, self.merging_until = rules, (0, 0), 0
        start, end = self.stretch
        if not start <= at < end:
            end = at
            while end < len(rules) and eligible(rules[end]):
                end += 1
            self.stretch = (at, end)
        return end

    def take(self, rules: list[Rule], at: int) -> Optional[Classified]:
        """The earlier run whose rules are rules[at:...] again, rebased there, if
        taking it over keeps the runs of its stretch of eligible rules few. It is taken
        over if it has TAKEOVER_MIN rules (smaller ones cost little to classify again
        with what follows them) and at least as many as the rest of the stretch, or if
        it ended for want of room before the same rule as now. A run failing the size
        test is classified again with the rest of the stretch: under appends the runs
        of a stretch then halve in size from one to the next, as a binary counter's
        bits do, and each rule is classified again O(log n) times."""
        if rules is self.rules and at < self.merging_until:
            return None
        run = next((run for run in self.by_first.get(rules[at].ip, ())
                    if at + len(run.rules) <= len(rules)
                    and all(map(same_rule, run.rules, rules[at:at + len(run.rules)]))), None)
        if run is None or len(run.rules) < TAKEOVER_MIN:
            return None
        after = at + len(run.rules)
        end = self._stretch_end(rules, after)
        cut_again = run.cut_by is not None and after < end and same_rule(run.cut_by, rules[after])
        if not cut_again and len(run.rules) < end - after:
            self.merging_until = end
            return None
        return replace(run, rules=rules[at:after])


_PLAIN = frozenset([(0, 0, 0)])   # a rule without ports: one main tuple, no port in it


def rule_tuples(low: Lowered) -> tuple[tuple, frozenset]:
    """The main tuples of rule_keys(low), factored: the address and protocol masks, and
    the (sport mask, dport mask, l4) they come with. Cheaper than making the keys,
    which a run too varied for the tuple space never needs."""
    return (low.smask, low.dmask, bool(low.proto)), _port_tuples(low.ports)


@functools.lru_cache(maxsize=1 << 16)
def _port_tuples(ranges: Optional[tuple]) -> frozenset:
    if ranges is None:
        return _PLAIN
    return frozenset((spm, dpm, 1) for _, spm in port_blocks(*ranges[:2])
                     for _, dpm in port_blocks(*ranges[2:]))


def _ids(ports: frozenset) -> int:
    """The tuple ids of one address and protocol mask: its main tuples, and its
    projection's unless that is its plain main tuple (no port rule has those masks)."""
    return len(ports) + (ports != _PLAIN)


def _main_tuples(lows: list[Lowered]) -> int:
    """How many main tuples tuple_space_run would make of these rules (it makes
    projections besides, some of them twins of main tuples): counted from their
    factored port tuples (rule_tuples), each distinct set once, without making the
    keys, of which two wide port ranges make about 900 per rule."""
    sets: dict[tuple, set] = {}
    for low in lows:
        if not low.never_matches:   # it puts no keys
            addr, ports = rule_tuples(low)
            sets.setdefault(addr, set()).add(ports)
    return sum(len(frozenset().union(*distinct)) for distinct in sets.values())


class TupleCount:
    """The tuple ids of a run being grown, as tuple_space_run gives them (or more, for
    rules that can never match, which put no keys)."""

    def __init__(self, family: Family):
        self.unwalked = family is Family.IPV6
        self.ports: dict[tuple, frozenset] = {}   # rule_tuples(), merged per address masks
        # IPv6: the address masks whose UNWALKED tuple has keys of its own, those of a
        # rule with -p among them; without, it is their plain main tuple without protocol
        self.own_unwalked: set[tuple] = set()
        self.count = 0

    def add(self, low: Lowered, limit: Optional[int] = None) -> bool:
        """Count the tuples `low` adds, unless that takes the count past `limit` (then
        False, and nothing counted); a rule adding none always fits."""
        addr, ports = rule_tuples(low)
        known = self.ports.get(addr)
        if known is None:
            grown, new = ports, _ids(ports)
        elif ports <= known:
            grown, new = known, 0
        else:
            grown = known | ports
            new = _ids(grown) - _ids(known)
        # (an IPv6 rule with a protocol or ports has -p: low.walks)
        own_unwalked = self.unwalked and low.walks and addr[:2] not in self.own_unwalked
        new += own_unwalked
        if new and limit is not None and self.count + new > limit:
            return False
        self.ports[addr] = grown
        if own_unwalked:
            self.own_unwalked.add(addr[:2])
        self.count += new
        return True


def rule_keys(low: Lowered, family: Family):
    """(masks, key fields, entry, verdict) of every key a rule puts in its run's tuples,
    its projections included; nothing for a rule the kernel can never match."""
    if low.never_matches:
        return
    smask, dmask, saddr, daddr, proto = low.smask, low.dmask, low.saddr, low.daddr, low.proto
    pmask = 0xFF if proto else 0
    ports = low.ports
    if ports is None:
        yield Masks(smask, dmask, pmask, 0, 0, 0), (saddr, daddr, 0, 0, proto, 0), \
            low.entry, low.verdict
    else:
        for sp, spm in port_blocks(*ports[:2]):
            for dp, dpm in port_blocks(*ports[2:]):
                yield Masks(smask, dmask, pmask, spm, dpm, 1), \
                    (saddr, daddr, sp, dp, proto, 1), low.entry, low.verdict
    yield Masks(smask, dmask, pmask, 0, 0, 0, PROJECTION), \
        (saddr, daddr, 0, 0, proto, 0), low.entry, \
        VERDICT_HOTDROP if ports is not None else low.verdict
    if family is Family.IPV6:
        yield Masks(smask, dmask, 0, 0, 0, 0, UNWALKED), (saddr, daddr, 0, 0, 0, 0), \
            low.entry, VERDICT_HOTDROP if low.walks else low.verdict


def tuple_space_run(space: TupleSpace, lows: list[Lowered], by_entry: dict[int, Rule],
                    cut_by: Optional[Rule]) -> Optional[Run]:
    """The run of these rules (`by_entry` has them) classified by its keys in `space`,
    if that pays (see MAX_TUPLES)."""
    if _main_tuples(lows) * RULES_PER_TUPLE > min(len(lows), MAX_TUPLES * RULES_PER_TUPLE):
        return None   # known from the factored tuples, before a key is made
    groups: dict[Masks, list] = {}
    base = lows[0].entry
    calls: dict = {}   # a jump's target (or TemplateCase) -> its index in the run's calls
    for low in lows:
        call = low.verdict == VERDICT_CALL and _call_value(by_entry[low.entry].target, calls,
                                                           space.instances)
        for masks, fields, entry, verdict in rule_keys(low, space.family):
            groups.setdefault(masks, []).append(
                (fields, entry - base, call if verdict == VERDICT_CALL else verdict))
    # a projection with the keys and values of a main tuple is that tuple
    twins = {masks: twin for masks in groups if masks.structure != MAIN
             and groups.get(twin := masks._replace(structure=MAIN)) == groups[masks]}
    ids = len(groups) - len(twins)
    if ids > MAX_TUPLES or ids * RULES_PER_TUPLE > len(lows) or len(calls) > MAX_CASES:
        return None
    run = Run([by_entry[low.entry] for low in lows], {}, bytearray(), 0, cut_by, list(calls))
    layout = KEYS[space.family]
    made: dict[Masks, tuple] = {}   # tid, filter (relative), bits
    for masks, members in sorted(groups.items(), key=lambda group: group[0].structure):
        if masks in twins:
            made[masks] = made[twins[masks]]
            continue
        tid = space.new_tid()
        keys = []
        seen: set[tuple] = set()   # (a projection's rules share few keys: a list's, one)
        for fields, entry, verdict in members:
            if fields not in seen:   # members come in entry order: the first rule wins
                seen.add(fields)
                key = layout.pack(tid, *fields)
                run.keys[key] = (entry, verdict)
                keys.append(key)
        bits = filter_bits(len(keys))
        made[masks] = tid, len(run.records) // RECORD_SIZE, bits
        run.records += filter_of(layout, masks, keys, bits)
    run.record_base = space.record_slots(run.record_count)
    structures = {MAIN: run.tuples, PROJECTION: run.ip_tuples, UNWALKED: run.unwalked_tuples}
    for masks in groups:
        tid, first, bits = made[masks]
        structures[masks.structure].append(LookupTuple(tid, masks, run.record_base + first, bits))
    return run


def _call_value(target, calls: dict, instances: dict) -> int:
    """A jump's key value: CALLS + its case's index, with the instance's number above
    for a chain template's instance."""
    instance = instances.get(target.chain)
    if instance is None:
        return CALLS + calls.setdefault(target, len(calls))
    case = TemplateCase(instance[0], isinstance(target, Goto))
    return CALLS + calls.setdefault(case, len(calls)) + (instance[1] << CASE_BITS)


def filter_bits(keys: int) -> int:
    return min(FILTER_MAX_BITS, max(FILTER_MIN_BITS, (FILTER_BITS_PER_KEY * keys - 1).bit_length()))


@functools.lru_cache(maxsize=1024)
def _hashed_words(layout: "KeyLayout", masks: Masks) -> tuple[tuple[int, int], ...]:
    """(offset, multiplier) of the key words a tuple's filter hashes: those its masks
    keep something of (the others are zero in every key)."""
    kept = layout.pack(0, masks.saddr, masks.daddr, masks.sport, masks.dport,
                       0xFF if masks.proto else 0, 0xFF if masks.l4 else 0)
    return tuple((4 * i, FILTER_MULTIPLIERS[i])
                 for i, (word,) in enumerate(struct.iter_unpack("<I", kept)) if i and word)


def filter_slot(key: bytes, layout: "KeyLayout", masks: Masks, bits: int) -> int:
    """The bit of a key in its tuple's filter, as emit_filter_check computes it."""
    h = 0
    for offset, multiplier in _hashed_words(layout, masks):
        h ^= int.from_bytes(key[offset:offset + 4], "little") * multiplier & 0xFFFFFFFF
    return h >> (32 - bits)


def filter_of(layout: "KeyLayout", masks: Masks, keys: list[bytes], bits: int) -> bytearray:
    """The filter of a tuple with these keys: 2**bits bits (whole records)."""
    out = bytearray(1 << bits >> 3)
    words = _hashed_words(layout, masks)
    shift = 32 - bits
    unpack = struct.Struct(f"<{layout.size // 4}I").unpack
    for key in keys:
        values = unpack(key)
        h = 0
        for offset, multiplier in words:
            h ^= values[offset >> 2] * multiplier
        slot = (h & 0xFFFFFFFF) >> shift
        out[slot >> 3] |= 1 << (slot & 7)
    return out


def emit_filter_check(asm: Assembler, layout: "KeyLayout", key: int, scratch_fp: int,
                      t: LookupTuple, missed) -> None:
    """On to `missed` unless the filter of tuple t has the bit of the key (at R6 + `key`)
    set. Uses the frame's 8 bytes at `scratch_fp` (the record's index, the bit's)."""
    asm.emit(BPF_MOV32_IMM(R1, 0))
    for offset, multiplier in _hashed_words(layout, t.masks):
        asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, key + offset),
                 BPF_ALU32_IMM(I.BPF_MUL, R2, multiplier), BPF_ALU32_REG(I.BPF_XOR, R1, R2))
    asm.emit(BPF_ALU32_IMM(I.BPF_RSH, R1, 32 - t.bits),
             BPF_STX_MEM(BPF_W, FP, R1, scratch_fp + 4),
             BPF_ALU32_IMM(I.BPF_RSH, R1, _RECORD_BITS_LOG2),
             BPF_ALU32_IMM(I.BPF_ADD, R1, t.filter),
             BPF_STX_MEM(BPF_W, FP, R1, scratch_fp),
             BPF_LD_MAP_FD(R1, multifield.RECORDS),
             BPF_MOV64_REG(R2, FP), BPF_ALU64_IMM(I.BPF_ADD, R2, scratch_fp),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, missed),
             # the byte of the record, then the bit of the byte
             BPF_LDX_MEM(BPF_W, R1, FP, scratch_fp + 4),
             BPF_MOV64_REG(R2, R1), BPF_ALU64_IMM(I.BPF_RSH, R2, 3),
             BPF_ALU64_IMM(I.BPF_AND, R2, RECORD_SIZE - 1), BPF_ALU64_REG(I.BPF_ADD, R0, R2),
             BPF_LDX_MEM(BPF_B, R2, R0, 0),
             BPF_ALU64_IMM(I.BPF_AND, R1, 7), BPF_ALU64_REG(I.BPF_RSH, R2, R1),
             BPF_ALU64_IMM(I.BPF_AND, R2, 1),
             BPF_JMP_IMM(I.BPF_JEQ, R2, 0, missed))


def emit_key(asm: Assembler, layout: KeyLayout, key: int, tid: int, masks: Masks,
             l4_bit_only: bool = False) -> None:
    """The key of tuple `tid` for the packet (R6 = &facts) at R6 + `key` (8-aligned);
    its l4 byte is R9 (`l4_bit_only`: R9's lowest bit) if the tuple keeps it."""
    asm.emit(BPF_ST_MEM(BPF_W, R6, key + layout.tuple, tid))
    for fact, key_off, mask in ((facts.SADDR, layout.saddr, masks.saddr),
                                (facts.DADDR, layout.daddr, masks.daddr)):
        _emit_masked_address(asm, fact, key + key_off, layout.addr_size, mask)
    for fact, key_off, mask in ((facts.SPORT, layout.sport, masks.sport),
                                (facts.DPORT, layout.dport, masks.dport)):
        if not mask:
            asm.emit(BPF_ST_MEM(BPF_H, R6, key + key_off, 0))
            continue
        asm.emit(BPF_LDX_MEM(BPF_H, R1, R6, fact))
        if mask != 0xFFFF:
            asm.emit(BPF_ALU32_IMM(I.BPF_AND, R1, mask))
        asm.emit(BPF_STX_MEM(BPF_H, R6, R1, key + key_off))
    # proto, l4 and the padding
    asm.emit(BPF_ST_MEM(BPF_DW, R6, key + layout.proto, 0))
    if masks.proto:
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.PROTO),
                 BPF_STX_MEM(BPF_B, R6, R1, key + layout.proto))
    if masks.l4 and l4_bit_only:
        asm.emit(BPF_MOV64_REG(R1, R9), BPF_ALU64_IMM(I.BPF_AND, R1, 1),
                 BPF_STX_MEM(BPF_B, R6, R1, key + layout.l4))
    elif masks.l4:
        asm.emit(BPF_STX_MEM(BPF_B, R6, R9, key + layout.l4))


_WORD = 0xFFFFFFFF


def _emit_masked_address(asm: Assembler, fact: int, at: int, size: int, mask: int) -> None:
    """The address fact masked (a little-endian `mask` of `size` bytes) into R6 + `at`:
    by 4-byte words, 8 bytes at once where both words are whole or both masked out
    (an IPv6 prefix of /64 is two moves)."""
    words = [mask >> (32 * i) & _WORD for i in range(size // 4)]
    i = 0
    while i < len(words):
        word, offset = words[i], 4 * i
        if (i + 1 < len(words) and words[i + 1] == word and word in (0, _WORD)
                and (at + offset) % 8 == 0 and (fact + offset) % 8 == 0):
            asm.emit(*((BPF_LDX_MEM(BPF_DW, R1, R6, fact + offset),
                        BPF_STX_MEM(BPF_DW, R6, R1, at + offset)) if word
                       else (BPF_ST_MEM(BPF_DW, R6, at + offset, 0),)))
            i += 2
            continue
        if not word:
            asm.emit(BPF_ST_MEM(BPF_W, R6, at + offset, 0))
        else:
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, fact + offset))
            if word != _WORD:
                asm.emit(BPF_ALU32_IMM(I.BPF_AND, R1, word))
            asm.emit(BPF_STX_MEM(BPF_W, R6, R1, at + offset))
        i += 1
