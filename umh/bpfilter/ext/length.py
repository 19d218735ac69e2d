"""-m length [!] --length MIN[:MAX] (struct xt_length_info): the total length the IP
header states, which length_mt() reads, not skb->len."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Int8un, Int16un, Struct

from ..packet import facts
from ..packet.primitives import emit_range
from ..model import Match
from . import MatchExtension, register_match

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


@register_match
class Length(MatchExtension):
    name = "length"
    struct = xt_length_info

    def decode(self, payload: bytes, where: str) -> LengthMatch:
        # no checkentry: min > max is accepted (and never matches)
        return LengthMatch(*self.packed.unpack_from(payload))

    def emit(self, match: LengthMatch, asm, out) -> None:
        # length_mt() returns (in range) ^ invert as a bool: an invert byte other
        # than 0 and 1 makes it true whatever the length.
        if match.invert > 1:
            return
        emit_range(asm, facts.TOT_LEN, 2, match.min, match.max, bool(match.invert), out)

    def describe(self, match: LengthMatch) -> str:
        bang = "!" if match.invert else ""
        span = f"{match.min}" if match.min == match.max else f"{match.min}:{match.max}"
        return f"length {bang}{span}"
