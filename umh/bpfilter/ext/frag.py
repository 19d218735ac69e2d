"""-m frag: --fragid, --fraglen, --fragres, --fragfirst, --fragmore, --fraglast
(struct ip6t_frag, revision 0; net/ipv6/netfilter/ip6t_frag.c).

frag_mt6(): the first fragment header (exthdr.py says how it is found; a later
fragment's own header is found too), its 8 bytes read (else hotdrop; no length
check, the header has no length field), then: the identification within the range
(always tested: the default range is everything), and if asked the reserved bits
zero (the reserved byte and the two bits between offset and M), the offset zero
(first), M set (more), M clear (last). --fraglen is stored (IP6T_FRAG_LEN, hdrlen)
and printed, but the kernel never tests it.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_LDX_MEM, R1, R2, R6
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet.primitives import emit_range
from . import MatchExtension, register_match
from .exthdr import BUF, SEARCHES, emit_find, emit_read

NEXTHDR_FRAGMENT = 44
IP6T_FRAG_IDS, IP6T_FRAG_LEN, IP6T_FRAG_RES = 0x01, 0x02, 0x04
IP6T_FRAG_FST, IP6T_FRAG_MF, IP6T_FRAG_NMF = 0x08, 0x10, 0x20
IP6T_FRAG_INV_IDS, IP6T_FRAG_INV_LEN = 0x01, 0x02
IP6T_FRAG_INV_MASK = 0x03
IP6_MF = 0x0001

ip6t_frag = Struct(
    "ids" / Int32un[2],
    "hdrlen" / Int32un,
    "flags" / Int8un,
    "invflags" / Int8un,
    Padding(2),
)


@dataclass(frozen=True)
class FragMatch(Match):
    ids: tuple[int, int]
    hdrlen: int
    flags: int
    invflags: int
    name = "frag"
    revision = 0


@register_match
class Frag(MatchExtension):
    name = "frag"
    families = (Family.IPV6,)
    struct = ip6t_frag
    facts = SEARCHES

    def decode(self, payload: bytes, where: str) -> FragMatch:
        id_lo, id_hi, hdrlen, flags, invflags = self.packed.unpack_from(payload)
        if invflags & ~IP6T_FRAG_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: frag: unknown inversion flags "
                                              f"{invflags:#x}")
        return FragMatch((id_lo, id_hi), hdrlen, flags, invflags)

    def emit(self, m: FragMatch, asm, out) -> None:
        emit_find(asm, NEXTHDR_FRAGMENT, out)
        emit_read(asm, 0, 8, out)      # struct frag_hdr
        emit_range(asm, BUF + 4, 4, *m.ids, bool(m.invflags & IP6T_FRAG_INV_IDS), out,
                   wire_order=True)
        # frag_off is BUF[2] (offset's high bits), BUF[3] (its low five bits, two
        # reserved bits, M)
        if m.flags & IP6T_FRAG_RES:
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, BUF + 1), BPF_LDX_MEM(BPF_B, R2, R6, BUF + 3),
                     BPF_ALU64_IMM(I.BPF_AND, R2, 0x06), BPF_ALU64_REG(I.BPF_OR, R1, R2))
            out.mismatch(R1)
        if m.flags & IP6T_FRAG_FST:
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, BUF + 2), BPF_LDX_MEM(BPF_B, R2, R6, BUF + 3),
                     BPF_ALU64_IMM(I.BPF_AND, R2, 0xF8), BPF_ALU64_REG(I.BPF_OR, R1, R2))
            out.mismatch(R1)
        if m.flags & (IP6T_FRAG_MF | IP6T_FRAG_NMF):
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, BUF + 3), BPF_ALU64_IMM(I.BPF_AND, R1, IP6_MF))
            if m.flags & IP6T_FRAG_NMF:      # last: M set fails
                out.mismatch(R1)
            if m.flags & IP6T_FRAG_MF:       # more: M clear fails (both: never)
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
                out.mismatch(R1)

    def describe(self, m: FragMatch) -> str:
        # frag_print(): "frag " then the ids glued on, each flag after a space
        text = "frag "
        lo, hi = m.ids
        inv = "!" if m.invflags & IP6T_FRAG_INV_IDS else ""
        if lo != 0 or hi != 0xFFFFFFFF or inv:
            text += f"id:{inv}{lo}" if lo == hi else f"ids:{inv}{lo}:{hi}"
        if m.flags & IP6T_FRAG_LEN:
            text += f" length:{'!' if m.invflags & IP6T_FRAG_INV_LEN else ''}{m.hdrlen}"
        for flag, word in ((IP6T_FRAG_RES, "reserved"), (IP6T_FRAG_FST, "first"),
                           (IP6T_FRAG_MF, "more"), (IP6T_FRAG_NMF, "last")):
            if m.flags & flag:
                text += f" {word}"
        return text    # its trailing space too: ip6tables prints the next match after it
