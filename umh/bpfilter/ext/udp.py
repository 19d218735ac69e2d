"""-p udp / -m udp: --sport, --dport (struct xt_udp, revision 0)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int16un, Struct

from ..packet import facts
from ..errors import BpfilterError
from ..model import Match
from . import BOTH_FAMILIES, MatchExtension, register_match
from .ports import PortRange, describe_ports, emit_ports, emit_transport_header

IPPROTO_UDP = 17
XT_UDP_INV_SRCPT, XT_UDP_INV_DSTPT = 0x01, 0x02
XT_UDP_INV_MASK = 0x03

xt_udp = Struct(
    "spts" / Int16un[2],
    "dpts" / Int16un[2],
    "invflags" / Int8un,
)


@dataclass(frozen=True)
class UdpMatch(Match):
    sport: PortRange
    dport: PortRange
    name = "udp"
    revision = 0


@register_match
class Udp(MatchExtension):
    reads_transport = True
    name = "udp"
    families = BOTH_FAMILIES
    proto = IPPROTO_UDP
    struct = xt_udp

    def decode(self, payload: bytes, where: str) -> UdpMatch:
        p = self.packed.unpack_from(payload)
        (spt_lo, spt_hi), (dpt_lo, dpt_hi) = p[_SPTS], p[_DPTS]
        invflags = p[_INVFLAGS]
        if invflags & ~XT_UDP_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: udp: unknown inversion flags {invflags:#x}")
        return UdpMatch(sport=PortRange(spt_lo, spt_hi, bool(invflags & XT_UDP_INV_SRCPT)),
                        dport=PortRange(dpt_lo, dpt_hi, bool(invflags & XT_UDP_INV_DSTPT)))

    def emit(self, match: UdpMatch, asm, out) -> None:
        emit_transport_header(asm, facts.SMALL_HEADER, out)
        emit_ports(asm, match.sport, match.dport, out)

    def describe(self, match: UdpMatch) -> str:
        parts = ["udp", describe_ports("spt", match.sport), describe_ports("dpt", match.dport)]
        return " ".join(p for p in parts if p)


_SPTS, _DPTS, _INVFLAGS = map(Udp.packed.index, ("spts", "dpts", "invflags"))
