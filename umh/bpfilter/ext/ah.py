"""-m ah, both families' (revision 0): IPv6's --ahspi, --ahlen, --ahres (struct ip6t_ah,
net/ipv6/netfilter/ip6t_ah.c) and IPv4's -p ah --ahspi (struct ipt_ah,
net/ipv4/netfilter/ipt_ah.c). The two share a name and little else.

IPv6, ah_mt6(): the first authentication header (exthdr.py says how it is found; no
-p needed), its 12 bytes read (else hotdrop), its length ipv6_authlen() checked
against the packet (else hotdrop); then the SPI within the range (always tested:
the default range is everything), the length if one is given (0: not tested,
whatever the inversion), the reserved field zero if asked.

IPv4, ah_mt(): only with -p ah (xt_match.proto); a fragment other than the first
never matches; the header at the transport offset, 12 bytes read (else hotdrop); the
SPI within the range.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int32un, Padding, Struct

from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import emit_masked_equal, emit_nonzero, emit_range
from . import MatchExtension, register_match
from .exthdr import (BUF, HDRLEN, READS, SEARCHES, emit_find, emit_fits, emit_length,
                     emit_read, emit_thoff)

NEXTHDR_AUTH = IPPROTO_AH = 51
AUTH_HEADER = 12        # struct ip_auth_hdr up to its sequence number
IP6T_AH_INV_SPI, IP6T_AH_INV_LEN = 0x01, 0x02
IP6T_AH_INV_MASK = 0x03
IPT_AH_INV_SPI = 0x01
IPT_AH_INV_MASK = 0x01

ip6t_ah = Struct(
    "spis" / Int32un[2],
    "hdrlen" / Int32un,
    "hdrres" / Int8un,
    "invflags" / Int8un,
    Padding(2),
)

ipt_ah = Struct(
    "spis" / Int32un[2],
    "invflags" / Int8un,
    Padding(3),
)


@dataclass(frozen=True)
class AhMatch(Match):
    """IPv4's: the SPI range."""
    spis: tuple[int, int]
    invflags: int
    name = "ah"
    revision = 0


@dataclass(frozen=True)
class Ah6Match(AhMatch):
    hdrlen: int = 0
    hdrres: int = 0


def _describe_spis(spis: tuple[int, int], invert: bool) -> str:
    """print_spis() of libip6t_ah.c and libipt_ah.c: glued to "ah " before it."""
    lo, hi = spis
    if lo == 0 and hi == 0xFFFFFFFF and not invert:
        return ""
    bang = "!" if invert else ""
    return f"spi:{bang}{lo}" if lo == hi else f"spis:{bang}{lo}:{hi}"


def _check_invflags(invflags: int, mask: int, where: str) -> None:
    if invflags & ~mask:
        raise BpfilterError(errno.EINVAL, f"{where}: ah: unknown inversion flags {invflags:#x}")


@register_match
class Ah(MatchExtension):
    name = "ah"
    struct = ipt_ah
    proto = IPPROTO_AH
    reads_transport = True
    facts = READS

    def decode(self, payload: bytes, where: str) -> AhMatch:
        spi_lo, spi_hi, invflags = self.packed.unpack_from(payload)
        _check_invflags(invflags, IPT_AH_INV_MASK, where)
        return AhMatch((spi_lo, spi_hi), invflags)

    def emit(self, m: AhMatch, asm, out) -> None:
        emit_nonzero(asm, facts.FRAGOFF, 2, invert=True, out=out)
        emit_thoff(asm)
        emit_read(asm, 0, AUTH_HEADER, out)
        emit_range(asm, BUF + 4, 4, *m.spis, bool(m.invflags & IPT_AH_INV_SPI), out,
                   wire_order=True)

    def describe(self, m: AhMatch) -> str:
        # ah_print(): "ah " then the SPIs glued on
        return "ah " + _describe_spis(m.spis, bool(m.invflags & IPT_AH_INV_SPI))


@register_match
class Ah6(MatchExtension):
    name = "ah"
    families = (Family.IPV6,)
    struct = ip6t_ah
    facts = SEARCHES

    def decode(self, payload: bytes, where: str) -> Ah6Match:
        spi_lo, spi_hi, hdrlen, hdrres, invflags = self.packed.unpack_from(payload)
        _check_invflags(invflags, IP6T_AH_INV_MASK, where)
        return Ah6Match((spi_lo, spi_hi), invflags, hdrlen, hdrres)

    def emit(self, m: Ah6Match, asm, out) -> None:
        emit_find(asm, NEXTHDR_AUTH, out)
        emit_read(asm, 0, AUTH_HEADER, out)
        emit_length(asm, 4, 2)
        emit_fits(asm, out)
        emit_range(asm, BUF + 4, 4, *m.spis, bool(m.invflags & IP6T_AH_INV_SPI), out,
                   wire_order=True)
        if m.hdrlen:
            emit_masked_equal(asm, HDRLEN, 4, 0xFFFFFFFF, m.hdrlen,
                              bool(m.invflags & IP6T_AH_INV_LEN), out)
        if m.hdrres:
            emit_masked_equal(asm, BUF + 2, 2, 0xFFFF, 0, False, out)

    def describe(self, m: Ah6Match) -> str:
        # ah_print(): "ah " then the SPIs glued on, the length after a space
        text = "ah " + _describe_spis(m.spis, bool(m.invflags & IP6T_AH_INV_SPI))
        inv_len = m.invflags & IP6T_AH_INV_LEN
        if m.hdrlen or inv_len:
            text += f"length:{'!' if inv_len else ''}{m.hdrlen}"
        if m.hdrres:
            text += " reserved"
        return text
