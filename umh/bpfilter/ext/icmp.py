"""-p icmp / -m icmp: --icmp-type TYPE[/CODE] (struct ipt_icmp, revision 0), and its
IPv6 twin -p ipv6-icmp / -m icmp6: --icmpv6-type (struct ip6t_icmp, the same layout),
as net/netfilter/xt_tcpudp.c registers both."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_LDX_MEM, R1, R2, R3, R6
from ..packet.primitives import emit_nonzero_bit, emit_outside
from ..packet import facts
from ..errors import BpfilterError
from ..model import Family, Match
from . import MatchExtension, register_match
from .ports import emit_transport_header

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
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


@dataclass(frozen=True)
class Icmp6Match(IcmpMatch):
    name = "icmp6"


@register_match
class Icmp(MatchExtension):
    reads_transport = True
    name = "icmp"
    proto = IPPROTO_ICMP
    struct = ipt_icmp
    model = IcmpMatch
    # icmp_type_code_match(): type 0xFF matches every packet, before inversion;
    # icmp6_type_code_match() has no such type
    any_type = True

    def decode(self, payload: bytes, where: str) -> IcmpMatch:
        p = self.packed.unpack_from(payload)
        (code_lo, code_hi), invflags = p[_CODE], p[_INVFLAGS]
        if invflags & ~IPT_ICMP_INV:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.name}: unknown inversion flags "
                                              f"{invflags:#x}")
        return self.model(p[_TYPE], code_lo, code_hi, bool(invflags & IPT_ICMP_INV))

    def emit(self, match: IcmpMatch, asm, out) -> None:
        emit_transport_header(asm, facts.SMALL_HEADER, out)
        if self.any_type and match.type == ANY_TYPE:
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
        return f"{self.listed_as}{bang}type {match.type}{codes}"

    listed_as = "icmp"


@register_match
class Icmp6(Icmp):
    name = "icmp6"
    proto = IPPROTO_ICMPV6
    families = (Family.IPV6,)
    model = Icmp6Match
    any_type = False
    listed_as = "ipv6-icmp"


_TYPE, _CODE, _INVFLAGS = map(Icmp.packed.index, ("type", "code", "invflags"))
