"""-m cpu [!] --cpu N (xt_cpu.c, struct xt_cpu_info): whether the CPU running the
hook is N, which bpf_get_smp_processor_id() answers as smp_processor_id() does."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int32un, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_EMIT_CALL, BPF_MOV64_REG, BPF_STX_MEM, BPF_W, R0, R6, R8, R9
from ..errors import BpfilterError
from ..model import Match
from ..packet.primitives import HOTDROP, MISMATCH, emit_masked_equal
from . import BOTH_FAMILIES, MatchExtension, register_match
from .exthdr import BUF, READS

xt_cpu_info = Struct("cpu" / Int32un, "invert" / Int32un)


@dataclass(frozen=True)
class CpuMatch(Match):
    cpu: int
    invert: bool
    name = "cpu"
    revision = 0


@register_match
class Cpu(MatchExtension):
    name = "cpu"
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_cpu_info
    facts = READS

    def decode(self, payload: bytes, where: str) -> CpuMatch:
        cpu, invert = self.packed.unpack_from(payload)
        if invert & ~1:         # cpu_mt_check()
            raise BpfilterError(errno.EINVAL, f"{where}: cpu: invalid invert {invert:#x}")
        return CpuMatch(cpu, bool(invert))

    def emit(self, m: CpuMatch, asm, out) -> None:
        asm.emit(BPF_MOV64_REG(R8, MISMATCH), BPF_MOV64_REG(R9, HOTDROP),
                 BPF_EMIT_CALL(I.BPF_FUNC_get_smp_processor_id),
                 BPF_MOV64_REG(MISMATCH, R8), BPF_MOV64_REG(HOTDROP, R9),
                 BPF_STX_MEM(BPF_W, R6, R0, BUF))
        emit_masked_equal(asm, BUF, 4, 0xFFFFFFFF, m.cpu, m.invert, out)

    def describe(self, m: CpuMatch) -> str:
        return f"cpu {'! ' if m.invert else ''}{m.cpu}"
