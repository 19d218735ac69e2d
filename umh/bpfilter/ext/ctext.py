"""Conntrack's extensions as nf_ct_ext_find() finds them, for matches that read one in
BPF without bpfilter.ko (connbytes' accounting, helper's master's helper): the entry's
extension area (nf_conn->ext) and its offset for the extension's id, at offsets from
BTF, read with kread.py's steps."""
from __future__ import annotations

import errno
import functools

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_JMP_IMM, BPF_LDX_MEM,
                        R0, R1, R3, R6)
from ..errors import BpfilterError
from .kread import emit_read_pointer, probe

NFCT_PTRMASK = ~7


def conntrack_btf(what: str, read) -> object:
    """read(btf) from the first of vmlinux's and nf_conntrack's BTF that has it; else
    the refusal, saying that `what` needs it."""
    failures = []
    for btf in (Btf.vmlinux, lambda: Btf.module("nf_conntrack")):
        try:
            return read(btf())
        except BtfError as err:
            failures.append(str(err))
    raise BpfilterError(errno.EOPNOTSUPP, f"{what} in the kernel's BTF "
                                          f"({'; '.join(failures)}); the whole table is refused")


@functools.lru_cache(maxsize=1)
def _nfct() -> int:
    return Btf.vmlinux().member("sk_buff", "_nfct")[0]


def emit_nf_ct_get(asm, skb: int, missing) -> None:
    """R3 = nf_ct_get(skb) (`skb` a register); to `missing` without an entry."""
    asm.emit(BPF_LDX_MEM(BPF_DW, R3, skb, _nfct()), BPF_ALU64_IMM(I.BPF_AND, R3, NFCT_PTRMASK),
             BPF_JMP_IMM(I.BPF_JEQ, R3, 0, missing))


@functools.lru_cache(maxsize=None)
def ext_offsets(ext_id: str) -> tuple[int, int]:
    """(nf_conn->ext, &nf_ct_ext->offset[ext_id])."""
    return conntrack_btf(f"conntrack's extension {ext_id}", lambda b: (
        b.member("nf_conn", "ext")[0],
        b.member("nf_ct_ext", "offset")[0] + b.enum_value("nf_ct_ext_id", ext_id)))


def emit_ext_find(asm, ext_id: str, scratch: int, missing) -> None:
    """R3 (an nf_conn) = nf_ct_ext_find(R3, ext_id), through the facts' 9 bytes at
    `scratch`; to `missing` when the entry has no such extension."""
    ext, offset = ext_offsets(ext_id)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, ext))
    emit_read_pointer(asm, scratch, missing)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, offset))
    probe(asm, scratch + 8, 1)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, missing),
             BPF_LDX_MEM(BPF_B, R1, R6, scratch + 8), BPF_JMP_IMM(I.BPF_JEQ, R1, 0, missing),
             BPF_LDX_MEM(BPF_DW, R3, R6, scratch), BPF_ALU64_REG(I.BPF_ADD, R3, R1))
