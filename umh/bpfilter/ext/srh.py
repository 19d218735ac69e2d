"""-m srh: IPv6's segment routing header (struct ip6t_srh, revision 0; struct ip6t_srh1
with the previous, next and last segment ids, revision 1; net/ipv6/netfilter/ip6t_srh.c).

srh_mt6()/srh1_mt6(): the first routing header (exthdr.py says how it is found: a
search that fails fails the match, without a drop), its 8 fixed bytes read, as long as
its length says within the packet, of type 4 and with segments_left <= last_entry
(first_segment) — anything else fails the match, never dropping the packet; then each
test its flag asks for: next header, length (=, >, <), segments left (=, >, <), last
entry (=, >, <), tag, and in revision 1 the segment ids, each an address under a mask
read at its place in the list (the previous one: none when segments_left is the last
entry; the next: none when segments_left is 0). The tag is compared as the kernel
compares it: the header's 16 bits as they lie in memory against the rule's host-order
number.
"""
from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass

from construct import Bytes, Int8un, Int16un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_LDX_MEM, BPF_MOV64_REG,
                        BPF_STX_MEM, BPF_W, R1, R2, R3, R6, R7)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts, ipv6
from ..packet.primitives import emit_masked_equal, emit_name_equal, emit_nonzero_bit, emit_range
from . import MatchExtension, register_match
from .exthdr import BUF, HDRLEN, PTR, SEARCHES, emit_read

IPV6_SRCRT_TYPE_4 = 4
SRH_FIXED = 8            # struct ipv6_sr_hdr up to its segments
SID = 16
# mt_flags, and mt_invflags at the same bits
(NEXTHDR, LEN_EQ, LEN_GT, LEN_LT, SEGS_EQ, SEGS_GT, SEGS_LT, LAST_EQ, LAST_GT, LAST_LT,
 TAG, PSID, NSID, LSID) = (1 << i for i in range(14))
IP6T_SRH_MASK = IP6T_SRH_INV_MASK = 0x3FFF

_V0 = ("next_hdr" / Int8un, "hdr_len" / Int8un, "segs_left" / Int8un, "last_entry" / Int8un,
       "tag" / Int16un)
ip6t_srh = Struct(*_V0, "mt_flags" / Int16un, "mt_invflags" / Int16un)
ip6t_srh1 = Struct(*_V0, Padding(2),        # (struct in6_addr is 4-aligned)
                   "psid_addr" / Bytes(16), "nsid_addr" / Bytes(16),
                   "lsid_addr" / Bytes(16), "psid_msk" / Bytes(16), "nsid_msk" / Bytes(16),
                   "lsid_msk" / Bytes(16), "mt_flags" / Int16un, "mt_invflags" / Int16un)

# (flag, the fixed header's byte, the rule's value (SrhMatch.fields), how it compares,
# iptables' word)
_FIELD_TESTS = ((NEXTHDR, 0, 0, "==", "next-hdr"), (LEN_EQ, 1, 1, "==", "hdr-len-eq"),
                (LEN_GT, 1, 1, ">", "hdr-len-gt"), (LEN_LT, 1, 1, "<", "hdr-len-lt"),
                (SEGS_EQ, 3, 2, "==", "segs-left-eq"), (SEGS_GT, 3, 2, ">", "segs-left-gt"),
                (SEGS_LT, 3, 2, "<", "segs-left-lt"), (LAST_EQ, 4, 3, "==", "last-entry-eq"),
                (LAST_GT, 4, 3, ">", "last-entry-gt"), (LAST_LT, 4, 3, "<", "last-entry-lt"))


@dataclass(frozen=True)
class SrhMatch(Match):
    fields: tuple          # (next_hdr, hdr_len, segs_left, last_entry, tag)
    flags: int
    invflags: int
    sids: tuple = ()       # revision 1: ((flag, addr, mask, iptables' word), ...) asked for
    name = "srh"
    revision = 0


@register_match
class Srh(MatchExtension):
    name = "srh"
    families = (Family.IPV6,)
    struct = ip6t_srh
    facts = SEARCHES

    def decode(self, payload: bytes, where: str) -> SrhMatch:
        p = self.struct.parse(payload)
        if p.mt_flags & ~IP6T_SRH_MASK or p.mt_invflags & ~IP6T_SRH_INV_MASK:   # srh_mt6_check()
            raise BpfilterError(errno.EINVAL, f"{where}: srh: unknown flags {p.mt_flags:#x} "
                                              f"or inversion flags {p.mt_invflags:#x}")
        fields = (p.next_hdr, p.hdr_len, p.segs_left, p.last_entry, p.tag)
        if self.revision == 0:
            return SrhMatch(fields, p.mt_flags, p.mt_invflags)
        sids = tuple((flag, p[f"{w}_addr"], p[f"{w}_msk"], w) for flag, w in
                     ((PSID, "psid"), (NSID, "nsid"), (LSID, "lsid")) if p.mt_flags & flag)
        return Srh1Match(fields, p.mt_flags, p.mt_invflags, sids)

    def emit(self, m: SrhMatch, asm, out) -> None:
        # R7 = where the first routing header starts, 0 when the search failed
        asm.emit(BPF_LDX_MEM(BPF_W, R7, R6, ipv6.EXTHDR_OFFSET[ipv6.NEXTHDR_ROUTING]),
                 BPF_STX_MEM(BPF_W, R6, R7, PTR), BPF_MOV64_REG(R1, R7))
        emit_nonzero_bit(asm, R1, R3)
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
        out.mismatch(R1)
        emit_read(asm, 0, SRH_FIXED, out, short_fails=True)
        # as long as ipv6_optlen() says, within the packet: skb->len - ptr >= len
        asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, BUF + 1), BPF_ALU64_IMM(I.BPF_ADD, R2, 1),
                 BPF_ALU64_IMM(I.BPF_LSH, R2, 3),
                 BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_ALU64_REG(I.BPF_SUB, R1, R7),
                 BPF_ALU64_REG(I.BPF_SUB, R1, R2), BPF_ALU64_IMM(I.BPF_RSH, R1, 63))
        out.mismatch(R1)
        emit_masked_equal(asm, BUF + 2, 1, 0xFF, IPV6_SRCRT_TYPE_4, False, out)
        # segments_left <= first_segment: last_entry - segments_left is not negative
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, BUF + 4), BPF_LDX_MEM(BPF_B, R2, R6, BUF + 3),
                 BPF_ALU64_REG(I.BPF_SUB, R1, R2), BPF_ALU64_IMM(I.BPF_RSH, R1, 63))
        out.mismatch(R1)
        for flag, at, field, how, _ in _FIELD_TESTS:
            if m.flags & flag:
                value = m.fields[field]
                invert = bool(m.invflags & flag)
                if how == "==":
                    emit_masked_equal(asm, BUF + at, 1, 0xFF, value, invert, out)
                elif how == ">":
                    _emit_range_or_never(asm, BUF + at, value + 1, 0xFF, invert, out)
                else:
                    _emit_range_or_never(asm, BUF + at, 0, value - 1, invert, out)
        if m.flags & TAG:
            emit_masked_equal(asm, BUF + 6, 2, 0xFFFF, m.fields[4], bool(m.invflags & TAG), out)
        self.emit_sids(m, asm, out)

    def emit_sids(self, m: SrhMatch, asm, out) -> None:
        """Revision 0 has no segment id tests (its flags for them are ignored)."""

    def describe(self, m: SrhMatch) -> str:
        # srh_print() / srh1_print() with -n
        parts = ["srh"]
        for flag, _, field, _, word in _FIELD_TESTS:
            if m.flags & flag:
                parts.append(f"{word}:{'!' if m.invflags & flag else ''}{m.fields[field]}")
        if m.flags & TAG:
            parts.append(f"tag:{'!' if m.invflags & TAG else ''}{m.fields[4]}")
        for flag, addr, mask, word in m.sids:
            prefix = bin(int.from_bytes(mask, "big")).count("1")
            parts.append(f"{word} {'!' if m.invflags & flag else ''} "
                         f"{ipaddress.IPv6Address(addr)}/{prefix}")
        return " ".join(parts)


@dataclass(frozen=True)
class Srh1Match(SrhMatch):
    revision = 1


@register_match
class Srh1(Srh):
    revision = 1
    struct = ip6t_srh1

    def emit_sids(self, m: SrhMatch, asm, out) -> None:
        # HDRLEN keeps segments_left and last_entry (BUF is read over for each id)
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, BUF + 3), BPF_LDX_MEM(BPF_B, R2, R6, BUF + 4),
                 BPF_ALU64_IMM(I.BPF_LSH, R2, 8), BPF_ALU64_REG(I.BPF_OR, R1, R2),
                 BPF_STX_MEM(BPF_W, R6, R1, HDRLEN))
        for flag, addr, mask, word in m.sids:
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, HDRLEN))            # segments_left
            if flag == PSID:
                # none when segments_left is the last entry
                asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, HDRLEN + 1), BPF_ALU64_REG(I.BPF_XOR, R2, R1))
                emit_nonzero_bit(asm, R2, R3)
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R2, 1))
                out.mismatch(R2)
                asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, HDRLEN), BPF_ALU64_IMM(I.BPF_ADD, R1, 1))
            elif flag == NSID:
                asm.emit(BPF_MOV64_REG(R2, R1))
                emit_nonzero_bit(asm, R2, R3)
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R2, 1))
                out.mismatch(R2)
                asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, HDRLEN), BPF_ALU64_IMM(I.BPF_SUB, R1, 1))
            else:
                asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, 0))
            # R7 = srhoff + 8 + index * 16 (an index of -1 or 256 only where the test
            # failed already: past the header, a read that fails)
            asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, 0x1FF), BPF_ALU64_IMM(I.BPF_LSH, R1, 4),
                     BPF_LDX_MEM(BPF_W, R7, R6, PTR), BPF_ALU64_REG(I.BPF_ADD, R7, R1))
            emit_read(asm, SRH_FIXED, SID, out, short_fails=True)
            emit_name_equal(asm, BUF, addr, mask, bool(m.invflags & flag), out)


def _emit_range_or_never(asm, off, lo: int, hi: int, invert: bool, out) -> None:
    """field in [lo, hi] != invert, for a u8; an empty range holds only inverted."""
    if lo > hi:
        if not invert:
            out.never()
        return
    emit_range(asm, off, 1, lo, hi, invert, out)
