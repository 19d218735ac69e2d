"""-p mobility-header -m mh: --mh-type (struct ip6t_mh, revision 0;
net/ipv6/netfilter/ip6t_mh.c, xt_match.proto = IPPROTO_MH).

mh_mt6(): a fragment other than the first never matches; the 6 bytes of struct
ip6_mh at par->thoff read (else hotdrop); a payload proto other than "no next
header" (59) hotdrops too; then the type within the range.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_ALU64_IMM, BPF_B, BPF_LDX_MEM, R1, R3, R6
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import emit_nonzero, emit_nonzero_bit, emit_range
from . import MatchExtension, register_match
from .exthdr import BUF, READS, emit_read, emit_thoff

IPPROTO_MH = 135
IPPROTO_NONE = 59
MH_HEADER = 6
IP6T_MH_INV_TYPE = 0x01
IP6T_MH_INV_MASK = 0x01

ip6t_mh = Struct(
    "types" / Int8un[2],
    "invflags" / Int8un,
    Padding(1),
)

@dataclass(frozen=True)
class MhMatch(Match):
    types: tuple[int, int]
    invflags: int
    name = "mh"
    revision = 0


@register_match
class Mh(MatchExtension):
    name = "mh"
    families = (Family.IPV6,)
    struct = ip6t_mh
    proto = IPPROTO_MH
    reads_transport = True
    facts = READS

    def decode(self, payload: bytes, where: str) -> MhMatch:
        type_lo, type_hi, invflags = self.packed.unpack_from(payload)
        if invflags & ~IP6T_MH_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: mh: unknown inversion flags "
                                              f"{invflags:#x}")
        return MhMatch((type_lo, type_hi), invflags)

    def emit(self, m: MhMatch, asm, out) -> None:
        emit_nonzero(asm, facts.FRAGOFF, 2, invert=True, out=out)
        emit_thoff(asm)
        emit_read(asm, 0, MH_HEADER, out)
        # "Dropping invalid MH Payload Proto"
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, BUF), BPF_ALU64_IMM(I.BPF_XOR, R1, IPPROTO_NONE))
        emit_nonzero_bit(asm, R1, R3)
        out.hotdrop(R1)
        emit_range(asm, BUF + 2, 1, *m.types, bool(m.invflags & IP6T_MH_INV_TYPE), out)

    def describe(self, m: MhMatch) -> str:
        # mh_print() with -n: numbers
        lo, hi = m.types
        inv = "!" if m.invflags & IP6T_MH_INV_TYPE else ""
        if lo == 0 and hi == 0xFF and not inv:
            return "mh"
        return f"mh {inv}{lo}" if lo == hi else f"mh {inv}{lo}:{hi}"
