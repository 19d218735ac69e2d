"""-p esp -m esp: --espspi (struct xt_esp, revision 0; net/netfilter/xt_esp.c registers
it for IPv4 and IPv6 alike, each with xt_match.proto = IPPROTO_ESP).

esp_mt(): a fragment other than the first never matches; the 8 bytes of struct
ip_esp_hdr at par->thoff read (else hotdrop: the packet was cut inside the header);
the SPI within the range. In IPv6, ESP ends the extension headers: -p esp's walk
stops at it, which is where par->thoff points.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int32un, Padding, Struct

from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from ..packet.primitives import emit_nonzero, emit_range
from . import BOTH_FAMILIES, MatchExtension, register_match
from .exthdr import BUF, READS, emit_read, emit_thoff

IPPROTO_ESP = 50
ESP_HEADER = 8
XT_ESP_INV_SPI = 0x01
XT_ESP_INV_MASK = 0x01

xt_esp = Struct(
    "spis" / Int32un[2],
    "invflags" / Int8un,
    Padding(3),
)


@dataclass(frozen=True)
class EspMatch(Match):
    spis: tuple[int, int]
    invflags: int
    name = "esp"
    revision = 0


@register_match
class Esp(MatchExtension):
    name = "esp"
    families = BOTH_FAMILIES
    struct = xt_esp
    proto = IPPROTO_ESP
    reads_transport = True
    facts = READS

    def decode(self, payload: bytes, where: str) -> EspMatch:
        spi_lo, spi_hi, invflags = self.packed.unpack_from(payload)
        if invflags & ~XT_ESP_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: esp: unknown inversion flags "
                                              f"{invflags:#x}")
        return EspMatch((spi_lo, spi_hi), invflags)

    def emit(self, m: EspMatch, asm, out) -> None:
        emit_nonzero(asm, facts.FRAGOFF, 2, invert=True, out=out)
        emit_thoff(asm)
        emit_read(asm, 0, ESP_HEADER, out)
        emit_range(asm, BUF, 4, *m.spis, bool(m.invflags & XT_ESP_INV_SPI), out,
                   wire_order=True)

    def describe(self, m: EspMatch) -> str:
        # esp_print(): "esp", the SPIs after a space
        lo, hi = m.spis
        inv = "!" if m.invflags & XT_ESP_INV_SPI else ""
        if lo == 0 and hi == 0xFFFFFFFF and not inv:
            return "esp"
        return f"esp spi:{inv}{lo}" if lo == hi else f"esp spis:{inv}{lo}:{hi}"
