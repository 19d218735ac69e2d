"""-m statistic: --mode random --probability P, --mode nth --every N --packet P
(struct xt_statistic_info, revision 0), as net/netfilter/xt_statistic.c does them.

random: (get_random_u32() & 0x7FFFFFFF) < probability, bpf_get_prandom_u32() for the
kernel's generator: the same distribution, no packet-by-packet equality to be had.

nth: the kernel keeps a counter per match (its xt_statistic_priv, made by checkentry
with every table load, starting at the payload's count) and moves it, for each packet
reaching the match, to 0 after `every` and one up otherwise, matching when it comes to
0. Here each match has a 64-bit counter of the packets that reached it (made afresh
with every load); the k-th packet's value of the kernel's counter is
(count + k) mod (every + 1), which a fetch-and-add gives each packet once, however
many CPUs race, as the kernel's cmpxchg loop does. (iptables sets count below every;
a payload whose count is not is refused: the kernel's counter would run up to 2^32
first.)

Earlier tests of the rule gate the counter, as ipt_do_table() stops at the first
match that fails.
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import Optional

from construct import Int16ul, Int32ul, Int64ul, Struct

from ..bpf import insn as I
from ..bpf import syscall as bpf
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_ATOMIC_OP, BPF_DW, BPF_EMIT_CALL,
                        BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_IMM64, BPF_MOV64_IMM,
                        BPF_MOV64_REG, MapRef, R0, R1, R2, R8)
from ..errors import BpfilterError
from ..model import Match, Table
from ..packet import facts
from ..packet.primitives import (HOTDROP, MISMATCH, emit_const, emit_skip_if_decided,
                                 emit_state_lookup)
from . import BOTH_FAMILIES, MatchExtension, keyed_matches, match_key, register_match

XT_STATISTIC_MODE_RANDOM, XT_STATISTIC_MODE_NTH = 0, 1
XT_STATISTIC_INVERT = 0x1

xt_statistic_info = Struct(
    "mode" / Int16ul,
    "flags" / Int16ul,
    "every" / Int32ul,      # u.random.probability in random mode
    "packet" / Int32ul,
    "count" / Int32ul,
    "master" / Int64ul,     # kernel-private
)

COUNTERS = MapRef("statistic_nth")
KEY = struct.Struct("<Q")          # entry << 32 | the match's position in the rule
_KEY = facts.reserve("statistic", KEY.size)


@dataclass(frozen=True)
class StatisticMatch(Match):
    mode: int
    invert: bool
    probability: int    # random
    every: int          # nth
    count: int
    packet: int         # only listed: the counter starts at count
    name = "statistic"
    revision = 0


@register_match
class Statistic(MatchExtension):
    name = "statistic"
    families = BOTH_FAMILIES
    family_independent = True   # xt_statistic registers for NFPROTO_UNSPEC
    struct = xt_statistic_info
    facts = frozenset({"statistic"})

    def decode(self, payload: bytes, where: str) -> StatisticMatch:
        mode, flags, every, packet, count, _master = self.packed.unpack_from(payload)
        # statistic_mt_check()
        if mode > XT_STATISTIC_MODE_NTH or flags & ~XT_STATISTIC_INVERT:
            raise BpfilterError(errno.EINVAL, f"{where}: statistic: mode {mode}, flags "
                                              f"{flags:#x}")
        return StatisticMatch(mode, bool(flags & XT_STATISTIC_INVERT), every, every, count,
                              packet)

    def unsupported(self, m: StatisticMatch) -> Optional[str]:
        if m.mode == XT_STATISTIC_MODE_NTH and m.count > m.every:
            return (f"--mode nth with a counter ({m.count}) past --every ({m.every}), which "
                    "iptables never writes")
        return None

    def table_maps(self, table: Table) -> dict[MapRef, int]:
        keys = [key for key, m in keyed_matches(table, StatisticMatch)
                if m.mode == XT_STATISTIC_MODE_NTH]
        if not keys:
            return {}
        # the kernel's counters start afresh with every load (checkentry)
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_HASH, KEY.size, 8, len(keys), f"{table.name}_nth")
        try:
            bpf.map_update_batch(fd, b"".join(KEY.pack(k) for k in keys), bytes(8 * len(keys)),
                                 len(keys))
        except BaseException:
            os.close(fd)
            raise
        return {COUNTERS: fd}

    def describe(self, m: StatisticMatch) -> str:
        bang = "! " if m.invert else ""
        if m.mode == XT_STATISTIC_MODE_RANDOM:
            return f"statistic mode random {bang}probability {m.probability / 0x80000000:.11f}"
        packet = f" packet {m.packet}" if m.packet else ""
        return f"statistic mode nth {bang}every {m.every + 1}{packet}"

    def emit(self, m: StatisticMatch, asm, out) -> None:
        """R0 = 1 when the statistic does not make the match hold (before the
        invert), then MISMATCH = R0: the helpers it calls take MISMATCH and HOTDROP
        with them, so the code runs only when both are 0 (the kernel stops at the
        first match that fails, and neither draws nor counts then)."""
        skip, decided = asm.label("statistic_skip"), asm.label("statistic_decided")
        emit_skip_if_decided(asm, skip)
        if m.mode == XT_STATISTIC_MODE_RANDOM:
            asm.emit(BPF_EMIT_CALL(I.BPF_FUNC_get_prandom_u32),
                     BPF_ALU64_IMM(I.BPF_AND, R0, 0x7FFFFFFF), BPF_MOV64_REG(R2, R0))
            emit_const(asm, R1, m.probability)   # a template's Hole, or the number
            asm.emit(BPF_MOV64_IMM(R0, 0),
                     BPF_JMP_REG(I.BPF_JLT, R2, R1, decided), BPF_MOV64_IMM(R0, 1))
        else:
            found = asm.label("statistic_found")
            emit_state_lookup(asm, COUNTERS, match_key(out.rule, m), _KEY)
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, found),
                     # no counter (the loader makes one for each): fail closed
                     BPF_MOV64_IMM(R0, 1), BPF_JMP_IMM(I.BPF_JA, 0, 0, decided))
            asm.place(found)
            # the packets before this one, k - 1; the kernel's counter is (count + k)
            # mod (every + 1), and the match holds when that is 0
            asm.emit(BPF_MOV64_IMM(R1, 1),
                     BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD | I.BPF_FETCH, R0, R1, 0),
                     BPF_MOV64_REG(R0, R1),
                     BPF_LD_IMM64(R8, m.count + 1), BPF_ALU64_REG(I.BPF_ADD, R0, R8),
                     BPF_LD_IMM64(R8, m.every + 1), BPF_ALU64_REG(I.BPF_MOD, R0, R8),
                     BPF_JMP_IMM(I.BPF_JEQ, R0, 0, decided), BPF_MOV64_IMM(R0, 1))
        asm.place(decided)
        if m.invert:
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R0, 1))
        asm.emit(BPF_MOV64_REG(MISMATCH, R0), BPF_MOV64_IMM(HOTDROP, 0))
        asm.place(skip)


