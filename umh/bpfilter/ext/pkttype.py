"""-m pkttype: --pkt-type TYPE (struct xt_pkttype_info, revision 0)."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Int32sl, Struct

from ..bpf import insn as I
from ..bpf.btf import BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_B, BPF_JMP_IMM, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_STX_MEM, R1, R6, R7)
from ..packet import facts
from ..packet.primitives import emit_masked_equal
from ..model import Family, Match
from . import BOTH_FAMILIES, MatchExtension, register_match, xt_invert

PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST = 0, 1, 2, 3
PACKET_LOOPBACK = 5
# What iptables prints for a type (libxt_pkttype's first name for it), else the number.
_NAMES = {PACKET_HOST: "unicast", PACKET_BROADCAST: "broadcast", PACKET_MULTICAST: "multicast",
          PACKET_OTHERHOST: "otherhost"}

xt_pkttype_info = Struct(
    "pkttype" / Int32sl,
    "invert" / Int32sl,
)


@dataclass(frozen=True)
class PkttypeMatch(Match):
    pkttype: int
    invert: int    # raw, see xt_invert
    name = "pkttype"
    revision = 0


def _read_pkttype(asm, k: facts.KernelOffsets, looped_back) -> None:
    """pkttype_mt()'s type: skb->pkt_type, except for looped-back packets (multicast
    and broadcast this host sent to itself), whose type `looped_back` puts in R1."""
    byte, shift = divmod(k.skb_pkt_type, 8)
    if shift + 3 > 8:
        raise BtfError(f"sk_buff.pkt_type straddles a byte (bit {k.skb_pkt_type})")
    store = asm.label("pkttype_store")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R7, byte))
    if shift:
        asm.emit(BPF_ALU64_IMM(I.BPF_RSH, R1, shift))
    asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, 7),
             BPF_JMP_IMM(I.BPF_JNE, R1, PACKET_LOOPBACK, store))
    looped_back(asm)
    asm.place(store)
    asm.emit(BPF_STX_MEM(BPF_B, R6, R1, facts.PKTTYPE))


def _looped_back_ipv4(asm) -> None:
    """Multicast when the IPv4 destination is, broadcast otherwise."""
    # ipv4_is_multicast(daddr): the first octet is 224-239; then R1 = 1 + that
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.DADDR),
             BPF_ALU64_IMM(I.BPF_AND, R1, 0xF0), BPF_ALU64_IMM(I.BPF_XOR, R1, 0xE0),
             BPF_ALU64_IMM(I.BPF_SUB, R1, 1), BPF_ALU64_IMM(I.BPF_RSH, R1, 63),
             BPF_ALU64_IMM(I.BPF_ADD, R1, PACKET_BROADCAST))


def _looped_back_ipv6(asm) -> None:
    """Always multicast: IPv6 has no broadcast (pkttype_mt() does not look at the
    destination)."""
    asm.emit(BPF_MOV64_IMM(R1, PACKET_MULTICAST))


# One group per family: the same region, filled by the family's rule.
FACT_GROUP = {Family.IPV4: "pkttype", Family.IPV6: "pkttype6"}
facts.OPTIONAL["pkttype"] = lambda asm, k: _read_pkttype(asm, k, _looped_back_ipv4)
facts.OPTIONAL["pkttype6"] = lambda asm, k: _read_pkttype(asm, k, _looped_back_ipv6)
facts.REGIONS_OF["pkttype6"] = ("pkttype",)


@register_match
class Pkttype(MatchExtension):
    name = "pkttype"
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_pkttype_info

    def facts_of(self, match: PkttypeMatch) -> frozenset[str]:
        return frozenset({FACT_GROUP[self.family]})

    def decode(self, payload: bytes, where: str) -> PkttypeMatch:
        # pkttype has no checkentry: every payload of the right size is valid
        pkttype, invert = self.packed.unpack_from(payload)
        return PkttypeMatch(pkttype, invert)

    def emit(self, match: PkttypeMatch, asm, out) -> None:
        invert = xt_invert(match.invert)
        if invert is None:
            return
        if not 0 <= match.pkttype <= 0xFF:
            # the packet's type (0-7) never equals it
            if not invert:
                out.never()
            return
        emit_masked_equal(asm, facts.PKTTYPE, 1, 0xFF, match.pkttype, invert, out)

    def describe(self, match: PkttypeMatch) -> str:
        bang = "!" if match.invert else ""
        return f"PKTTYPE {bang}= {_NAMES.get(match.pkttype, match.pkttype)}"
