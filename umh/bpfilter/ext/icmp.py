"""-p icmp / -m icmp: --icmp-type TYPE[/CODE] (struct ipt_icmp, revision 0)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_B, BPF_JMP_A, BPF_JMP_IMM, BPF_LDX_MEM, R1, R6
from ..compiler import facts
from ..errors import BpfilterError
from ..model import Match
from . import MatchExtension, register_match
from .ports import emit_transport_header

IPPROTO_ICMP = 1
IPT_ICMP_INV = 0x01
ANY_TYPE = 0xFF

ipt_icmp = Struct(
    "type" / Int8un,
    "code" / Int8un[2],
    "invflags" / Int8un,
)


@dataclass(frozen=True)
class IcmpMatch(Match):
    type: int
    code_lo: int
    code_hi: int
    invert: bool
    name = "icmp"
    revision = 0


@register_match
class Icmp(MatchExtension):
    name = "icmp"
    proto = IPPROTO_ICMP
    struct = ipt_icmp

    def decode(self, payload: bytes, where: str) -> IcmpMatch:
        p = self.packed.unpack_from(payload)
        (code_lo, code_hi), invflags = p[_CODE], p[_INVFLAGS]
        if invflags & ~IPT_ICMP_INV:
            raise BpfilterError(errno.EINVAL, f"{where}: icmp: unknown inversion flags {invflags:#x}")
        return IcmpMatch(p[_TYPE], code_lo, code_hi, bool(invflags & IPT_ICMP_INV))

    def emit(self, match: IcmpMatch, asm, fail, hotdrop) -> None:
        emit_transport_header(asm, facts.SMALL_HEADER, fail, hotdrop)
        # icmp_type_code_match(): type 0xFF matches every packet, before inversion
        if match.type == ANY_TYPE:
            if match.invert:
                asm.emit(BPF_JMP_A(fail))
            return
        differs = fail if not match.invert else asm.label("icmp_differs")
        asm.emit(
            BPF_LDX_MEM(BPF_B, R1, R6, facts.ICMP_TYPE),
            BPF_JMP_IMM(I.BPF_JNE, R1, match.type, differs),
            BPF_LDX_MEM(BPF_B, R1, R6, facts.ICMP_CODE),
            BPF_JMP_IMM(I.BPF_JLT, R1, match.code_lo, differs),
            BPF_JMP_IMM(I.BPF_JGT, R1, match.code_hi, differs),
        )
        if match.invert:
            asm.emit(BPF_JMP_A(fail))
            asm.place(differs)

    def describe(self, match: IcmpMatch) -> str:
        if match.type == ANY_TYPE:
            return "icmp " + ("!" if match.invert else "") + "type any"
        bang = "!" if match.invert else ""
        codes = "" if (match.code_lo, match.code_hi) == (0, 0xFF) else (
            f" code {match.code_lo}" if match.code_lo == match.code_hi
            else f" codes {match.code_lo}-{match.code_hi}")
        return f"icmp {bang}type {match.type}{codes}"


_TYPE, _CODE, _INVFLAGS = map(Icmp.packed.index, ("type", "code", "invflags"))
