"""-j TRACE (xt_TRACE.c), the raw table: the kernel's own, run by bpfilter.ko
(ext/xtmatch.py); it sets skb->nf_trace, and its checkentry takes a reference on
the family's logger (nf_log_syslog), as with ip_tables.

A traced packet is logged at every rule it passes in every table of its namespace
and family (compiler/trace.py),
which reads skb->nf_trace once per hook into the "nf_trace" fact: after this target
the fact says traced, as the skb does, so that the rest of the raw table's walk is
logged as the kernel's is."""
from __future__ import annotations

from construct import Struct

from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import BPF_ALU64_IMM, BPF_B, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_STX_MEM, R1, R6, R7
from ..packet import facts
from . import BOTH_FAMILIES
from .xtmatch import KernelTarget, plain_kernel_extension

TRACE_TARGET = "TRACE"
NF_TRACE = facts.reserve("nf_trace", 1)


def _read_nf_trace(asm, k: facts.KernelOffsets) -> None:
    """The prologue's part (R7 = skb): the bit, from the byte holding it."""
    bit, _ = Btf.vmlinux().bitfield("sk_buff", "nf_trace")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R7, bit // 8))
    if bit % 8:
        asm.emit(BPF_ALU64_IMM(I.BPF_RSH, R1, bit % 8))
    asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, 1), BPF_STX_MEM(BPF_B, R6, R1, NF_TRACE))


facts.OPTIONAL["nf_trace"] = _read_nf_trace


def _refresh(self, target, asm) -> None:
    """trace_tg() set skb->nf_trace."""
    asm.emit(BPF_MOV64_IMM(R1, 1), BPF_STX_MEM(BPF_B, R6, R1, NF_TRACE))


plain_kernel_extension("target", TRACE_TARGET, Struct(), BOTH_FAMILIES, table="raw",
                       facts=KernelTarget.facts | {"nf_trace"}, refresh=_refresh,
                       family_independent=True, describe=lambda f: "TRACE")
