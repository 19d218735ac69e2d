"""-m eui64 (revision 0; net/ipv6/netfilter/ip6t_eui64.c): the source address's
interface identifier is the modified EUI-64 of the frame's Ethernet source address.
Its payload, an int, is never read. Only from PREROUTING, INPUT and FORWARD
(xt_match.hooks: only those have a frame).

eui64_mt6(): a packet whose skb->dev is not Ethernet never matches; one whose MAC
header was never set, or lies less than ETH_HLEN before the network header, is
dropped (hotdrop); then the frame must be IPv6 (h_proto), the packet version 6, and
the source address's last 8 bytes the source MAC with ff:fe in its middle and the
universal/local bit flipped.

The result depends on the packet alone: the prologue works it out once per packet
for tables with an eui64 match (fact group "eui64"). The Ethernet header lies before
skb->data, outside what the skb dynptr covers: it is read from skb->head +
skb->mac_header, as ext/mac.py reads it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from construct import Bytes, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_H,
                        BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_MOV64_REG, BPF_ST_MEM, R0, R1, R2, R3, R4, R5, R6, R7)
from ..model import Family, Hook, Match
from ..packet import facts
from ..packet.primitives import emit_equal_hotdrop, emit_masked_equal
from . import MatchExtension, register_match

ETH_HLEN, ETH_ALEN = 14, 6
ARPHRD_ETHER = 1
ETH_P_IPV6 = 0x86DD
MAC_UNSET = 0xFFFF       # skb_mac_header_was_set(): mac_header != (u16)~0U
_NO, _YES, _HOTDROP = 0, 1, 2

_REGION = facts.reserve("eui64", 16)
_ETH = _REGION             # 14 bytes: the Ethernet header
_RESULT = _REGION + 14     # u8: _NO, _YES or _HOTDROP
_VERSION = _REGION + 15    # u8: the network header's first byte


@dataclass(frozen=True)
class Eui64Match(Match):
    name = "eui64"
    revision = 0


@register_match
class Eui64(MatchExtension):
    name = "eui64"
    families = (Family.IPV6,)
    struct = Struct("unused" / Bytes(4))     # sizeof(int)
    hooks = (1 << Hook.PRE_ROUTING) | (1 << Hook.LOCAL_IN) | (1 << Hook.FORWARD)
    facts = frozenset({"eui64"})

    def decode(self, payload: bytes, where: str) -> Eui64Match:
        return Eui64Match()

    def emit(self, match: Eui64Match, asm, out) -> None:
        emit_equal_hotdrop(asm, _RESULT, 1, _HOTDROP, out)
        emit_masked_equal(asm, _RESULT, 1, 0xFF, _YES, False, out)

    def describe(self, match: Eui64Match) -> str:
        # no print function: ip6tables prints the name
        return "eui64"


@functools.lru_cache(maxsize=1)
def _network_header() -> int:
    return Btf.vmlinux().member("sk_buff", "network_header")[0]


def _read_eui64(asm, k: facts.KernelOffsets) -> None:
    """_RESULT for the packet, in the prologue (R6 = &facts, R7 = skb; R8, R9 kept)."""
    done, drop = asm.label("eui64_done"), asm.label("eui64_drop")
    asm.emit(
        BPF_LDX_MEM(BPF_DW, R1, R7, k.skb_dev),
        BPF_JMP_IMM(I.BPF_JEQ, R1, 0, done),
        BPF_LDX_MEM(BPF_H, R1, R1, k.dev_type),
        BPF_JMP_IMM(I.BPF_JNE, R1, ARPHRD_ETHER, done),
        BPF_LDX_MEM(BPF_H, R2, R7, k.skb_mac_header),
        BPF_JMP_IMM(I.BPF_JEQ, R2, MAC_UNSET, drop),
        # skb_mac_header_len(): network_header - mac_header, as a u32 (a MAC header
        # after the network header is a huge length, not a short one)
        BPF_LDX_MEM(BPF_H, R1, R7, _network_header()),
        BPF_ALU64_REG(I.BPF_SUB, R1, R2),
        BPF_JMP_IMM(I.BPF_JLT, R1, ETH_HLEN, drop),
        BPF_LDX_MEM(BPF_DW, R3, R7, k.skb_head),
        BPF_ALU64_REG(I.BPF_ADD, R3, R2),
        BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _ETH),
        BPF_MOV64_IMM(R2, ETH_HLEN),
        BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
        # the kernel reads it in place; a read that fails here cannot be answered
        # as the kernel would: fail closed
        BPF_JMP_IMM(I.BPF_JNE, R0, 0, drop),
        # h_proto == htons(ETH_P_IPV6)
        BPF_LDX_MEM(BPF_H, R1, R6, _ETH + 12),
        BPF_JMP_IMM(I.BPF_JNE, R1, int.from_bytes(ETH_P_IPV6.to_bytes(2, "big"), "little"),
                    done),
        # ipv6_hdr(skb)->version == 6: the network header is where the dynptr starts
        BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _VERSION),
        BPF_MOV64_IMM(R2, 1),
        BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
        BPF_MOV64_IMM(R4, 0), BPF_MOV64_IMM(R5, 0),
        BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
        BPF_JMP_IMM(I.BPF_JNE, R0, 0, done),
        BPF_LDX_MEM(BPF_B, R1, R6, _VERSION), BPF_ALU64_IMM(I.BPF_RSH, R1, 4),
        BPF_JMP_IMM(I.BPF_JNE, R1, 6, done),
    )
    # eui64: h_source[0..2], ff, fe, h_source[3..5], then eui64[0] ^= 0x02; built in
    # R1 as the 8 bytes load as a little-endian u64, byte i at bits 8i
    source = _ETH + ETH_ALEN
    asm.emit(BPF_MOV64_IMM(R1, 0xFE), BPF_ALU64_IMM(I.BPF_LSH, R1, 32))
    for i, at in enumerate((0, 1, 2, 5, 6, 7)):
        asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, source + i), BPF_ALU64_IMM(I.BPF_LSH, R2, 8 * at),
                 BPF_ALU64_REG(I.BPF_OR, R1, R2))
    asm.emit(BPF_MOV64_IMM(R2, 0xFF), BPF_ALU64_IMM(I.BPF_LSH, R2, 24),
             BPF_ALU64_REG(I.BPF_OR, R1, R2), BPF_ALU64_IMM(I.BPF_XOR, R1, 0x02),
             BPF_LDX_MEM(BPF_DW, R2, R6, facts.SADDR + 8),
             BPF_JMP_REG(I.BPF_JNE, R1, R2, done),
             BPF_ST_MEM(BPF_B, R6, _RESULT, _YES),
             BPF_JMP_A(done))
    asm.place(drop)
    asm.emit(BPF_ST_MEM(BPF_B, R6, _RESULT, _HOTDROP))
    asm.place(done)


facts.OPTIONAL["eui64"] = _read_eui64
