"""-p icmp / -m icmp: --icmp-type TYPE[/CODE] (struct ipt_icmp, revision 0)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_LDX_MEM, R1, R2, R3, R6
from ..packet.primitives import emit_nonzero_bit, emit_outside
from ..packet import facts
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

    def emit(self, match: IcmpMatch, asm, out) -> None:
        emit_transport_header(asm, facts.SMALL_HEADER, out)
        # icmp_type_code_match(): type 0xFF matches every packet, before inversion
        if match.type == ANY_TYPE:
            if match.invert:
                out.never()
            return
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.ICMP_TYPE),
                 BPF_ALU64_IMM(I.BPF_XOR, R1, match.type))
        emit_outside(asm, R2, facts.ICMP_CODE, 1, match.code_lo, match.code_hi)
        asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2))
        if match.invert:
            emit_nonzero_bit(asm, R1, R3)
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
        out.mismatch(R1)

    def describe(self, match: IcmpMatch) -> str:
        # iptables -n glues the type to the name unless inverted ("icmptype 8",
        # "icmp !type 8"), and prints "any" as the number it is
        bang = " !" if match.invert else ""
        codes = "" if (match.code_lo, match.code_hi) == (0, 0xFF) else (
            f" code {match.code_lo}" if match.code_lo == match.code_hi
            else f" codes {match.code_lo}-{match.code_hi}")
        return f"icmp{bang}type {match.type}{codes}"

_TYPE, _CODE, _INVFLAGS = map(Icmp.packed.index, ("type", "code", "invflags"))
