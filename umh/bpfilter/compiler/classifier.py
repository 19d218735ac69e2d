"""Long runs of simple rules, classified by a tuple space search instead of a walk.

Where it applies (chosen per run of a chain, see `segments`): a run is a maximal
sequence of consecutive rules, each
  - with a final verdict (ACCEPT or DROP),
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
found is the kernel's first match.

Replaces: iptables sends the whole table for every command, and most commands change
one rule. Runs of the ruleset in place whose rules come again are taken over, their
keys and records already in the maps the table's rulesets share (EarlierRuns,
loader.ClassifierMaps): an append to a 100k-rule chain classifies one rule.

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
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_ALU32_IMM, BPF_B, BPF_DW, BPF_H, BPF_LDX_MEM, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, FP, R1, R6, R9, MapRef)
from ..model import IpHeader, Rule
from ..packet import facts
from . import multifield
from .runs import (VERDICT_HOTDROP, Classified, Lowered, Masks, TupleSpace, eligible, lower,
                   port_blocks, same_rule)

MIN_RUN = 16
# Runs of the ruleset being replaced are taken over from this size (EarlierRuns).
TAKEOVER_MIN = 256
# A run is classified only when its lookups are few and far fewer than its rules: a
# lookup costs about what a dozen compares do, and each one adds paths the verifier
# walks. Runs of varied prefixes and port ranges (more tuples than rules) stay code.
MAX_TUPLES = 32
RULES_PER_TUPLE = 4

# The hash map of every run's keys (the tuple space's and multifield's).
MAP = MapRef("classifier")
# The lookup key, as built on the stack.
KEY_SIZE = 24
K_TUPLE, K_SADDR, K_DADDR, K_SPORT, K_DPORT, K_PROTO, K_L4 = 0, 4, 8, 12, 14, 16, 17
VALUE_SIZE = 8   # u32 entry, u32 verdict


@dataclass
class Run(Classified):
    tuples: list[tuple[int, Masks]] = field(default_factory=list)        # (id, masks)
    ip_tuples: list[tuple[int, Masks]] = field(default_factory=list)     # projection


Segment = Union[Rule, Run, "multifield.MultiFieldRun"]


def segments(rules: list[Rule], space: "TupleSpace",
             earlier: "Optional[EarlierRuns]" = None) -> list[Segment]:
    """The chain's rules, with runs worth classifying grouped (their keys and records
    allocated in `space`). A run ends where a rule is not eligible or would take the
    run past MAX_TUPLES lookups. Consecutive runs too short or too varied for the
    tuple space are pooled for multifield; what it does not take stays code. Runs of
    the ruleset being replaced whose rules come again are taken over (`earlier`)."""
    out: list[Segment] = []
    run: list[Lowered] = []
    tuples: dict[tuple, frozenset] = {}   # the run's, as rule_tuples() factors them
    count = 0
    pooled: list[Lowered] = []
    by_entry = {rule.entry: rule for rule in rules}

    def flush(cut_by: Optional[Rule] = None) -> None:
        nonlocal run, count
        classified = tuple_space_run(space, run, by_entry, cut_by) if len(run) >= MIN_RUN else None
        if classified:
            flush_pooled()
            out.append(classified)
        else:
            pooled.extend(run)
        run = []
        tuples.clear()
        count = 0

    def flush_pooled() -> None:
        rest = pooled[:]
        pooled.clear()
        while len(rest) >= MIN_RUN:
            plan = multifield.Plan(rest, by_entry)
            taken = len(plan.rules)
            if plan.pays():
                out.append(plan.commit(space, by_entry[rest[taken].entry]
                                       if taken < len(rest) else None))
            else:
                out.extend(plan.rules)
            rest = rest[taken:]
        out.extend(by_entry[low.entry] for low in rest)

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
        addr, ports = rule_tuples(low)
        known = tuples.get(addr)
        new = len(ports) if known is None else 0 if ports <= known else len(ports - known)
        if new and count + new > MAX_TUPLES:
            flush(cut_by=rule)
            known, new = None, len(ports)
        run.append(low)
        if new:
            tuples[addr] = ports if known is None else known | ports
        count += new
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


def rule_tuples(low: Lowered) -> tuple[tuple, frozenset]:
    """The tuples of rule_keys(low), factored: the address and protocol masks, and the
    (sport mask, dport mask, l4, ip_only) they come with. Cheaper than making the keys,
    which a run too varied for the tuple space never needs; those of a rule that can
    never match are counted too."""
    return (low.smask, low.dmask, bool(low.proto)), _port_tuples(low.ports)


@functools.lru_cache(maxsize=1 << 16)
def _port_tuples(ranges: Optional[tuple]) -> frozenset:
    if ranges is None:
        return frozenset(((0, 0, 0, False), (0, 0, 0, True)))
    return frozenset([(spm, dpm, 1, False) for _, spm in port_blocks(*ranges[:2])
                      for _, dpm in port_blocks(*ranges[2:])] + [(0, 0, 0, True)])


def rule_keys(low: Lowered):
    """(masks, key fields, entry, verdict) of every key a rule puts in its run's tuples,
    its ip projection included; nothing for a rule the kernel can never match."""
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
    yield Masks(smask, dmask, pmask, 0, 0, 0, ip_only=True), \
        (saddr, daddr, 0, 0, proto, 0), low.entry, \
        VERDICT_HOTDROP if ports is not None else low.verdict


def tuple_space_run(space: TupleSpace, lows: list[Lowered], by_entry: dict[int, Rule],
                    cut_by: Optional[Rule]) -> Optional[Run]:
    """The run of these rules (`by_entry` has them) classified by its keys in `space`,
    if that pays (see MAX_TUPLES)."""
    groups: dict[Masks, list] = {}
    base = lows[0].entry
    for low in lows:
        for masks, fields, entry, verdict in rule_keys(low):
            groups.setdefault(masks, []).append((fields, entry - base, verdict))
    if len(groups) > MAX_TUPLES or len(groups) * RULES_PER_TUPLE > len(lows):
        return None
    run = Run([by_entry[low.entry] for low in lows], {}, bytearray(), 0, cut_by)
    for masks, members in groups.items():
        tid = space.new_tid()
        (run.ip_tuples if masks.ip_only else run.tuples).append((tid, masks))
        for fields, entry, verdict in members:
            key = _key(tid, *fields)
            if key not in run.keys or run.keys[key][0] > entry:
                run.keys[key] = (entry, verdict)
    return run


# _key(tid, saddr, daddr, sport, dport, proto, l4), laid out as the K_* offsets say
_key = struct.Struct("<IIIHHBB6x").pack


def emit_key(asm: Assembler, tuple_fp: int, tid: int, masks: Masks) -> None:
    """The key of tuple `tid` for the packet (R6 = &facts) at `tuple_fp`; its l4 byte is
    R9 if the tuple keeps it."""
    asm.emit(BPF_ST_MEM(BPF_W, FP, tuple_fp + K_TUPLE, tid))
    fields = ((facts.SADDR, BPF_W, K_SADDR, masks.saddr, 0xFFFFFFFF),
              (facts.DADDR, BPF_W, K_DADDR, masks.daddr, 0xFFFFFFFF),
              (facts.SPORT, BPF_H, K_SPORT, masks.sport, 0xFFFF),
              (facts.DPORT, BPF_H, K_DPORT, masks.dport, 0xFFFF))
    for fact, size, key_off, mask, full in fields:
        if not mask:
            asm.emit(BPF_ST_MEM(size, FP, tuple_fp + key_off, 0))
            continue
        asm.emit(BPF_LDX_MEM(size, R1, R6, fact))
        if mask != full:
            asm.emit(BPF_ALU32_IMM(I.BPF_AND, R1, mask))
        asm.emit(BPF_STX_MEM(size, FP, R1, tuple_fp + key_off))
    # proto, l4 and the padding
    asm.emit(BPF_ST_MEM(BPF_DW, FP, tuple_fp + K_PROTO, 0))
    if masks.proto:
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.PROTO),
                 BPF_STX_MEM(BPF_B, FP, R1, tuple_fp + K_PROTO))
    if masks.l4:
        asm.emit(BPF_STX_MEM(BPF_B, FP, R9, tuple_fp + K_L4))
