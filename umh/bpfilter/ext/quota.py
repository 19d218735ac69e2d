"""-m quota [!] --quota BYTES (struct xt_quota_info, net/netfilter/xt_quota.c).

quota_mt(): under the rule's lock, a packet whose length (skb->len) the remaining
bytes cover takes them and the match holds; any other sets the remaining bytes to 0
and fails, so that no smaller packet passes later; `! --quota` inverts the answer, not
the counting. checkentry starts the count at --quota with every replace, and the
kernel never writes it back into the rule: GET_ENTRIES lists --quota as given (as
bpfilter's stored table does). Here each match has its remaining bytes in a hash map
made afresh with every load, the value holding a bpf_spin_lock as the kernel's
xt_quota_priv holds its spinlock."""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from construct import Int32ul, Int64ul, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_DW, BPF_EMIT_CALL, BPF_JMP_A,
                        BPF_JMP_IMM, BPF_JMP_REG, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG,
                        BPF_STX_MEM, BPF_W, MapRef, R0, R1, R2, R6, R8, R9)
from ..errors import BpfilterError
from ..model import Match, Table
from ..packet import facts
from ..packet.primitives import HOTDROP, MISMATCH, emit_skip_if_decided, emit_state_lookup
from . import BOTH_FAMILIES, MatchExtension, keyed_matches, match_key, register_match
from .limit import create_locked_state, locked_value_btf

XT_QUOTA_INVERT = 0x1
XT_QUOTA_MASK = 0x1

xt_quota_info = Struct(
    "flags" / Int32ul,
    "pad" / Int32ul,
    "quota" / Int64ul,
    "master" / Int64ul,     # kernel-private
)

QUOTAS = MapRef("quotas")
# the value: struct { struct bpf_spin_lock lock; u64 remaining; }
REMAINING = 8
VALUE = struct.Struct("<IIQ")
_BTF = locked_value_btf("quota_left", VALUE.size, [("remaining", REMAINING, 8)])
_KEY = facts.reserve("quota", 8)


@dataclass(frozen=True)
class QuotaMatch(Match):
    quota: int
    invert: bool
    name = "quota"
    revision = 0


@register_match
class Quota(MatchExtension):
    name = "quota"
    families = BOTH_FAMILIES
    family_independent = True   # xt_quota registers for NFPROTO_UNSPEC
    struct = xt_quota_info
    facts = frozenset({"quota"})

    def decode(self, payload: bytes, where: str) -> QuotaMatch:
        flags, _pad, quota, _master = self.packed.unpack_from(payload)
        if flags & ~XT_QUOTA_MASK:      # quota_mt_check()
            raise BpfilterError(errno.EINVAL, f"{where}: quota: unknown flags {flags:#x}")
        return QuotaMatch(quota, bool(flags & XT_QUOTA_INVERT))

    def table_maps(self, table: Table) -> dict[MapRef, int]:
        found = keyed_matches(table, QuotaMatch)
        if not found:
            return {}
        return {QUOTAS: create_locked_state(f"{table.name}_quota", _BTF,
                                            [(key, VALUE.pack(0, 0, m.quota))
                                             for key, m in found])}

    def emit(self, m: QuotaMatch, asm, out) -> None:
        """quota_mt() if every earlier test of the rule held (the kernel stops at the
        first match that fails, and counts nothing then). R8: 0 the packet took its
        bytes, 1 it did not, 2 no count (the loader makes one for every quota match,
        so never; failing closed, the packet is dropped)."""
        done, outcome, over = (asm.label(n) for n in ("quota_done", "quota_outcome",
                                                     "quota_over"))
        store = asm.label("quota_store")
        out.hotdrops = True
        emit_skip_if_decided(asm, done)
        emit_state_lookup(asm, QUOTAS, match_key(out.rule, m), _KEY)
        asm.emit(BPF_MOV64_IMM(R8, 2), BPF_JMP_IMM(I.BPF_JEQ, R0, 0, outcome),
                 BPF_MOV64_REG(R9, R0),
                 BPF_MOV64_REG(R1, R9), BPF_EMIT_CALL(I.BPF_FUNC_spin_lock),
                 BPF_LDX_MEM(BPF_DW, R1, R9, REMAINING), BPF_LDX_MEM(BPF_W, R2, R6, facts.LEN),
                 BPF_MOV64_IMM(R8, 1),
                 BPF_JMP_REG(I.BPF_JLT, R1, R2, over),
                 BPF_ALU64_REG(I.BPF_SUB, R1, R2), BPF_MOV64_IMM(R8, 0), BPF_JMP_A(store))
        asm.place(over)
        asm.emit(BPF_MOV64_IMM(R1, 0))
        asm.place(store)
        asm.emit(BPF_STX_MEM(BPF_DW, R9, R1, REMAINING),
                 BPF_MOV64_REG(R1, R9), BPF_EMIT_CALL(I.BPF_FUNC_spin_unlock))
        asm.place(outcome)
        asm.emit(BPF_MOV64_REG(MISMATCH, R8), BPF_ALU64_IMM(I.BPF_AND, MISMATCH, 1),
                 BPF_MOV64_REG(HOTDROP, R8), BPF_ALU64_IMM(I.BPF_RSH, HOTDROP, 1))
        if m.invert:
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, MISMATCH, 1))
        asm.place(done)

    def describe(self, m: QuotaMatch) -> str:
        # quota_print() of libxt_quota.c shows no inversion
        return f"quota: {m.quota} bytes"
