"""The packet facts: everything a rule can look at, read from the packet once per
hook invocation into a small struct on the main program's stack.

Reading once keeps every rule a few loads and compares, and lets user chains (BPF
subprograms) see the same facts through one pointer argument (R6 everywhere)
instead of re-parsing the packet. The prologue mirrors what the kernel's
ipt_do_table()/ip6t_do_table() and their ip_packet_match()/ip6_packet_match()
compute before walking the rules: addresses, protocol, fragment offset, ttl (hop
limit), length, device names, skb->len, and the first bytes of the transport
header, whose availability decides the matches' "hotdrop".

The layout is one for both families (addresses have room for IPv6's 16 bytes; IPv4
uses the first 4), so that extensions read the same facts whatever the family. What
differs is how the network header is read: each family's Flavour (ipv4.py, ipv6.py)
fills the facts that come from it, then the shared part reads the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU64_IMM, BPF_B, BPF_CALL_KFUNC, BPF_DW, BPF_ENDIAN,
                        BPF_H, BPF_JMP_IMM, BPF_JMP_A, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG,
                        BPF_ST_MEM, BPF_STX_MEM, BPF_W, FP, R0, R1, R2, R3, R4, R6, R7, R8, R9,
                        Kfunc, Slot)

IFNAMSIZ = 16
IP_OFFSET_MASK = 0x1FFF

# Offsets inside the facts struct (R6 points at it in every frame).
SADDR = 0          # 16 bytes as on the wire (IPv4: the first 4, the rest zero)
DADDR = 16
IN_NAME = 32       # 16 bytes, zero when there is no input device
OUT_NAME = 48
LEN = 64           # u32 skb->len: what the kernel adds to byte counters
PROTO = 68         # u8: IPv4's protocol; IPv6's upper-layer header (ipv6_find_hdr())
L4_AVAIL = 69      # u8: transport header bytes readable at thoff (0, 4, 8 or 20)
FRAGOFF = 70       # u16: the kernel's par->fragoff (IPv4: 8-byte units; IPv6: bytes)
SPORT = 72         # u16 host order (tcp/udp source port)
DPORT = 74
TCP_FLAGS = 76     # u8, byte 13 of the tcp header
ICMP_TYPE = 77
ICMP_CODE = 78
TTL = 79           # u8: IPv4's ttl, IPv6's hop limit
# Read only for tables whose targets need them (OPTIONAL group "skb", ext/log.py):
SKB = 80           # the sk_buff pointer, for targets that read more of it
NETNS = 88         # u32 inode number of the hook's network namespace
TOT_LEN = 92       # u16 host order: IPv4's total length (length_mt6 reads LEN)
THOFF = 96         # u32: where the transport header starts (par->thoff)
FOUND = 100        # u8: IPv6: the extension headers were walked to the upper layer
SIZE = 104
# Optional fact groups (see OPTIONAL) keep what they read in regions of their own,
# laid out after SIZE per table: a table's programs hold on their stack only the
# regions of the groups its rules read (layout()), so that the stack left for user
# chains (BPF's 512 bytes, shared by every frame of a call) stays large. A region's
# fields are Slots, which the assembler turns into offsets with the table's layout.


REGION_SIZES: dict[str, int] = {}
# Groups that fill regions named otherwise than themselves: group -> regions.
REGIONS_OF: dict[str, tuple[str, ...]] = {}


def reserve(region: str, size: int) -> Slot:
    """A new region of `size` bytes (8-aligned); its first byte."""
    if region in REGION_SIZES:
        raise RuntimeError(f"fact region {region!r} reserved twice")
    REGION_SIZES[region] = (size + 7) // 8 * 8
    return Slot(region)


def layout(needs: frozenset) -> dict[str, int]:
    """Where each region the groups `needs` read sits, in name order after SIZE."""
    regions = {r for group in needs for r in REGIONS_OF.get(group, (group,))
               if r in REGION_SIZES}
    out, at = {}, SIZE
    for region in sorted(regions):
        out[region] = at
        at += REGION_SIZES[region]
    return out


def extent(slots: dict[str, int]) -> int:
    """The size of the facts with the regions of a layout."""
    return max((at + REGION_SIZES[r] for r, at in slots.items()), default=SIZE)


MARK = reserve("mark", 4)              # u32 skb->mark
PKTTYPE = reserve("pkttype", 1)        # u8: the packet type as xt_pkttype sees it
_MAC = reserve("mac", 16)
MAC_OK = _MAC                          # u8: 1 when xt_mac may read the Ethernet header
MAC_SRC = _MAC + 8                     # 6 bytes (compared as 8): the Ethernet source
_TCPOPT = reserve("tcpopt", 88)
TCPOPT_DROP = _TCPOPT                  # u8: 1 when tcp --tcp-option hotdrops (bad data
#                                        offset, short options)
TCPOPT = _TCPOPT + 8                   # 40 bytes: the tcp options, zero past their length
TCPOPT_START = _TCPOPT + 48            # 40 bytes: 0x80 where tcp_find_option() looks


# The main frame's stack, from the frame pointer down: scratch for packet reads and
# for map keys at fixed places, then the facts (their size depends on the table's
# layout), then the skb's dynptr, reached from the facts as DYNPTR_FROM_FACTS.
SLICE_FP = -40             # 40 bytes: headers read through a dynptr slice
KEYS_FP = SLICE_FP         # codegen's map keys go below this
SCRATCH = 96               # bytes above the facts
DYNPTR_FROM_FACTS = -16


def facts_fp(slots: dict[str, int]) -> int:
    """Where the facts start on the main frame's stack, for a table's layout."""
    return -(SCRATCH + extent(slots))


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
# R8 = hook state, R9 = transport header offset (keep R8, R9), the network header's
# facts read; each initialises its own region (reserve()). Extensions add theirs here.
OPTIONAL: dict = {}
# Groups that read the kernel's conntrack entry, which exists only in a namespace that
# asked for conntrack (nf_ct_netns_get): whoever attaches a table reading one turns it on.
READ_CONNTRACK: set[str] = set()
# Groups reading conntrack's accounting, which the kernel's checkentry of their match
# turns on (connbytes): whoever loads a table reading one does the same.
COUNT_CONNTRACK: set[str] = set()


class Flavour:
    """What one family's prologue and rules do differently (ipv4.py, ipv6.py)."""

    def emit_network_header(self, asm: Assembler, k: KernelOffsets, drop,
                            needs: frozenset) -> None:
        """With R1..R5 free, R6 = &facts, R7 = skb, R8 = hook state and the skb's
        dynptr at DYNPTR_FROM_FACTS: the facts from the network header (addresses, PROTO,
        FRAGOFF, TTL, TOT_LEN for IPv4, THOFF, FOUND); leaves R9 = THOFF."""
        raise NotImplementedError

    def transport_readable(self, asm: Assembler, skip) -> None:
        """Jump to `skip` unless the transport header is one the matches may read."""
        raise NotImplementedError

    def emit_ip_match(self, asm: Assembler, ip, out) -> None:
        """The rule's ip part (IpHeader / Ip6Header), folded into `out`."""
        raise NotImplementedError

    def unsupported_ip(self, ip, reads_transport: bool) -> "str | None":
        """Why bpfilter cannot run a rule with this ip part exactly, if it cannot;
        `reads_transport`: a match of the rule reads the transport header."""
        return None


def emit_prologue(asm: Assembler, k: KernelOffsets, drop, flavour: Flavour,
                  needs: frozenset = frozenset()) -> None:
    """Fill the facts from the netfilter context in R1; leaves R6 = &facts.

    `drop` is where to go when the IP header cannot be read, which the kernel's
    receive and output paths make impossible; failing closed is the safe answer.
    `needs` names the OPTIONAL groups to read; the code must be assembled with
    layout(needs).
    """
    slots = layout(needs)
    asm.emit(
        BPF_LDX_MEM(BPF_DW, R7, R1, k.ctx_skb),
        BPF_LDX_MEM(BPF_DW, R8, R1, k.ctx_state),
        BPF_MOV64_REG(R6, FP),
        BPF_ALU64_IMM(I.BPF_ADD, R6, facts_fp(slots)),
    )
    # the regions too: the network header's reading may fill some
    for off in range(0, extent(slots), 8):
        asm.emit(BPF_ST_MEM(BPF_DW, R6, off, 0))
    asm.emit(
        BPF_LDX_MEM(BPF_W, R1, R7, k.skb_len), BPF_STX_MEM(BPF_W, R6, R1, LEN),
        BPF_MOV64_REG(R1, R7),
        BPF_MOV64_IMM(R2, 0),
        BPF_MOV64_REG(R3, R6),
        BPF_ALU64_IMM(I.BPF_ADD, R3, DYNPTR_FROM_FACTS),
        BPF_CALL_KFUNC(DYNPTR_FROM_SKB),
        BPF_JMP_IMM(I.BPF_JNE, R0, 0, drop),
    )
    flavour.emit_network_header(asm, k, drop, needs)
    for state_off, name_off in ((k.state_in, IN_NAME), (k.state_out, OUT_NAME)):
        no_dev = asm.label("no_dev")
        asm.emit(
            BPF_LDX_MEM(BPF_DW, R1, R8, state_off),
            BPF_JMP_IMM(I.BPF_JEQ, R1, 0, no_dev),
            BPF_LDX_MEM(BPF_DW, R2, R1, k.dev_name), BPF_STX_MEM(BPF_DW, R6, R2, name_off),
            BPF_LDX_MEM(BPF_DW, R2, R1, k.dev_name + 8), BPF_STX_MEM(BPF_DW, R6, R2, name_off + 8),
        )
        asm.place(no_dev)
    for group in sorted(needs):
        if group in OPTIONAL:    # some groups only hold a region others fill
            OPTIONAL[group](asm, k)

    # Transport header: matches look at it only in first fragments (fragoff == 0).
    # The longest read that succeeds says how much of it there is: tcp needs 20
    # bytes, udp and icmp 8, multiport 4, and each drops a packet with less.
    done = asm.label("l4_done")
    flavour.transport_readable(asm, done)
    for size in (TCP_HEADER, SMALL_HEADER, PORTS_HEADER):
        shorter = done if size == PORTS_HEADER else asm.label("l4_short")
        emit_slice(asm, offset_reg=R9, size=size)
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, 0, shorter),
                 BPF_ST_MEM(BPF_B, R6, L4_AVAIL, size))
        if size == TCP_HEADER:
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R0, 13), BPF_STX_MEM(BPF_B, R6, R1, TCP_FLAGS))
        _emit_l4_first_word(asm)
        if shorter is not done:
            asm.emit(BPF_JMP_A(done))
            asm.place(shorter)
    asm.place(done)


def emit_slice(asm: Assembler, offset_reg, size: int) -> None:
    """R0 = bpf_dynptr_slice(&dynptr, offset, scratch, size), NULL if out of bounds."""
    asm.emit(
        BPF_MOV64_REG(R1, R6),
        BPF_ALU64_IMM(I.BPF_ADD, R1, DYNPTR_FROM_FACTS),
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
