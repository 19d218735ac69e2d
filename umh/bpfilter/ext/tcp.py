"""-p tcp / -m tcp: --sport, --dport, --tcp-flags, --syn (struct xt_tcp, revision 0)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int16un, Struct

from ..compiler import facts
from ..compiler.primitives import emit_masked_equal
from ..errors import BpfilterError
from ..model import Match
from . import MatchExtension, register_match
from .ports import PortRange, emit_ports, emit_transport_header

IPPROTO_TCP = 6
XT_TCP_INV_SRCPT, XT_TCP_INV_DSTPT, XT_TCP_INV_FLAGS, XT_TCP_INV_OPTION = 0x01, 0x02, 0x04, 0x08
XT_TCP_INV_MASK = 0x0F

xt_tcp = Struct(
    "spts" / Int16un[2],
    "dpts" / Int16un[2],
    "option" / Int8un,
    "flg_mask" / Int8un,
    "flg_cmp" / Int8un,
    "invflags" / Int8un,
)


@dataclass(frozen=True)
class TcpMatch(Match):
    sport: PortRange
    dport: PortRange
    flags_mask: int = 0
    flags_cmp: int = 0
    invert_flags: bool = False
    name = "tcp"
    revision = 0


@register_match
class Tcp(MatchExtension):
    name = "tcp"
    proto = IPPROTO_TCP
    struct = xt_tcp

    def decode(self, payload: bytes, where: str) -> TcpMatch:
        p = xt_tcp.parse(payload)
        if p.invflags & ~XT_TCP_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: tcp: unknown inversion flags {p.invflags:#x}")
        if p.option or p.invflags & XT_TCP_INV_OPTION:
            raise BpfilterError(errno.EOPNOTSUPP, f"{where}: tcp --tcp-option is not supported by "
                                                  "bpfilter yet; the whole table is refused")
        return TcpMatch(
            sport=PortRange(p.spts[0], p.spts[1], bool(p.invflags & XT_TCP_INV_SRCPT)),
            dport=PortRange(p.dpts[0], p.dpts[1], bool(p.invflags & XT_TCP_INV_DSTPT)),
            flags_mask=p.flg_mask, flags_cmp=p.flg_cmp,
            invert_flags=bool(p.invflags & XT_TCP_INV_FLAGS))

    def emit(self, match: TcpMatch, asm, fail, hotdrop) -> None:
        emit_transport_header(asm, facts.TCP_HEADER, fail, hotdrop)
        emit_ports(asm, match.sport, match.dport, fail)
        emit_masked_equal(asm, facts.TCP_FLAGS, 1, match.flags_mask, match.flags_cmp,
                          match.invert_flags, fail)
