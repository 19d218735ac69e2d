"""Reading what the kernel keeps beside the packet, for matches that run in BPF on
structures a netfilter program may not dereference (conntrack's extensions, the skb's
extensions and what they point to): each step a bpf_probe_read_kernel() into the
facts, at offsets from BTF."""
from __future__ import annotations

import errno
import functools

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_JMP_IMM,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, R0, R1, R2, R3, R6)
from ..errors import BpfilterError


def probe(asm, dst: int, size: int) -> None:
    """bpf_probe_read_kernel(facts + dst, size, R3)."""
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, dst), BPF_MOV64_IMM(R2, size),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel))


def emit_read_pointer(asm, scratch: int, missing) -> None:
    """R3 = *(u64 *)R3, through the facts' 8 bytes at `scratch`; to `missing` if that
    cannot be read or is NULL."""
    probe(asm, scratch, 8)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, missing), BPF_LDX_MEM(BPF_DW, R3, R6, scratch),
             BPF_JMP_IMM(I.BPF_JEQ, R3, 0, missing))


@functools.lru_cache(maxsize=None)
def skb_ext_offsets(ext_id: str) -> tuple[int, int, int, int]:
    """(sk_buff->active_extensions, its bit for ext_id, sk_buff->extensions,
    &skb_ext->offset[ext_id])."""
    try:
        b = Btf.vmlinux()
        value = b.enum_value("skb_ext_id", ext_id)
        return (b.member("sk_buff", "active_extensions")[0], 1 << value,
                b.member("sk_buff", "extensions")[0], b.member("skb_ext", "offset")[0] + value)
    except BtfError as err:
        raise BpfilterError(errno.EOPNOTSUPP, f"the skb's extension {ext_id} is not in the "
                                              f"kernel's BTF ({err}); the whole table is "
                                              f"refused") from None


def emit_skb_ext_find(asm, skb: int, ext_id: str, scratch: int, missing) -> None:
    """R3 = skb_ext_find(skb, ext_id) (`skb` a register holding the sk_buff), through
    the facts' 9 bytes at `scratch`; to `missing` when the skb has none."""
    active, bit, extensions, offset = skb_ext_offsets(ext_id)
    asm.emit(BPF_LDX_MEM(BPF_B, R1, skb, active), BPF_ALU64_IMM(I.BPF_AND, R1, bit),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, missing),
             BPF_MOV64_REG(R3, skb), BPF_ALU64_IMM(I.BPF_ADD, R3, extensions))
    emit_read_pointer(asm, scratch, missing)
    # the extension's offset in 8-byte chunks
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, offset))
    probe(asm, scratch + 8, 1)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, missing),
             BPF_LDX_MEM(BPF_B, R1, R6, scratch + 8), BPF_ALU64_IMM(I.BPF_LSH, R1, 3),
             BPF_LDX_MEM(BPF_DW, R3, R6, scratch), BPF_ALU64_REG(I.BPF_ADD, R3, R1))
