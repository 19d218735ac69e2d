"""-m iprange [!] --src-range A-B [!] --dst-range A-B (struct xt_iprange_mtinfo,
revision 1: the only one Linux still has), for IPv4 (iprange_mt4(): the addresses as
32-bit numbers) and IPv6 (iprange_mt6(): iprange_ipv6_lt() compares the four 32-bit
words in order, i.e. the addresses as 128-bit numbers)."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Optional

from construct import Bytes, Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_ENDIAN, BPF_LDX_MEM,
                        BPF_MOV32_IMM, BPF_MOV64_REG, BPF_W, R0, R1, R2, R3, R6)
from ..packet import facts
from ..packet.primitives import emit_range
from ..model import Family, Match
from . import BOTH_FAMILIES, MatchExtension, register_match

IPRANGE_SRC, IPRANGE_DST, IPRANGE_SRC_INV, IPRANGE_DST_INV = 0x01, 0x02, 0x10, 0x20

xt_iprange_mtinfo = Struct(
    "src_min" / Bytes(16),     # union nf_inet_addr: IPv4 uses the first 4 bytes
    "src_max" / Bytes(16),
    "dst_min" / Bytes(16),
    "dst_max" / Bytes(16),
    "flags" / Int8un,
)


# the bytes of an address in union nf_inet_addr, and how iptables prints one (IPv6:
# xtables_ip6addr_to_numeric(), which is inet_ntop(): "::1.2.3.4", where Python's
# ipaddress says "::102:304")
_WIDTH = {Family.IPV4: 4, Family.IPV6: 16}
_SPELLING = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}


@dataclass(frozen=True)
class AddressRange:
    lo: int          # addresses as numbers (host order), as the kernel compares them
    hi: int
    invert: bool

    def describe(self, label: str, family: Family) -> str:
        bang = " !" if self.invert else ""
        lo, hi = (socket.inet_ntop(_SPELLING[family], a.to_bytes(_WIDTH[family], "big"))
                  for a in (self.lo, self.hi))
        return f"{label} IP range{bang} {lo}-{hi}"


@dataclass(frozen=True)
class IprangeMatch(Match):
    src: Optional[AddressRange]
    dst: Optional[AddressRange]
    name = "iprange"
    revision = 1


def _range(p: tuple, lo: int, hi: int, flags: int, present: int, invert: int,
           width: int) -> Optional[AddressRange]:
    if not flags & present:
        return None
    return AddressRange(int.from_bytes(p[lo][:width], "big"),
                        int.from_bytes(p[hi][:width], "big"), bool(flags & invert))


@register_match
class Iprange(MatchExtension):
    name = "iprange"
    revision = 1
    families = BOTH_FAMILIES
    struct = xt_iprange_mtinfo

    def decode(self, payload: bytes, where: str) -> IprangeMatch:
        # The kernel checks nothing: flags it does not know are ignored, and so is
        # an inversion flag without its range flag.
        p = self.packed.unpack_from(payload)
        flags, width = p[_FLAGS], _WIDTH[self.family]
        return IprangeMatch(
            src=_range(p, _SRC_MIN, _SRC_MAX, flags, IPRANGE_SRC, IPRANGE_SRC_INV, width),
            dst=_range(p, _DST_MIN, _DST_MAX, flags, IPRANGE_DST, IPRANGE_DST_INV, width))

    def emit(self, match: IprangeMatch, asm, out) -> None:
        for r, field in ((match.src, facts.SADDR), (match.dst, facts.DADDR)):
            if r is None:
                continue
            if self.family == Family.IPV4:
                emit_range(asm, field, 4, r.lo, r.hi, r.invert, out, wire_order=True)
                continue
            # m = addr < lo | hi < addr; m ^= invert; a set m fails the match
            _emit_below(asm, R1, field, r.lo, address_first=True)
            asm.emit(BPF_MOV64_REG(R2, R1))
            _emit_below(asm, R1, field, r.hi, address_first=False)
            asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2))
            if r.invert:
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
            out.mismatch(R1)

    def describe(self, match: IprangeMatch) -> str:
        parts = [r.describe(label, self.family) for r, label in ((match.src, "source"),
                                                                 (match.dst, "destination")) if r]
        return " ".join(parts)


def _emit_below(asm, dst: int, field: int, bound: int, address_first: bool) -> None:
    """dst = 1 if the IPv6 address at `field` is below `bound` (address_first), or
    `bound` below it; else 0. iprange_ipv6_lt() decides at the first 32-bit word that
    differs, so from the last word up: below = word_below | (word_equal & below).
    Without branches, with R0, R3 and dst only (R2 may hold the other bound's answer):
    words are 32-bit numbers in 64-bit registers, so a difference is negative exactly
    when the first is below the second."""
    for i in reversed(range(4)):
        word = bound >> (32 * (3 - i)) & 0xFFFFFFFF
        # R3 = the address's word i, R0 = bound word - address word (a 32-bit mov
        # zero-extends), negated when the address comes first: its sign says which
        # is below
        asm.emit(BPF_LDX_MEM(BPF_W, R3, R6, field + 4 * i), BPF_ENDIAN(I.BPF_TO_BE, R3, 32),
                 BPF_MOV32_IMM(R0, word), BPF_ALU64_REG(I.BPF_SUB, R0, R3))
        if address_first:
            asm.emit(BPF_ALU64_IMM(I.BPF_NEG, R0, 0))
        asm.emit(BPF_ALU64_IMM(I.BPF_RSH, R0, 63))
        if i == 3:
            asm.emit(BPF_MOV64_REG(dst, R0))
            continue
        # R3 = 1 if the words are equal: (word ^ bound word) - 1 is negative only for 0
        asm.emit(BPF_ALU32_IMM(I.BPF_XOR, R3, word), BPF_ALU64_IMM(I.BPF_SUB, R3, 1),
                 BPF_ALU64_IMM(I.BPF_RSH, R3, 63),
                 BPF_ALU64_REG(I.BPF_AND, dst, R3), BPF_ALU64_REG(I.BPF_OR, dst, R0))


_SRC_MIN, _SRC_MAX, _DST_MIN, _DST_MAX, _FLAGS = map(
    Iprange.packed.index, ("src_min", "src_max", "dst_min", "dst_max", "flags"))
