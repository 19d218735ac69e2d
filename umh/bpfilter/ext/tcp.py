"""-p tcp / -m tcp: --sport, --dport, --tcp-flags, --syn (struct xt_tcp, revision 0)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int16un, Struct

from ..compiler import facts
from ..compiler.primitives import emit_equal_hotdrop, emit_masked_equal
from ..errors import BpfilterError
from ..model import Match
from . import MatchExtension, register_match
from .ports import PortRange, describe_ports, emit_ports, emit_transport_header

IPPROTO_TCP = 6
XT_TCP_INV_SRCPT, XT_TCP_INV_DSTPT, XT_TCP_INV_FLAGS, XT_TCP_INV_OPTION = 0x01, 0x02, 0x04, 0x08
XT_TCP_INV_MASK = 0x0F
EVIL_FRAGMENT_OFFSET = 1

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
        p = self.packed.unpack_from(payload)
        (spt_lo, spt_hi), (dpt_lo, dpt_hi) = p[_SPTS], p[_DPTS]
        invflags = p[_INVFLAGS]
        if invflags & ~XT_TCP_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: tcp: unknown inversion flags {invflags:#x}")
        if p[_OPTION] or invflags & XT_TCP_INV_OPTION:
            raise BpfilterError(errno.EOPNOTSUPP, f"{where}: tcp --tcp-option is not supported by "
                                                  "bpfilter yet; the whole table is refused")
        return TcpMatch(
            sport=PortRange(spt_lo, spt_hi, bool(invflags & XT_TCP_INV_SRCPT)),
            dport=PortRange(dpt_lo, dpt_hi, bool(invflags & XT_TCP_INV_DSTPT)),
            flags_mask=p[_FLG_MASK], flags_cmp=p[_FLG_CMP],
            invert_flags=bool(invflags & XT_TCP_INV_FLAGS))

    def emit(self, match: TcpMatch, asm, out) -> None:
        # tcp_mt() drops a fragment at offset 1 (8 bytes) outright: it could
        # overwrite the flags of the first fragment to sneak past direction checks.
        emit_equal_hotdrop(asm, facts.FRAGOFF, 2, EVIL_FRAGMENT_OFFSET, out)
        emit_transport_header(asm, facts.TCP_HEADER, out)
        emit_ports(asm, match.sport, match.dport, out)
        emit_masked_equal(asm, facts.TCP_FLAGS, 1, match.flags_mask, match.flags_cmp,
                          match.invert_flags, out)

    def describe(self, match: TcpMatch) -> str:
        parts = ["tcp", describe_ports("spt", match.sport), describe_ports("dpt", match.dport)]
        if match.flags_mask or match.invert_flags:
            bang = "!" if match.invert_flags else ""
            parts.append(f"flags:{bang}0x{match.flags_mask:02X}/0x{match.flags_cmp:02X}")
        return " ".join(p for p in parts if p)


_SPTS, _DPTS, _OPTION, _FLG_MASK, _FLG_CMP, _INVFLAGS = map(
    Tcp.packed.index, ("spts", "dpts", "option", "flg_mask", "flg_cmp", "invflags"))
