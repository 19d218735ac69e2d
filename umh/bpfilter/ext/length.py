"""-m length [!] --length MIN[:MAX] (struct xt_length_info). IPv4's length_mt() reads the
total length the IP header states, not skb->len; IPv6's length_mt6() reads skb->len
(since Linux 6.3: payload length + 40 was wrong for jumbograms), which differs from the
header's payload length + 40 when a raw socket writes a header that lies, or when a
hop-by-hop header's zero payload length leaves the receiving skb untrimmed."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Int8un, Int16un, Struct

from ..packet import facts
from ..packet.primitives import emit_range
from ..model import Family, Match
from . import BOTH_FAMILIES, MatchExtension, register_match

xt_length_info = Struct(
    "min" / Int16un,
    "max" / Int16un,
    "invert" / Int8un,
)


@dataclass(frozen=True)
class LengthMatch(Match):
    min: int
    max: int
    invert: int      # the raw byte: see emit()
    name = "length"
    revision = 0


# (fact, its size) each family's match compares
_LENGTH = {Family.IPV4: (facts.TOT_LEN, 2), Family.IPV6: (facts.LEN, 4)}


@register_match
class Length(MatchExtension):
    name = "length"
    families = BOTH_FAMILIES
    struct = xt_length_info

    def decode(self, payload: bytes, where: str) -> LengthMatch:
        # no checkentry: min > max is accepted (and never matches)
        return LengthMatch(*self.packed.unpack_from(payload))

    def emit(self, match: LengthMatch, asm, out) -> None:
        # length_mt() returns (in range) ^ invert as a bool: an invert byte other
        # than 0 and 1 makes it true whatever the length.
        if match.invert > 1:
            return
        emit_range(asm, *_LENGTH[self.family], match.min, match.max, bool(match.invert), out)

    def describe(self, match: LengthMatch) -> str:
        bang = "!" if match.invert else ""
        span = f"{match.min}" if match.min == match.max else f"{match.min}:{match.max}"
        return f"length {bang}{span}"
