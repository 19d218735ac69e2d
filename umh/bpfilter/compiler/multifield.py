"""Runs the tuple space cannot take (ClassBench-style ACLs), classified by tuple merging.

The problem. An ACL run mixes source and destination prefixes of every length, with
wildcards, protocols and port ranges: its rules fall into hundreds of distinct
(mask, mask, proto, port, port) tuples, so a tuple space search costs hundreds of
lookups, and plain code costs a few compares per rule (linear, and past ~13k rules
more than the verifier takes).

The choice: tuple merging (after TupleMerge, Daly & Torng). A merged tuple keys on
*fewer* bits than its rules have: "the first 24 bits of the source" takes every rule
whose source prefix is /24 or longer, whatever its other fields. A key's bucket then
holds a few candidate rules, sorted by entry, each checked exactly (all its fields,
ports, fragments) by a short loop. A packet costs one lookup per merged tuple plus
the rules of the buckets it hits, and both stay small:
  - address prefixes of /16 or longer spread rules over 65k+ keys by themselves, so
    one address field is enough for them: a handful of tuples (src/32, src/24, dst/24,
    src/16, ...) take nearly every rule of a 100k-rule ACL, with 1 to 4 rules a bucket;
  - rules wild in both addresses (shorter than /16) need the remaining fields: their
    tuples add the protocol and the port blocks their ranges fall in.
For the bench's ClassBench mix (tools/bench/rules.py) this gives 12 merged tuples at
100k rules against hundreds of tuples unmerged.

A merged tuple's keys are found without a hash map: the tuple's slot table, an array
of bucket descriptors (first record, count) in RECORDS, is indexed by a multiplicative
hash of the packet's key fields (slot_index), and a slot holds the buckets of every
key hashing there, merged in entry order. The records' checks are exact, so a slot
shared by two keys costs only its walk. An array read is one the verifier inlines: a
tuple a packet misses costs a dozen instructions, against a helper call hashing a
24-byte key in a hash map (BPF_PROG_TEST_RUN, the bench's 10k-rule ClassBench mix:
232 ns a packet with hash lookups, 119 ns with slot tables, 45 ns for the run with no
tuples; most of the rest is the 8 records of the 3 buckets the flow hits).

Why not the alternatives:
  - a decision tree (HiCuts, HyperSplit) walks ~20 nodes, cheap array reads, but
    wildcards are copied into every leaf they overlap: building one for 100k rules is
    tens of millions of rule-node steps, minutes in Python against a 5 s budget for
    applying 100k rules. Merging is one pass over the rules, each tried against the
    few tuples it fits (O(rules x tuples), ~2 s at 100k here).
  - bit vectors (the LBVS floor) cost N/64 words a field a packet: 1.5k at 100k.
  - partitioning plus a tuple space per partition only multiplies lookups.
Memory: a 32-byte record per rule and structure (at most two) and SLOTS_PER_KEY
8-byte slots per key, in one array: about 530k records (17 MB) for 100k rules. The
program does not grow with the rules: a loop per merged tuple, which the verifier walks
as many times as the tuple's largest slot holds rules.

Exactness where the kernel is subtle, as in classifier.py:
  - the bucket check of a rule with a tcp/udp match fails on a non-first fragment;
  - a packet the first ip-matching port rule would hotdrop (short transport header,
    tcp fragment at offset 1) searches a second structure, the run's projection on
    the ip part: one record for the first rule of each distinct ip part, "hotdrop" for
    port rules, no port in any key.
  - a rule that never matches (address bits outside its mask) is in neither; a port
    rule whose range is empty only in the projection.
  - a rule covered by an earlier one in the bucket it would crowd is dropped: every
    packet it could match, in any mode the structure serves, the earlier one matches
    first (port rules are covered only by ip-only rules or by port rules whose ranges
    hold theirs, so hotdrop and fragments give the same first match).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B,
                        BPF_EMIT_CALL, BPF_H, BPF_JMP32_IMM, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG,
                        BPF_LD_MAP_FD, BPF_LDX_MEM, BPF_MOV32_IMM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_STX_MEM,
                        BPF_W, FP, R0, R1, R2, R3, R4, R5, R7, R8, R9, MapRef)
from ..forked import forked
from ..model import Family, Rule
from ..packet import facts
from .runs import RECORD_SIZE, VERDICT_HOTDROP, Classified, Lowered, Masks, TupleSpace

RECORDS = MapRef("classifier_records")
# Records and slot hashes hold 4-byte addresses: IPv6 runs the tuple space cannot take
# stay code.
FAMILIES = (Family.IPV4,)

# A bucket is walked by a loop the verifier unrolls, as often as the tuple's largest
# bucket holds rules: MAX_BUCKET at most. Past BUCKET rules a bucket is crowded: the
# next rule opens a finer tuple if it can.
BUCKET = 4
MAX_BUCKET = 16
# Merged tuples key on these prefix lengths and port block sizes only: a coarse grid
# keeps the tuples few, the bucket check makes up for the bits left out.
ADDR_BITS = (32, 24, 16, 8, 0)
PORT_BITS = (16, 8, 4, 0)
SPREAD_BITS = 16   # an address prefix this long spreads rules well on its own
# Plain code costs ~3.6 ns a rule of this kind, a lookup with its bucket ~30 ns
# (BPF_PROG_TEST_RUN: 3.6 us for 1k rules as code; 12 lookups add 350 ns at 100k): a
# run is merged when it has this many rules a lookup, a margin for the verifier's time
# on code. Shorter runs stay code.
RULES_PER_LOOKUP = 12

# A record: one rule as its bucket check reads it (addresses as the facts hold them).
R_SADDR, R_SMASK, R_DADDR, R_DMASK = 0, 4, 8, 12
R_SPORT, R_DPORT = 16, 20          # u16 lo, u16 hi each
R_PACKED, R_PROTO, R_PMASK, R_PORTS = 24, 28, 29, 30
_RECORD = struct.Struct("<IIIIHHHHIBBBx")
_SLOT = struct.Struct("<II")
# A tuple's slot table has about this many slots per key (so a packet the tuple has no
# key for finds an empty slot but for one time in as many), four to a record.
SLOTS_PER_KEY = 8
SLOT_MIN_BITS, SLOT_MAX_BITS = 2, 22          # log2 of a table's slots
SLOT_SIZE = 8                                 # u32 first record, u32 count
SLOTS_PER_RECORD_BITS = 2
# The hash of a key, per field in _key's order (saddr, daddr, proto, sport, dport): the
# xor of field x multiplier (mod 2^32; odd multipliers below 2^31 fit an instruction's
# immediate), then its top bits.
SLOT_MULTIPLIERS = (0x1E3779B1, 0x45EBCA77, 0x42B2AE3D, 0x27D4EB2F, 0x165667B1)
# R7 during a search: entry << 2 | verdict of the best rule so far (entries are unique,
# so comparing packed values compares entries; a table's blob could not hold 2^30).
PACKED_INF = 0xFFFFFFFF


class Shape(NamedTuple):
    """A merged tuple: how many leading bits of each field its keys hold."""

    src: int
    dst: int
    proto: int     # 0 or 8
    sport: int
    dport: int


class _Member(NamedTuple):
    """A rule as a structure holds it."""

    packed: int
    saddr: int      # little-endian loads of the wire bytes, as facts.SADDR holds them
    smask: int
    daddr: int
    dmask: int
    proto: int
    pmask: int
    sport: tuple[int, int]
    dport: tuple[int, int]
    ports: bool
    profile: Shape  # the finest shape it fits: prefix lengths, port block bits
    record: bytes   # as the bucket check reads it (made with the member: most are used)


class Tuple(NamedTuple):
    masks: Masks    # what the key keeps of each fact
    first: int      # the smallest packed entry of its rules
    width: int      # its largest slot: the walk's bound, all the verifier unrolls
    slots: int      # its slot table's first record (its slots count from there)
    bits: int       # log2 of its slots


@dataclass
class MultiFieldRun(Classified):
    tuples: list[Tuple] = field(default_factory=list)      # first fragments with their
                                                           # header, other protocols
    ip_tuples: list[Tuple] = field(default_factory=list)   # the projection: packets a
                                                           # port match would hotdrop


def _addr_mask(bits: int) -> int:
    return int.from_bytes((0xFFFFFFFF << (32 - bits) & 0xFFFFFFFF).to_bytes(4, "big"), "little")


def _port_mask(bits: int) -> int:
    return 0xFFFF << (16 - bits) & 0xFFFF


ADDR_MASK = {b: _addr_mask(b) for b in range(33)}
PORT_MASK = {b: _port_mask(b) for b in PORT_BITS}


# by the bits [lo, hi] have in common: the most port bits a key may hold for it
_BLOCK_BITS = [next(b for b in PORT_BITS if b <= common) for common in range(17)]


def _block_bits(lo: int, hi: int) -> int:
    return _BLOCK_BITS[16 - (lo ^ hi).bit_length()]


def _floor(bits: int) -> int:
    return next(b for b in ADDR_BITS if b <= bits)


_ANY_PORT = (0, 0xFFFF)


_SHAPES: dict[tuple, Shape] = {}


def _shape(*bits: int) -> Shape:
    """Shape(*bits), shared: every rule's member has one, of few distinct values."""
    shape = _SHAPES.get(bits)
    if shape is None:
        shape = _SHAPES[bits] = Shape(*bits)
    return shape


def _member(*fields) -> _Member:
    return tuple.__new__(_Member, fields)   # _Member(*fields), without its Python __new__


def _ip_member(low: Lowered, packed: int) -> _Member:
    _, saddr, smask, slen, daddr, dmask, dlen, proto, *_ = low
    pmask = 0xFF if proto else 0
    return _member(packed, saddr, smask, daddr, dmask, proto, pmask, _ANY_PORT, _ANY_PORT,
                   False, _shape(slen, dlen, pmask and 8, 0, 0),
                   _RECORD.pack(saddr, smask, daddr, dmask, 0, 0xFFFF, 0, 0xFFFF, packed, proto,
                                pmask, False))


def main_member(low: Lowered, position: int) -> Optional[_Member]:
    """The rule, at `position` in its run, in the main structure (None: not there)."""
    if low.never_matches:
        return None
    ports = low.ports
    if ports is None:
        return _ip_member(low, position << 2 | low.verdict)
    slo, shi, dlo, dhi = ports
    if slo > shi or dlo > dhi:
        return None
    _, saddr, smask, slen, daddr, dmask, dlen, proto, _, verdict, _ = low
    pmask = 0xFF if proto else 0
    packed = position << 2 | verdict
    return _member(packed, saddr, smask, daddr, dmask, proto, pmask, (slo, shi), (dlo, dhi),
                   True, _shape(slen, dlen, pmask and 8, _block_bits(slo, shi),
                                _block_bits(dlo, dhi)),
                   _RECORD.pack(saddr, smask, daddr, dmask, slo, shi, dlo, dhi, packed, proto,
                                pmask, True))


def projection_member(low: Lowered, position: int) -> Optional[_Member]:
    """The rule, at `position` in its run, in the projection (None: not there): its ip
    part, "hotdrop" for a port rule."""
    if low.never_matches:
        return None
    return _ip_member(low, position << 2 | (VERDICT_HOTDROP if low.ports
                                            else low.verdict))


def _fits(shape: Shape, profile: Shape) -> bool:
    return (shape.src <= profile.src and shape.dst <= profile.dst and shape.proto <= profile.proto
            and shape.sport <= profile.sport and shape.dport <= profile.dport)


_SHAPE_MASKS: dict[Shape, tuple] = {}


def _shape_masks(shape: Shape) -> tuple:
    """What its keys keep of each field, in _key's order."""
    masks = _SHAPE_MASKS.get(shape)
    if masks is None:
        masks = _SHAPE_MASKS[shape] = (ADDR_MASK[shape.src], ADDR_MASK[shape.dst],
                                       0xFF if shape.proto else 0, PORT_MASK[shape.sport],
                                       PORT_MASK[shape.dport])
    return masks


def _key(shape: Shape, m: _Member) -> tuple:
    """The key of `m` in tuple `shape` (as add() makes it, inlined)."""
    sm, dm, pm, spm, dpm = _shape_masks(shape)
    return m.saddr & sm, m.daddr & dm, m.proto & pm, m.sport[0] & spm, m.dport[0] & dpm


def slot_index(key: tuple, bits: int) -> int:
    """The slot of a key (_key's fields, masked) in a table of 2**bits, as
    _emit_slot computes it for a packet."""
    h = 0
    for value, multiplier in zip(key, SLOT_MULTIPLIERS):
        h ^= value * multiplier & 0xFFFFFFFF
    return h >> (32 - bits)


def _covers(q: _Member, m: _Member) -> bool:
    """Every packet `m` matches, `q` matches (see the module docstring)."""
    return (q.smask & m.smask == q.smask and m.saddr & q.smask == q.saddr
            and q.dmask & m.dmask == q.dmask and m.daddr & q.dmask == q.daddr
            and q.pmask & m.pmask == q.pmask and m.proto & q.pmask == q.proto
            and (not q.ports or (m.ports and q.sport[0] <= m.sport[0] and m.sport[1] <= q.sport[1]
                                 and q.dport[0] <= m.dport[0] and m.dport[1] <= q.dport[1])))


class _Merged:
    """One structure being built: merged tuples and their buckets."""

    def __init__(self) -> None:
        self.buckets: dict[Shape, dict[tuple, list[_Member]]] = {}
        # profile -> the shapes it fits, with their masks and buckets (add's inner loop)
        self._fitting: dict[Shape, list[tuple[Shape, tuple, dict]]] = {}

    def _shapes_for(self, profile: Shape) -> list[tuple[Shape, tuple, dict]]:
        fitting = self._fitting.get(profile)
        if fitting is None:
            fitting = self._fitting[profile] = [(s, _shape_masks(s), b)
                                                for s, b in self.buckets.items()
                                                if _fits(s, profile)]
        return fitting

    def _open(self, shape: Shape) -> None:
        buckets = self.buckets[shape] = {}
        for profile, fitting in self._fitting.items():
            if _fits(shape, profile):
                fitting.append((shape, _shape_masks(shape), buckets))

    def add(self, m: _Member) -> bool:
        """Place `m` (after every rule before it); False if no bucket can take it."""
        fitting = self._shapes_for(m.profile)
        for _, (sm, dm, pm, spm, dpm), buckets in fitting:
            key = (m.saddr & sm, m.daddr & dm, m.proto & pm, m.sport[0] & spm, m.dport[0] & dpm)
            bucket = buckets.get(key)
            if bucket is None:
                buckets[key] = [m]
                return True
            if len(bucket) < BUCKET:
                bucket.append(m)
                return True
        shapes = [shape for shape, _, _ in fitting]
        crowded = [self.buckets[s][_key(s, m)] for s in shapes]
        if any(_covers(q, m) for bucket in crowded for q in bucket):
            return True
        for shape in self._new_shapes(m.profile):
            if shape not in self.buckets:
                self._open(shape)
                self.buckets[shape][_key(shape, m)] = [m]
                return True
        bucket = min(crowded, key=len)
        if len(bucket) >= MAX_BUCKET:
            return False
        bucket.append(m)
        return True

    @staticmethod
    def _new_shapes(p: Shape) -> tuple[Shape, Shape]:
        """The tuples to open for a rule the existing ones cannot take: the coarse one
        (one long address prefix is spread enough), then its finest grid tuple."""
        fine = Shape(_floor(p.src), _floor(p.dst), p.proto, p.sport, p.dport)
        if max(fine.src, fine.dst) >= SPREAD_BITS:
            coarse = Shape(SPREAD_BITS, 0, 0, 0, 0) if fine.src >= fine.dst \
                else Shape(0, SPREAD_BITS, 0, 0, 0)
            return coarse, fine
        return fine, fine

    def merge_small(self) -> None:
        """Fold tuples into the others where all their rules find room, smallest first:
        a tuple costs every packet a lookup, a bucket rule only the packets hitting it."""
        for shape in sorted(self.buckets, key=lambda s: sum(map(len, self.buckets[s].values()))):
            others = [s for s in self.buckets if s != shape]
            moves = self._rehome([m for b in self.buckets[shape].values() for m in b], others)
            if moves is None:
                continue
            del self.buckets[shape]
            for (target, key), m in moves:
                self.buckets[target].setdefault(key, []).append(m)
            for target, key in {place for place, _ in moves}:
                self.buckets[target][key].sort()
        self._fitting.clear()

    def _rehome(self, rules: list[_Member], shapes: list[Shape]) -> Optional[list]:
        """A bucket with room among `shapes` for each rule, or None."""
        added: dict[tuple, int] = {}
        moves = []
        for m in rules:
            for shape in shapes:
                if _fits(shape, m.profile):
                    place = (shape, _key(shape, m))
                    if len(self.buckets[shape].get(place[1], ())) + added.get(place, 0) < BUCKET:
                        break
            else:
                return None
            added[place] = added.get(place, 0) + 1
            moves.append((place, m))
        return moves

    def layout(self) -> list[tuple[Masks, int, dict[int, list[_Member]]]]:
        """Each tuple's masks, log2 of its slots, and its slots' rules: a table with
        SLOTS_PER_KEY slots a key, larger if keys hashing alike would make a slot
        longer than MAX_BUCKET."""
        out = []
        for shape, buckets in self.buckets.items():
            masks = _shape_masks(shape)
            bits = max(SLOT_MIN_BITS, (len(buckets) * SLOTS_PER_KEY - 1).bit_length())
            while True:
                slots = _slots(buckets, bits)
                if bits == SLOT_MAX_BITS or max(map(len, slots.values())) <= MAX_BUCKET:
                    break
                bits += 1
            out.append((Masks(*masks, 0), bits, slots))
        return out


def _slots(buckets: dict[tuple, list[_Member]], bits: int) -> dict[int, list[_Member]]:
    """The buckets by their keys' slots, those sharing one merged in entry order."""
    slots: dict[int, list[_Member]] = {}
    m0, m1, m2, m3, m4 = SLOT_MULTIPLIERS
    shift = 32 - bits
    for (saddr, daddr, proto, sport, dport), bucket in buckets.items():
        # slot_index(), inlined: the xor of untruncated products truncates alike
        index = ((saddr * m0 ^ daddr * m1 ^ proto * m2 ^ sport * m3 ^ dport * m4)
                 & 0xFFFFFFFF) >> shift
        slot = slots.get(index)
        if slot is None:
            slots[index] = bucket
        else:
            slots[index] = sorted(slot + bucket)   # by entry: the walk stops at a match
    return slots


class _Built(NamedTuple):
    """One structure built over the first `taken` rules of a run, laid out: its
    records (slot tables, then rules) and tuples counting from its first record."""

    taken: int
    lookups: int
    tuples: list[Tuple]
    records: bytes

    @staticmethod
    def main(lows: list[Lowered], base: int) -> "_Built":
        merged, taken = _Merged(), len(lows)
        for at, low in enumerate(lows):
            m = main_member(low, low.entry - base)
            if m is not None and not merged.add(m):
                taken = at
                break
        return _Built.laid_out(merged, taken)

    @staticmethod
    def projection(lows: list[Lowered], base: int) -> "_Built":
        merged, taken = _Merged(), len(lows)
        seen_ip: set[tuple] = set()
        for at, low in enumerate(lows):
            m = projection_member(low, low.entry - base)
            if m is None:
                continue
            ident = m[1:7]
            if ident not in seen_ip:   # only the first rule of an ip part is ever first
                seen_ip.add(ident)
                if not merged.add(m):
                    taken = at
                    break
        return _Built.laid_out(merged, taken)

    @staticmethod
    def laid_out(merged: "_Merged", taken: int) -> "_Built":
        merged.merge_small()
        records = bytearray()
        tuples = []
        for masks, bits, slots in merged.layout():
            at = len(records) // RECORD_SIZE
            table = bytearray(SLOT_SIZE << bits)
            record = 1 << bits >> SLOTS_PER_RECORD_BITS   # the next rule's, from the table
            rules = []
            for index, members in slots.items():
                _SLOT.pack_into(table, index * SLOT_SIZE, record, len(members))
                rules.extend(m.record for m in members)
                record += len(members)
            records += table
            records += b"".join(rules)
            tuples.append(Tuple(masks, min(m[0].packed for m in slots.values()),
                                max(map(len, slots.values())), at, bits))
        return _Built(taken, len(merged.buckets), sorted(tuples, key=lambda t: t.first),
                      bytes(records))

    def placed(self, first_record: int) -> list[Tuple]:
        """Its tuples, its records placed from `first_record` on."""
        return [t._replace(slots=t.slots + first_record) for t in self.tuples]


# A run this long builds its projection in a child process, beside the main structure
# (fork: the child shares the run's rules as they are); shorter ones do not pay the fork.
PARALLEL_MIN = 20000


class Plan:
    """The structures for the longest prefix of a run they can take: `rules`."""

    def __init__(self, lows: list[Lowered], by_entry: dict[int, Rule]):
        base = lows[0].entry
        if len(lows) >= PARALLEL_MIN:
            with forked(_Built.projection, lows, base) as projection:
                main = _Built.main(lows, base)
            projection = projection.result()
        else:
            main, projection = _Built.main(lows, base), _Built.projection(lows, base)
        taken = min(main.taken, projection.taken)
        # a structure that took more than the other is built again for the rules both took
        if main.taken > taken:
            main = _Built.main(lows[:taken], base)
        if projection.taken > taken:
            projection = _Built.projection(lows[:taken], base)
        self.main, self.projection = main, projection
        self.rules = [by_entry[low.entry] for low in lows[:taken]]

    def pays(self) -> bool:
        """Whether the lookups cost less than walking the rules (RULES_PER_LOOKUP)."""
        lookups = max(self.main.lookups, self.projection.lookups, 1)
        return len(self.rules) >= RULES_PER_LOOKUP * lookups

    def commit(self, space: TupleSpace, cut_by: Optional[Rule]) -> MultiFieldRun:
        """The run, its records allocated in `space`; `cut_by` is the rule it could
        not take, if any."""
        records = self.main.records + self.projection.records
        run = MultiFieldRun(self.rules, {}, bytearray(records),
                            space.record_slots(len(records) // RECORD_SIZE), cut_by)
        run.tuples = self.main.placed(run.record_base)
        run.ip_tuples = self.projection.placed(run.record_base
                                               + len(self.main.records) // RECORD_SIZE)
        return run


def emit_search(asm: Assembler, tuples: list[Tuple], tuple_fp: int, decide) -> None:
    """R7 = the first entry (INF if none) and R8 its verdict over the tuples' buckets,
    then to `decide`. Uses the stack at `tuple_fp` for record indices."""
    done = asm.label("mf_done")
    asm.emit(BPF_MOV32_IMM(R7, PACKED_INF))
    for t in tuples:
        next_tuple, loop = asm.label("mf_next"), asm.label("mf_loop")
        # Tuples come by their first rule: once the best precedes it, it precedes all.
        asm.emit(BPF_JMP32_IMM(I.BPF_JLT, R7, t.first, done))
        _emit_slot(asm, t, tuple_fp, next_tuple)
        asm.emit(BPF_MOV64_IMM(R9, 0))
        asm.place(loop)
        # R8: the slot (u32 first record from the table's, u32 count); R9: records walked
        asm.emit(BPF_JMP_IMM(I.BPF_JGE, R9, t.width, next_tuple),
                 BPF_LDX_MEM(BPF_W, R1, R8, 4),
                 BPF_JMP_REG(I.BPF_JGE, R9, R1, next_tuple),
                 BPF_LDX_MEM(BPF_W, R1, R8, 0), BPF_ALU64_REG(I.BPF_ADD, R1, R9),
                 BPF_ALU64_IMM(I.BPF_ADD, R1, t.slots),
                 BPF_STX_MEM(BPF_W, FP, R1, tuple_fp),
                 BPF_ALU64_IMM(I.BPF_ADD, R9, 1),
                 BPF_LD_MAP_FD(R1, RECORDS),
                 BPF_MOV64_REG(R2, FP), BPF_ALU64_IMM(I.BPF_ADD, R2, tuple_fp),
                 BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
                 BPF_JMP_IMM(I.BPF_JEQ, R0, 0, next_tuple),
                 # records are sorted by entry: none after this one can beat the best
                 BPF_LDX_MEM(BPF_W, R3, R0, R_PACKED),
                 BPF_JMP_REG(I.BPF_JGE, R3, R7, next_tuple))
        _emit_record_test(asm, loop)
        asm.emit(BPF_MOV64_REG(R7, R3))
        asm.place(next_tuple)
    asm.place(done)
    asm.emit(BPF_JMP32_IMM(I.BPF_JEQ, R7, PACKED_INF, decide),
             BPF_MOV64_REG(R8, R7), BPF_ALU32_IMM(I.BPF_AND, R8, 3),
             BPF_ALU32_IMM(I.BPF_RSH, R7, 2), BPF_JMP_A(decide))


def _emit_slot(asm: Assembler, t: Tuple, tuple_fp: int, missing) -> None:
    """R8 = the packet's slot in t's table (slot_index), or to `missing` (never: its
    index is in the table, but the verifier wants the check)."""
    m = t.masks
    asm.emit(BPF_MOV32_IMM(R8, 0))
    for fact, size, mask, full, multiplier in zip(
            (facts.SADDR, facts.DADDR, facts.PROTO, facts.SPORT, facts.DPORT),
            (BPF_W, BPF_W, BPF_B, BPF_H, BPF_H),
            (m.saddr, m.daddr, m.proto, m.sport, m.dport),
            (0xFFFFFFFF, 0xFFFFFFFF, 0xFF, 0xFFFF, 0xFFFF), SLOT_MULTIPLIERS):
        if not mask:
            continue
        asm.emit(BPF_LDX_MEM(size, R1, I.R6, fact))
        if mask != full:
            asm.emit(BPF_ALU32_IMM(I.BPF_AND, R1, mask))
        asm.emit(BPF_ALU32_IMM(I.BPF_MUL, R1, multiplier), BPF_ALU32_REG(I.BPF_XOR, R8, R1))
    # the slot's record: the table's first + slot / 4; its place there: slot % 4
    asm.emit(BPF_ALU32_IMM(I.BPF_RSH, R8, 32 - t.bits),
             BPF_MOV64_REG(R1, R8), BPF_ALU32_IMM(I.BPF_RSH, R1, SLOTS_PER_RECORD_BITS),
             BPF_ALU32_IMM(I.BPF_ADD, R1, t.slots), BPF_STX_MEM(BPF_W, FP, R1, tuple_fp),
             BPF_LD_MAP_FD(R1, RECORDS),
             BPF_MOV64_REG(R2, FP), BPF_ALU64_IMM(I.BPF_ADD, R2, tuple_fp),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, missing),
             BPF_ALU32_IMM(I.BPF_AND, R8, (1 << SLOTS_PER_RECORD_BITS) - 1),
             BPF_ALU32_IMM(I.BPF_MUL, R8, SLOT_SIZE), BPF_ALU64_REG(I.BPF_ADD, R8, R0))


def _emit_record_test(asm: Assembler, mismatch) -> None:
    """Fall through if the record at R0 matches the packet, else to `mismatch`: the
    ip part, and for a port rule a first fragment with ports in its ranges. One
    branch: the verifier keeps every untaken branch of the walk pending (up to 8192)."""
    asm.emit(BPF_MOV64_IMM(R1, 0))
    for fact, value, mask, size in ((facts.SADDR, R_SADDR, R_SMASK, BPF_W),
                                    (facts.DADDR, R_DADDR, R_DMASK, BPF_W),
                                    (facts.PROTO, R_PROTO, R_PMASK, BPF_B)):
        asm.emit(BPF_LDX_MEM(size, R2, I.R6, fact), BPF_LDX_MEM(size, R4, R0, mask),
                 BPF_ALU64_REG(I.BPF_AND, R2, R4), BPF_LDX_MEM(size, R4, R0, value),
                 BPF_ALU64_REG(I.BPF_XOR, R2, R4), BPF_ALU64_REG(I.BPF_OR, R1, R2))
    # R2 = 1 if the ports fail: a later fragment (0 - fragoff < 0), or a port outside
    # its range (u16 differences, negative exactly when a bound is crossed)
    asm.emit(BPF_LDX_MEM(BPF_H, R4, I.R6, facts.FRAGOFF), BPF_MOV64_IMM(R2, 0),
             BPF_ALU64_REG(I.BPF_SUB, R2, R4))
    for fact, bounds in ((facts.SPORT, R_SPORT), (facts.DPORT, R_DPORT)):
        asm.emit(BPF_LDX_MEM(BPF_H, R5, I.R6, fact),
                 BPF_LDX_MEM(BPF_H, R4, R0, bounds), BPF_ALU64_REG(I.BPF_SUB, R5, R4),
                 BPF_ALU64_REG(I.BPF_OR, R2, R5),
                 BPF_LDX_MEM(BPF_H, R4, R0, bounds + 2), BPF_LDX_MEM(BPF_H, R5, I.R6, fact),
                 BPF_ALU64_REG(I.BPF_SUB, R4, R5), BPF_ALU64_REG(I.BPF_OR, R2, R4))
    asm.emit(BPF_ALU64_IMM(I.BPF_RSH, R2, 63), BPF_LDX_MEM(BPF_B, R4, R0, R_PORTS),
             BPF_ALU64_REG(I.BPF_AND, R2, R4), BPF_ALU64_REG(I.BPF_OR, R1, R2),
             BPF_JMP_IMM(I.BPF_JNE, R1, 0, mismatch))
