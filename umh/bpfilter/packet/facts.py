"""The packet facts: everything a rule can look at, read from the packet once per
hook invocation into a small struct on the main program's stack.

Reading once keeps every rule a few loads and compares, and lets user chains (BPF
subprograms) see the same facts through one pointer argument (R6 everywhere)
instead of re-parsing the packet. The prologue mirrors what the kernel's
ipt_do_table()/ip_packet_match() compute before walking the rules: addresses,
protocol, fragment offset, ttl, total length, device names, skb->len, and the
first bytes of the transport header, whose availability decides the matches' "hotdrop".
"""
from __future__ import annotations

from dataclasses import dataclass

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU64_IMM, BPF_B, BPF_CALL_KFUNC, BPF_DW, BPF_ENDIAN,
                        BPF_H, BPF_JMP_IMM, BPF_JMP_A, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG,
                        BPF_ST_MEM, BPF_STX_MEM, BPF_W, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9,
                        Kfunc)

IFNAMSIZ = 16
IP_OFFSET_MASK = 0x1FFF

# Offsets inside the facts struct (R6 points at it in every frame).
SADDR = 0          # u32, bytes as on the wire
DADDR = 4
IN_NAME = 8        # 16 bytes, zero when there is no input device
OUT_NAME = 24
LEN = 40           # u32 skb->len: what the kernel adds to byte counters
PROTO = 44         # u8
L4_AVAIL = 45      # u8: transport header bytes readable at thoff (0, 4, 8 or 20)
FRAGOFF = 46       # u16, in 8-byte units as the kernel's par->fragoff
SPORT = 48         # u16 host order (tcp/udp source port)
DPORT = 50
TCP_FLAGS = 52     # u8, byte 13 of the tcp header
ICMP_TYPE = 53
ICMP_CODE = 54
TTL = 55           # u8
# Read only for tables whose targets need them (OPTIONAL group "skb", ext/log.py):
SKB = 56           # the sk_buff pointer, for targets that read more of it
NETNS = 64         # u32 inode number of the hook's network namespace
TOT_LEN = 68       # u16 host order: the IP header's total length
SIZE = 72
# Optional fact groups (see OPTIONAL) each reserve a region of this area after SIZE;
# the prologue zeroes the area for tables that read any of them.
OPTIONAL_AREA = 224
_reserved = SIZE


def reserve(group: str, size: int) -> int:
    """Offset of a new optional group's region of `size` bytes (8-aligned)."""
    global _reserved
    offset, _reserved = _reserved, _reserved + (size + 7) // 8 * 8
    if _reserved > SIZE + OPTIONAL_AREA:
        raise RuntimeError(f"fact group {group!r} does not fit in the optional area")
    return offset


# The link-layer and packet-detail groups (mark, pkttype, mac, tcpopt):
_LINK = reserve("link", 96)
MARK = _LINK             # u32 skb->mark
PKTTYPE = _LINK + 4      # u8: the packet type as xt_pkttype sees it
MAC_OK = _LINK + 5       # u8: 1 when xt_mac may read the Ethernet header
TCPOPT_DROP = _LINK + 6  # u8: 1 when tcp --tcp-option hotdrops (bad data offset, short options)
MAC_SRC = _LINK + 8      # 6 bytes: the Ethernet source address
TCPOPT = _LINK + 16      # 40 bytes: the tcp options, zero past their length
TCPOPT_START = _LINK + 56   # 40 bytes: 0x80 where tcp_find_option() looks at an option


# The main frame's stack: the facts, then scratch for the packet reads.
FACTS_FP = -(SIZE + OPTIONAL_AREA)
DYNPTR_FP = FACTS_FP - 16
SLICE_FP = DYNPTR_FP - 24

TCP_HEADER = 20    # sizeof(struct tcphdr): tcp needs it whole, as tcp_mt() does
SMALL_HEADER = 8   # sizeof(struct udphdr) == sizeof(struct icmphdr)
PORTS_HEADER = 4   # the two ports: all that multiport reads

DYNPTR_FROM_SKB = Kfunc("bpf_dynptr_from_skb")
DYNPTR_SLICE = Kfunc("bpf_dynptr_slice")


@dataclass(frozen=True)
class KernelOffsets:
    """Struct offsets the prologue needs, read from the running kernel's BTF."""

    ctx_skb: int
    ctx_state: int
    skb_len: int
    state_in: int
    state_out: int
    dev_name: int
    dev_type: int
    skb_mark: int
    skb_pkt_type: int   # bit offset of the 3-bit field
    skb_dev: int
    skb_head: int
    skb_data: int
    skb_mac_header: int

    @classmethod
    def from_btf(cls, btf: Btf) -> "KernelOffsets":
        return cls(
            ctx_skb=btf.member("bpf_nf_ctx", "skb")[0],
            ctx_state=btf.member("bpf_nf_ctx", "state")[0],
            skb_len=btf.member("sk_buff", "len")[0],
            state_in=btf.member("nf_hook_state", "in")[0],
            state_out=btf.member("nf_hook_state", "out")[0],
            dev_name=btf.member("net_device", "name")[0],
            dev_type=btf.member("net_device", "type")[0],
            skb_mark=btf.member("sk_buff", "mark")[0],
            skb_pkt_type=btf.bitfield("sk_buff", "pkt_type")[0],
            skb_dev=btf.member("sk_buff", "dev")[0],
            skb_head=btf.member("sk_buff", "head")[0],
            skb_data=btf.member("sk_buff", "data")[0],
            skb_mac_header=btf.member("sk_buff", "mac_header")[0],
        )


# Facts that cost more than a load or two, read only for tables whose rules look at
# them: group name -> emitter(asm, offsets), run with R6 = &facts, R7 = skb,
# R8 = hook state, R9 = transport header offset (keep R8, R9); each initialises its
# own region (reserve()). Extensions add theirs here.
OPTIONAL: dict = {}


def emit_prologue(asm: Assembler, k: KernelOffsets, drop, needs: frozenset = frozenset()) -> None:
    """Fill the facts from the netfilter context in R1; leaves R6 = &facts.

    `drop` is where to go when the IP header cannot be read, which the kernel's
    ip_rcv()/__ip_local_out() make impossible; failing closed is the safe answer.
    `needs` names the OPTIONAL groups to read.
    """
    asm.emit(
        BPF_LDX_MEM(BPF_DW, R7, R1, k.ctx_skb),
        BPF_LDX_MEM(BPF_DW, R8, R1, k.ctx_state),
        BPF_MOV64_REG(R6, FP),
        BPF_ALU64_IMM(I.BPF_ADD, R6, FACTS_FP),
    )
    for off in range(0, SIZE, 8):
        asm.emit(BPF_ST_MEM(BPF_DW, R6, off, 0))

    asm.emit(
        BPF_MOV64_REG(R1, R7),
        BPF_MOV64_IMM(R2, 0),
        BPF_MOV64_REG(R3, FP),
        BPF_ALU64_IMM(I.BPF_ADD, R3, DYNPTR_FP),
        BPF_CALL_KFUNC(DYNPTR_FROM_SKB),
        BPF_JMP_IMM(I.BPF_JNE, R0, 0, drop),
    )
    _emit_slice(asm, offset_reg=None, size=20)
    asm.emit(
        BPF_JMP_IMM(I.BPF_JEQ, R0, 0, drop),
        BPF_LDX_MEM(BPF_W, R1, R0, 12), BPF_STX_MEM(BPF_W, R6, R1, SADDR),
        BPF_LDX_MEM(BPF_W, R1, R0, 16), BPF_STX_MEM(BPF_W, R6, R1, DADDR),
        BPF_LDX_MEM(BPF_B, R1, R0, 9), BPF_STX_MEM(BPF_B, R6, R1, PROTO),
        BPF_LDX_MEM(BPF_B, R1, R0, 8), BPF_STX_MEM(BPF_B, R6, R1, TTL),
        BPF_LDX_MEM(BPF_H, R1, R0, 2), BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
        BPF_STX_MEM(BPF_H, R6, R1, TOT_LEN),
        BPF_LDX_MEM(BPF_H, R1, R0, 6), BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
        BPF_ALU32_IMM(I.BPF_AND, R1, IP_OFFSET_MASK), BPF_STX_MEM(BPF_H, R6, R1, FRAGOFF),
        # thoff = ihl * 4, kept in R9 for the transport header read
        BPF_LDX_MEM(BPF_B, R9, R0, 0),
        BPF_ALU32_IMM(I.BPF_AND, R9, 0x0F),
        BPF_ALU32_IMM(I.BPF_LSH, R9, 2),
        BPF_LDX_MEM(BPF_W, R1, R7, k.skb_len), BPF_STX_MEM(BPF_W, R6, R1, LEN),
    )
    for state_off, name_off in ((k.state_in, IN_NAME), (k.state_out, OUT_NAME)):
        no_dev = asm.label("no_dev")
        asm.emit(
            BPF_LDX_MEM(BPF_DW, R1, R8, state_off),
            BPF_JMP_IMM(I.BPF_JEQ, R1, 0, no_dev),
            BPF_LDX_MEM(BPF_DW, R2, R1, k.dev_name), BPF_STX_MEM(BPF_DW, R6, R2, name_off),
            BPF_LDX_MEM(BPF_DW, R2, R1, k.dev_name + 8), BPF_STX_MEM(BPF_DW, R6, R2, name_off + 8),
        )
        asm.place(no_dev)
    if needs:
        for off in range(SIZE, _reserved, 8):
            asm.emit(BPF_ST_MEM(BPF_DW, R6, off, 0))
    for group in sorted(needs):
        OPTIONAL[group](asm, k)

    # Transport header: matches look at it only in first fragments (fragoff == 0).
    # The longest read that succeeds says how much of it there is: tcp needs 20
    # bytes, udp and icmp 8, multiport 4, and each drops a packet with less.
    done = asm.label("l4_done")
    asm.emit(
        BPF_LDX_MEM(BPF_H, R1, R6, FRAGOFF),
        BPF_JMP_IMM(I.BPF_JNE, R1, 0, done),
    )
    for size in (TCP_HEADER, SMALL_HEADER, PORTS_HEADER):
        shorter = done if size == PORTS_HEADER else asm.label("l4_short")
        _emit_slice(asm, offset_reg=R9, size=size)
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, 0, shorter),
                 BPF_ST_MEM(BPF_B, R6, L4_AVAIL, size))
        if size == TCP_HEADER:
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R0, 13), BPF_STX_MEM(BPF_B, R6, R1, TCP_FLAGS))
        _emit_l4_first_word(asm)
        if shorter is not done:
            asm.emit(BPF_JMP_A(done))
            asm.place(shorter)
    asm.place(done)


def _emit_slice(asm: Assembler, offset_reg, size: int) -> None:
    """R0 = bpf_dynptr_slice(&dynptr, offset, scratch, size), NULL if out of bounds."""
    asm.emit(
        BPF_MOV64_REG(R1, FP),
        BPF_ALU64_IMM(I.BPF_ADD, R1, DYNPTR_FP),
        BPF_MOV64_REG(R2, offset_reg) if offset_reg is not None else BPF_MOV64_IMM(R2, 0),
        BPF_MOV64_REG(R3, FP),
        BPF_ALU64_IMM(I.BPF_ADD, R3, SLICE_FP),
        BPF_MOV64_IMM(R4, size),
        BPF_CALL_KFUNC(DYNPTR_SLICE),
    )


def _emit_l4_first_word(asm: Assembler) -> None:
    """Ports (tcp/udp) and type/code (icmp) share the transport header's first bytes."""
    asm.emit(
        BPF_LDX_MEM(BPF_H, R1, R0, 0), BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
        BPF_STX_MEM(BPF_H, R6, R1, SPORT),
        BPF_LDX_MEM(BPF_H, R1, R0, 2), BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
        BPF_STX_MEM(BPF_H, R6, R1, DPORT),
        BPF_LDX_MEM(BPF_B, R1, R0, 0), BPF_STX_MEM(BPF_B, R6, R1, ICMP_TYPE),
        BPF_LDX_MEM(BPF_B, R1, R0, 1), BPF_STX_MEM(BPF_B, R6, R1, ICMP_CODE),
    )
