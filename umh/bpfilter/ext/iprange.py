"""-m iprange [!] --src-range A-B [!] --dst-range A-B (struct xt_iprange_mtinfo,
revision 1: the only one Linux still has)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from construct import Bytes, Int8un, Struct

from ..packet import facts
from ..packet.primitives import emit_range
from ..model import Match
from . import MatchExtension, register_match

IPRANGE_SRC, IPRANGE_DST, IPRANGE_SRC_INV, IPRANGE_DST_INV = 0x01, 0x02, 0x10, 0x20

xt_iprange_mtinfo = Struct(
    "src_min" / Bytes(16),     # union nf_inet_addr: IPv4 uses the first 4 bytes
    "src_max" / Bytes(16),
    "dst_min" / Bytes(16),
    "dst_max" / Bytes(16),
    "flags" / Int8un,
)


@dataclass(frozen=True)
class AddressRange:
    lo: int          # addresses as numbers (host order), as iprange_mt4() compares them
    hi: int
    invert: bool

    def describe(self, label: str) -> str:
        bang = " !" if self.invert else ""
        return f"{label} IP range{bang} {ipaddress.IPv4Address(self.lo)}-" \
               f"{ipaddress.IPv4Address(self.hi)}"


@dataclass(frozen=True)
class IprangeMatch(Match):
    src: Optional[AddressRange]
    dst: Optional[AddressRange]
    name = "iprange"
    revision = 1


def _range(p: tuple, lo: int, hi: int, flags: int, present: int,
           invert: int) -> Optional[AddressRange]:
    if not flags & present:
        return None
    return AddressRange(int.from_bytes(p[lo][:4], "big"), int.from_bytes(p[hi][:4], "big"),
                        bool(flags & invert))


@register_match
class Iprange(MatchExtension):
    name = "iprange"
    revision = 1
    struct = xt_iprange_mtinfo

    def decode(self, payload: bytes, where: str) -> IprangeMatch:
        # The kernel checks nothing: flags it does not know are ignored, and so is
        # an inversion flag without its range flag.
        p = self.packed.unpack_from(payload)
        flags = p[_FLAGS]
        return IprangeMatch(src=_range(p, _SRC_MIN, _SRC_MAX, flags, IPRANGE_SRC, IPRANGE_SRC_INV),
                            dst=_range(p, _DST_MIN, _DST_MAX, flags, IPRANGE_DST, IPRANGE_DST_INV))

    def emit(self, match: IprangeMatch, asm, out) -> None:
        for r, field in ((match.src, facts.SADDR), (match.dst, facts.DADDR)):
            if r is not None:
                emit_range(asm, field, 4, r.lo, r.hi, r.invert, out, wire_order=True)

    def describe(self, match: IprangeMatch) -> str:
        parts = [r.describe(label) for r, label in ((match.src, "source"),
                                                    (match.dst, "destination")) if r]
        return " ".join(parts)


_SRC_MIN, _SRC_MAX, _DST_MIN, _DST_MAX, _FLAGS = map(
    Iprange.packed.index, ("src_min", "src_max", "dst_min", "dst_max", "flags"))
