"""-m ttl --ttl-eq/--ttl-lt/--ttl-gt N, ! --ttl-eq N (struct ipt_ttl_info), and IPv6's
twin -m hl --hl-eq/--hl-lt/--hl-gt (struct ip6t_hl_info, the same layout): both in
net/netfilter/xt_hl.c, comparing the ttl or the hop limit (facts.TTL holds either)."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Int8un, Struct

from ..packet import facts
from ..packet.primitives import emit_masked_equal, emit_range
from ..model import Family, Match
from . import MatchExtension, register_match

IPT_TTL_EQ, IPT_TTL_NE, IPT_TTL_LT, IPT_TTL_GT = 0, 1, 2, 3
_OPERATOR = {IPT_TTL_EQ: "==", IPT_TTL_NE: "!=", IPT_TTL_LT: "<", IPT_TTL_GT: ">"}

ipt_ttl_info = Struct(
    "mode" / Int8un,
    "ttl" / Int8un,
)


@dataclass(frozen=True)
class TtlMatch(Match):
    mode: int
    ttl: int
    name = "ttl"
    revision = 0


@dataclass(frozen=True)
class HlMatch(TtlMatch):
    name = "hl"


@register_match
class Ttl(MatchExtension):
    name = "ttl"
    struct = ipt_ttl_info

    model = TtlMatch
    field = "TTL"    # how iptables names what is compared

    def decode(self, payload: bytes, where: str) -> TtlMatch:
        # Linux 6.18 accepts any mode (no checkentry), and ttl_mt() is false for
        # the modes it does not know.
        return self.model(*self.packed.unpack_from(payload))

    def emit(self, match: TtlMatch, asm, out) -> None:
        mode, ttl = match.mode, match.ttl
        if mode not in _OPERATOR:
            out.never()
        elif mode in (IPT_TTL_EQ, IPT_TTL_NE):
            emit_masked_equal(asm, facts.TTL, 1, 0xFF, ttl, mode == IPT_TTL_NE, out)
        elif (mode == IPT_TTL_LT and ttl == 0) or (mode == IPT_TTL_GT and ttl == 0xFF):
            out.never()
        elif mode == IPT_TTL_LT:
            emit_range(asm, facts.TTL, 1, 0, ttl - 1, False, out)
        else:
            emit_range(asm, facts.TTL, 1, ttl + 1, 0xFF, False, out)

    def describe(self, match: TtlMatch) -> str:
        # iptables prints no operator for a mode it does not know
        op = f"{self.field} {_OPERATOR[match.mode]}" if match.mode in _OPERATOR else ""
        return f"{self.field} match {op} {match.ttl}"


@register_match
class Hl(Ttl):
    name = "hl"
    families = (Family.IPV6,)
    model = HlMatch
    field = "HL"
