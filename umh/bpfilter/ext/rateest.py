"""-j RATEEST and -m rateest (struct xt_rateest_target_info and xt_rateest_match_info,
revision 0, both families), as net/netfilter/xt_RATEEST.c, xt_rateest.c and
net/core/gen_estimator.c have them.

With bpfilter.ko: the kernel's own (ext/xtmatch.py), on the kernel's estimators.

Without it (`bpfilter serve`): the estimators are the service's (rateests.py), kept as
xt_RATEEST keeps its own: one per name in a namespace, both families' rules sharing
it, made by the first RATEEST rule to name it with that rule's interval and EWMA
weight (a later rule naming it must give the same: EINVAL otherwise, and so does one
giving neither), going with the last rule, target or match, that names it. A
RATEEST rule adds the packet's length and one packet to its estimator's counters,
under its lock, as xt_rateest_tg(); every interval the service's timer folds them
into the averages as est_timer() does (the same shifts, on HZ's quarter of a second);
a rateest rule reads the averages (gen_estimator_read(): each >> 8) and compares
them as xt_rateest_mt(). A rateest rule naming an estimator no earlier rule of the
namespace made is refused (ENOENT), as the kernel's checkentry refuses it.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from construct import Bytes, Int8sn, Int8un, Int16un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_DW, BPF_EMIT_CALL, BPF_JMP_A,
                        BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_IMM64, BPF_LD_MAP_FD, BPF_LDX_MEM,
                        BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W, MapRef,
                        R0, R1, R2, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import ExtensionTarget, Match, Table
from ..packet import facts
from ..packet.primitives import emit_answer_and_hotdrop, emit_skip_if_decided
from . import BOTH_FAMILIES, register_match, register_target
from .xtmatch import ServedKernelMatch, ServedKernelTarget, c_string

IFNAMSIZ = 16

xt_rateest_match_info = Struct("name1" / Bytes(IFNAMSIZ), "name2" / Bytes(IFNAMSIZ),
                               "flags" / Int16un, "mode" / Int16un, "bps1" / Int32un,
                               "pps1" / Int32un, "bps2" / Int32un, "pps2" / Int32un, Padding(4),
                               "_est1" / Bytes(8), "_est2" / Bytes(8))
xt_rateest_target_info = Struct("name" / Bytes(IFNAMSIZ), "interval" / Int8sn,
                                "ewma_log" / Int8un, Padding(6), "_est" / Bytes(8))

XT_RATEEST_MATCH_INVERT, XT_RATEEST_MATCH_ABS, XT_RATEEST_MATCH_REL = 1 << 0, 1 << 1, 1 << 2
XT_RATEEST_MATCH_DELTA, XT_RATEEST_MATCH_BPS, XT_RATEEST_MATCH_PPS = 1 << 3, 1 << 4, 1 << 5
XT_RATEEST_MATCH_EQ, XT_RATEEST_MATCH_LT, XT_RATEEST_MATCH_GT = 1, 2, 3
_COMPARE = {XT_RATEEST_MATCH_EQ: I.BPF_JEQ, XT_RATEEST_MATCH_LT: I.BPF_JLT,
            XT_RATEEST_MATCH_GT: I.BPF_JGT}

_WHY = "RATEEST and rateest rules without bpfilter.ko need the service's estimators " \
       "(bpfilter serve has them)"
# key: (netns inode, name); value: the lock, bytes, packets (the target's, the timer reads)
RATEEST_COUNTERS = MapRef("rateest_counters", _WHY)
# same key; value: avbps, avpps (the timer's, written whole, which the match reads)
RATEEST_RATES = MapRef("rateest_rates", _WHY)
KEY = struct.Struct(f"<I4x{IFNAMSIZ}s")
COUNTERS = struct.Struct("<I4xQQ")
RATES = struct.Struct("<QQ")
C_BYTES, C_PACKETS = 8, 16

_KEY = facts.reserve("rateest", KEY.size)


def _name(raw: bytes, where: str) -> str:
    if b"\0" not in raw:
        raise BpfilterError(errno.ENAMETOOLONG, f"{where}: the estimator's name is not "
                                                f"NUL-terminated within {IFNAMSIZ} bytes")
    return c_string(raw)


@dataclass(frozen=True)
class ServedRateestTarget(ExtensionTarget):
    est: str
    interval: int
    ewma_log: int
    name = "RATEEST"
    revision = 0


@dataclass(frozen=True)
class ServedRateestMatch(Match):
    est1: str
    est2: str
    flags: int
    mode: int
    bps1: int
    pps1: int
    bps2: int
    pps2: int
    name = "rateest"
    revision = 0

    @property
    def estimators(self) -> tuple[str, ...]:
        return (self.est1, self.est2) if self.flags & XT_RATEEST_MATCH_REL else (self.est1,)


def _emit_key(asm, est: str) -> None:
    """The estimator's key at the facts' scratch: the hook's namespace, the name."""
    raw = est.encode("latin-1").ljust(IFNAMSIZ, b"\0")
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.NETNS), BPF_STX_MEM(BPF_W, R6, R1, _KEY),
             BPF_ST_MEM(BPF_W, R6, _KEY + 4, 0))
    for off in range(0, IFNAMSIZ, 4):
        asm.emit(BPF_ST_MEM(BPF_W, R6, _KEY + 8 + off, int.from_bytes(raw[off:off + 4], "little")))


def _emit_lookup(asm, ref: MapRef, est: str) -> None:
    _emit_key(asm, est)
    asm.emit(BPF_LD_MAP_FD(R1, ref), BPF_MOV64_REG(R2, R6), BPF_ALU64_IMM(I.BPF_ADD, R2, _KEY),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem))


@register_target
class Rateest(ServedKernelTarget):
    name = "RATEEST"
    revision = 0
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_rateest_target_info
    why = "which feeds the kernel's rate estimators"
    served_model = ServedRateestTarget
    served_facts = frozenset({"skb", "rateest"})
    environment = (RATEEST_COUNTERS,)

    def served(self, payload: bytes, ip, where: str) -> ServedRateestTarget:
        p = self.struct.parse(payload)
        # the rest of xt_rateest_tg_checkentry() needs the namespace's estimators:
        # rateests.py, when the table is about to be loaded
        return ServedRateestTarget(_name(p.name, f"{where}: RATEEST"), p.interval, p.ewma_log)

    def describe(self, target) -> str:
        f = self.fields_of(target)
        return f"name {f['est'] if 'est' in f else c_string(f['name'])}"

    def emit_served(self, target: ServedRateestTarget, asm, next_rule) -> None:
        """xt_rateest_tg(): the length and a packet added under the estimator's lock;
        the rule goes on (XT_CONTINUE). Its estimator outlives the rule's table, so
        is always there."""
        done = asm.label("rateest_counted")
        _emit_lookup(asm, RATEEST_COUNTERS, target.est)
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, 0, done), BPF_MOV64_REG(R7, R0),
                 BPF_MOV64_REG(R1, R7), BPF_EMIT_CALL(I.BPF_FUNC_spin_lock),
                 BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN),
                 BPF_LDX_MEM(BPF_DW, R2, R7, C_BYTES), BPF_ALU64_REG(I.BPF_ADD, R2, R1),
                 BPF_STX_MEM(BPF_DW, R7, R2, C_BYTES),
                 BPF_LDX_MEM(BPF_DW, R2, R7, C_PACKETS), BPF_ALU64_IMM(I.BPF_ADD, R2, 1),
                 BPF_STX_MEM(BPF_DW, R7, R2, C_PACKETS),
                 BPF_MOV64_REG(R1, R7), BPF_EMIT_CALL(I.BPF_FUNC_spin_unlock))
        asm.place(done)


@register_match
class RateestMatch(ServedKernelMatch):
    name = "rateest"
    revision = 0
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_rateest_match_info
    why = "whose estimators the kernel's RATEEST rules feed"
    served_model = ServedRateestMatch
    served_facts = frozenset({"skb", "rateest"})
    environment = (RATEEST_RATES,)

    def served(self, payload: bytes, where: str) -> ServedRateestMatch:
        p = self.struct.parse(payload)
        where = f"{where}: rateest"
        # xt_rateest_mt_checkentry(), but for the lookups (rateests.py)
        if bin(p.flags & (XT_RATEEST_MATCH_ABS | XT_RATEEST_MATCH_REL)).count("1") != 1:
            raise BpfilterError(errno.EINVAL, f"{where}: one of an absolute or a relative "
                                              f"comparison must be asked")
        if not p.flags & (XT_RATEEST_MATCH_BPS | XT_RATEEST_MATCH_PPS):
            raise BpfilterError(errno.EINVAL, f"{where}: neither bytes nor packets compared")
        if p.mode not in _COMPARE:
            raise BpfilterError(errno.EINVAL, f"{where}: unknown comparison {p.mode}")
        return ServedRateestMatch(_name(p.name1, where), _name(p.name2, where), p.flags,
                                  p.mode, p.bps1, p.pps1, p.bps2, p.pps2)

    def describe(self, m) -> str:
        f = self.fields_of(m)
        if "est1" in f:
            names = [f["est1"]] + ([f["est2"]] if f["flags"] & XT_RATEEST_MATCH_REL else [])
        else:
            names = [c_string(f["name1"])] + ([c_string(f["name2"])] if f["name2"][0] else [])
        return "rateest " + " ".join(names)

    def emit_served(self, m: ServedRateestMatch, asm, out) -> None:
        """xt_rateest_mt(): R7, R8 the first sample's bps and pps (less the rule's
        figures with --rateest-delta), R9, R0 the second's or the rule's; R2 the
        answer."""
        done = asm.label("rateest_done")
        delta = bool(m.flags & XT_RATEEST_MATCH_DELTA)
        emit_skip_if_decided(asm, done)
        self._emit_sample(asm, m.est1, R7, R8, delta, m.bps1, m.pps1)
        if m.flags & XT_RATEEST_MATCH_ABS:
            asm.emit(*BPF_LD_IMM64(R9, m.bps2), *BPF_LD_IMM64(R0, m.pps2))
        else:
            self._emit_sample(asm, m.est2, R9, R0, delta, m.bps2, m.pps2)
        asm.emit(BPF_MOV64_IMM(R2, 1))
        for flag, first, second in ((XT_RATEEST_MATCH_BPS, R7, R9),
                                    (XT_RATEEST_MATCH_PPS, R8, R0)):
            if m.flags & flag:
                holds = asm.label("rateest_holds")
                asm.emit(BPF_JMP_REG(_COMPARE[m.mode], first, second, holds),
                         BPF_MOV64_IMM(R2, 0))
                asm.place(holds)
        if m.flags & XT_RATEEST_MATCH_INVERT:
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R2, 1))
        emit_answer_and_hotdrop(asm, R2)
        asm.place(done)

    @staticmethod
    def _emit_sample(asm, est: str, bps: int, pps: int, delta: bool, rule_bps: int,
                     rule_pps: int) -> None:
        """`bps`, `pps` = gen_estimator_read() of `est` (none: 0, as the kernel's
        zeroed sample), with --rateest-delta the rule's figure less it, down to 0."""
        found, read = asm.label("rateest_found"), asm.label("rateest_read")
        _emit_lookup(asm, RATEEST_RATES, est)
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, found),
                 BPF_MOV64_IMM(bps, 0), BPF_MOV64_IMM(pps, 0), BPF_JMP_A(read))
        asm.place(found)
        # (pps may be R0: read last)
        asm.emit(BPF_LDX_MEM(BPF_DW, bps, R0, 0), BPF_LDX_MEM(BPF_DW, pps, R0, 8),
                 BPF_ALU64_IMM(I.BPF_RSH, bps, 8), BPF_ALU64_IMM(I.BPF_RSH, pps, 8))
        asm.place(read)
        if not delta:
            return
        for reg, figure in ((bps, rule_bps), (pps, rule_pps)):
            above, next_ = asm.label("rateest_above"), asm.label("rateest_delta")
            asm.emit(*BPF_LD_IMM64(R1, figure),
                     BPF_JMP_REG(I.BPF_JGT, reg, R1, above),
                     BPF_ALU64_REG(I.BPF_SUB, R1, reg), BPF_MOV64_REG(reg, R1),
                     BPF_JMP_A(next_))
            asm.place(above)
            asm.emit(BPF_MOV64_IMM(reg, 0))
            asm.place(next_)


@dataclass(frozen=True)
class Checked:
    """What one rule asks of the namespace's estimators, in the order the kernel's
    translate_table() checks it: a match's lookups, or a target's making."""
    where: str
    names: tuple[str, ...]            # a match's
    target: "ServedRateestTarget | None" = None


def served_estimators(table: Table) -> list[Checked]:
    """Every served RATEEST target and rateest match of `table`, in entry order, each
    rule's matches before its target (the kernel's check order)."""
    found = []
    served = (ServedRateestMatch, ServedRateestTarget)
    rules = sorted(((rule, chain.name, position) for chain in table.chains.values()
                    for position, rule in enumerate(chain.rules, 1)
                    if isinstance(rule.target, ServedRateestTarget)
                    or any(isinstance(m, served) for m in rule.matches)),
                   key=lambda found: found[0].entry)
    for rule, chain, position in rules:
        where = f"chain {chain} rule {position} (entry {rule.entry})"
        for m in rule.matches:
            if isinstance(m, ServedRateestMatch):
                found.append(Checked(f"{where}: rateest", m.estimators))
        if isinstance(rule.target, ServedRateestTarget):
            found.append(Checked(f"{where}: RATEEST", (), rule.target))
    return found


def named_estimators(table: Table) -> set[str]:
    """The estimators `table`'s served rules hold (xt_rateest_put() when they go)."""
    return {name for checked in served_estimators(table)
            for name in (checked.names or (checked.target.est,))}
