"""-p esp -m esp: --espspi (struct xt_esp, revision 0; net/netfilter/xt_esp.c registers
it for IPv4 and IPv6 alike, each with xt_match.proto = IPPROTO_ESP), and its copy
-p ipcomp -m ipcomp: --ipcompspi (struct xt_ipcomp, xt_ipcomp.c, IPPROTO_COMP).

esp_mt(): a fragment other than the first never matches; the 8 bytes of struct
ip_esp_hdr at par->thoff read (else hotdrop: the packet was cut inside the header);
the SPI within the range. In IPv6, ESP ends the extension headers: -p esp's walk
stops at it, which is where par->thoff points. comp_mt() does the same with the 4
bytes of struct ip_comp_hdr and its 16-bit CPI (bytes 2 and 3) for the SPI.
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

IPPROTO_ESP, IPPROTO_COMP = 50, 108
XT_ESP_INV_SPI = XT_IPCOMP_INV_SPI = 0x01
XT_ESP_INV_MASK = XT_IPCOMP_INV_MASK = 0x01

xt_esp = Struct(
    "spis" / Int32un[2],
    "invflags" / Int8un,
    Padding(3),
)

xt_ipcomp = Struct(
    "spis" / Int32un[2],
    "invflags" / Int8un,
    "hdrres" / Int8un,      # never tested by the kernel; listed
    Padding(2),
)


@dataclass(frozen=True)
class EspMatch(Match):
    spis: tuple[int, int]
    invflags: int
    name = "esp"
    revision = 0


@dataclass(frozen=True)
class IpcompMatch(EspMatch):
    hdrres: int = 0
    name = "ipcomp"


@register_match
class Esp(MatchExtension):
    name = "esp"
    families = BOTH_FAMILIES
    struct = xt_esp
    proto = IPPROTO_ESP
    reads_transport = True
    facts = READS
    header = 8              # what the kernel reads of the header
    spi_at, spi_size = 0, 4
    label = "esp"           # what iptables prints first

    def decode(self, payload: bytes, where: str) -> EspMatch:
        spi_lo, spi_hi, invflags, *rest = self.packed.unpack_from(payload)
        if invflags & ~XT_ESP_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.name}: unknown inversion flags "
                                              f"{invflags:#x}")
        return EspMatch((spi_lo, spi_hi), invflags, *rest) if not rest else \
            IpcompMatch((spi_lo, spi_hi), invflags, *rest)

    def emit(self, m: EspMatch, asm, out) -> None:
        emit_nonzero(asm, facts.FRAGOFF, 2, invert=True, out=out)
        emit_thoff(asm)
        emit_read(asm, 0, self.header, out)
        emit_range(asm, BUF + self.spi_at, self.spi_size, *m.spis,
                   bool(m.invflags & XT_ESP_INV_SPI), out, wire_order=True)

    def describe(self, m: EspMatch) -> str:
        # esp_print(), comp_print(): the label, the SPIs after a space
        lo, hi = m.spis
        inv = "!" if m.invflags & XT_ESP_INV_SPI else ""
        text = self.label
        if lo != 0 or hi != 0xFFFFFFFF or inv:
            text += f" spi:{inv}{lo}" if lo == hi else f" spis:{inv}{lo}:{hi}"
        if getattr(m, "hdrres", 0):
            text += " reserved"
        return text


@register_match
class Ipcomp(Esp):
    name = "ipcomp"
    struct = xt_ipcomp
    proto = IPPROTO_COMP
    header = 4
    spi_at, spi_size = 2, 2     # the CPI, ntohs(chdr->cpi)
    label = "comp"
