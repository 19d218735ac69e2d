"""The records a rule writes to the service's ring (klog.LogRing): the packet's
first bytes and what the service needs of its skb to write LOG's line or send
REJECT's answer; the kind's own fields are its rule's to write."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .. import klog as K
from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_ATOMIC_OP, BPF_B, BPF_DW, BPF_EMIT_CALL,
                        BPF_H, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_MAP_FD, BPF_LD_MAP_VALUE,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W,
                        R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..packet import facts

BPF_FUNC_map_update_elem = 2
BPF_NOEXIST = 1


def emit_record(asm, family: int, refs: "K.RingRefs", classes: tuple, header) -> None:
    """A Record of the packet in the service's ring (refs), of the smallest capture
    class that holds the packet (the largest class for a longer one); `header(asm)`
    writes the fields its kind adds (R7 = the record). Clobbers R0-R5, R7-R9."""
    o = _offsets()
    lost, done = asm.label("record_lost"), asm.label("record_done")
    over = asm.label("record_over_share")
    filled = asm.label("record_packet_copied")
    # the packet bytes are copied first: the copy's length must be known to fit the
    # record, which the verifier sees only on this path. R7 = the record from here on.
    for captured in classes:
        larger = asm.label("record_larger")
        if captured != classes[-1]:
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN),
                     BPF_JMP_IMM(I.BPF_JGT, R1, captured, larger))
        charge = K.ring_charge(K.record_size(captured))
        _emit_charge(asm, refs, charge, lost, over)
        reserved = asm.label("record_reserved")
        asm.emit(BPF_LD_MAP_FD(R1, refs.ring), BPF_MOV64_IMM(R2, K.record_size(captured)),
                 BPF_MOV64_IMM(R3, 0), BPF_EMIT_CALL(I.BPF_FUNC_ringbuf_reserve),
                 BPF_JMP_IMM(I.BPF_JNE, R0, 0, reserved),
                 # the ring is full after all: the share gets its charge back
                 BPF_MOV64_IMM(R1, -charge),
                 BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD, R9, R1, K.SHARE_CHARGED),
                 BPF_JMP_A(lost))
        asm.place(reserved)
        asm.emit(BPF_MOV64_REG(R7, R0))
        _emit_packet_copy(asm, captured)
        asm.emit(BPF_JMP_A(filled))
        asm.place(larger)
    asm.place(filled)
    asm.emit(BPF_ST_MEM(BPF_B, R7, K.R_FAMILY, family))
    header(asm)
    # R8 = the skb; R9 = its device
    # the in and out names are adjacent in the facts and in the record
    for off in range(0, 2 * facts.IFNAMSIZ, 8):
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.IN_NAME + off),
                 BPF_STX_MEM(BPF_DW, R7, R1, K.R_IN + off))
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.NETNS), BPF_STX_MEM(BPF_W, R7, R1, K.R_NETNS),
             BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_STX_MEM(BPF_W, R7, R1, K.R_LEN),
             BPF_LDX_MEM(BPF_DW, R8, R6, facts.SKB),
             BPF_LDX_MEM(BPF_DW, R9, R8, o.skb_dev))
    for base, src_off, size, dst_off in (
            (R8, o.skb_mark, BPF_W, K.R_MARK),
            (R8, o.skb_mac_header, BPF_H, K.R_MAC_HEADER),
            (R8, o.skb_network_header, BPF_H, K.R_NETWORK_HEADER),
            (R8, o.skb_vlan_proto, BPF_H, K.R_VLAN_PROTO),
            (R8, o.skb_vlan_tci, BPF_H, K.R_VLAN_TCI),
            (R9, o.dev_type, BPF_H, K.R_DEV_TYPE),
            (R9, o.dev_hard_header_len, BPF_H, K.R_HARD_HEADER_LEN)):
        asm.emit(BPF_LDX_MEM(size, R1, base, src_off), BPF_STX_MEM(size, R7, R1, dst_off))
    if o.bridge_nf is None:
        asm.emit(BPF_ST_MEM(BPF_B, R7, K.R_BRIDGED, 0))
    else:
        extensions_off, bit = o.bridge_nf
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R8, extensions_off),
                 BPF_ALU64_IMM(I.BPF_AND, R1, 1 << bit),
                 BPF_STX_MEM(BPF_B, R7, R1, K.R_BRIDGED))
    _emit_gso_copy(asm, o)
    _emit_mac_copy(asm, o)
    asm.emit(BPF_MOV64_REG(R1, R7), BPF_MOV64_IMM(R2, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_ringbuf_submit), BPF_JMP_A(done))
    asm.place(over)
    asm.emit(BPF_MOV64_IMM(R1, 1), BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD, R9, R1, K.SHARE_LOST),
             BPF_JMP_A(done))
    asm.place(lost)
    asm.emit(BPF_LD_MAP_VALUE(R1, refs.lost, 0), BPF_MOV64_IMM(R2, 1),
             BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD, R1, R2, 0))
    asm.place(done)


def _emit_charge(asm, refs: "K.RingRefs", charge: int, lost, over) -> None:
    """The namespace's share (R9 = its refs.share entry, made on its first
    record) charged with `charge` bytes of the ring, unless its records in
    flight (charged less drained) would then pass refs.budget's share: `over`.
    The key is the netns inum in the facts."""
    def share_key(map_ref):
        return [*BPF_LD_MAP_FD(R1, map_ref), BPF_MOV64_REG(R2, R6),
                BPF_ALU64_IMM(I.BPF_ADD, R2, facts.NETNS)]

    have, drained = asm.label("record_share_found"), asm.label("record_drained_read")
    asm.emit(*share_key(refs.share), BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, have),
             *share_key(refs.share), BPF_LD_MAP_VALUE(R3, refs.budget, K.BUDGET_ZEROS),
             BPF_MOV64_IMM(R4, BPF_NOEXIST), BPF_EMIT_CALL(BPF_FUNC_map_update_elem),
             *share_key(refs.share), BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, lost))   # every entry taken
    asm.place(have)
    asm.emit(BPF_MOV64_REG(R9, R0),
             *share_key(refs.drained), BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_MOV64_IMM(R8, 0),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, drained),
             BPF_LDX_MEM(BPF_DW, R8, R0, 0))
    asm.place(drained)
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R9, K.SHARE_CHARGED),
             BPF_ALU64_REG(I.BPF_SUB, R1, R8),
             BPF_LD_MAP_VALUE(R2, refs.budget, K.BUDGET_SHARE),
             BPF_LDX_MEM(BPF_DW, R2, R2, 0),
             BPF_ALU64_IMM(I.BPF_ADD, R2, -charge),
             # signed: a share forgotten while a record was on its way drains
             # more than it was charged
             BPF_JMP_REG(I.BPF_JSGT, R1, R2, over),
             BPF_MOV64_IMM(R1, charge),
             BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD, R9, R1, K.SHARE_CHARGED))


def _emit_gso_copy(asm, o: "_Offsets") -> None:
    """skb_shinfo(skb)->gso_size and gso_type, which say whether a length field of 0
    stands for skb->len (BIG TCP): the shared info lies at skb->head + skb->end
    (an offset: NET_SKBUFF_DATA_USES_OFFSET, as on every 64-bit kernel), beyond
    what BTF lets a program read directly."""
    read = asm.label("gso_read")
    for field_off, size, dst_off in ((o.shinfo_gso_size, 2, K.R_GSO_SIZE),
                                     (o.shinfo_gso_type, 4, K.R_GSO_TYPE)):
        asm.emit(BPF_LDX_MEM(BPF_DW, R3, R8, o.skb_head),
                 BPF_LDX_MEM(BPF_W, R1, R8, o.skb_end),
                 BPF_ALU64_REG(I.BPF_ADD, R3, R1),
                 BPF_ALU64_IMM(I.BPF_ADD, R3, field_off),
                 BPF_MOV64_REG(R1, R7), BPF_ALU64_IMM(I.BPF_ADD, R1, dst_off),
                 BPF_MOV64_IMM(R2, size),
                 BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
                 BPF_JMP_IMM(I.BPF_JNE, R0, 0, read))
    asm.place(read)
    asm.emit(BPF_STX_MEM(BPF_B, R7, R0, K.R_GSO_READ))

def _emit_mac_copy(asm, o: "_Offsets") -> None:
    """The link-layer header, which dump_mac_header() prints for packets with an
    input device: it lies before skb->data, out of the dynptr's reach."""
    copied, no_mac = asm.label("mac_copied"), asm.label("no_mac")
    at_least, at_most = asm.label("mac_min"), asm.label("mac_max")
    asm.emit(BPF_ST_MEM(BPF_B, R7, K.R_MAC_READ, K.MAC_NONE),
             BPF_LDX_MEM(BPF_B, R1, R6, facts.IN_NAME),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, no_mac),
             BPF_LDX_MEM(BPF_H, R3, R8, o.skb_mac_header),
             BPF_JMP_IMM(I.BPF_JEQ, R3, K.MAC_UNSET, no_mac),
             BPF_LDX_MEM(BPF_DW, R1, R8, o.skb_head),
             BPF_ALU64_REG(I.BPF_ADD, R3, R1),
             # --log-macdecode reads an ethernet header whatever hard_header_len says
             BPF_LDX_MEM(BPF_H, R2, R7, K.R_HARD_HEADER_LEN),
             BPF_JMP_IMM(I.BPF_JGE, R2, K.ETH_HLEN, at_least),
             BPF_MOV64_IMM(R2, K.ETH_HLEN))
    asm.place(at_least)
    asm.emit(BPF_JMP_IMM(I.BPF_JLE, R2, K.MAC_MAX, at_most), BPF_MOV64_IMM(R2, K.MAC_MAX))
    asm.place(at_most)
    asm.emit(BPF_MOV64_REG(R1, R7), BPF_ALU64_IMM(I.BPF_ADD, R1, K.R_MAC),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
             BPF_MOV64_IMM(R1, K.MAC_COPIED),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, copied),
             BPF_MOV64_IMM(R1, K.MAC_FAILED))
    asm.place(copied)
    asm.emit(BPF_STX_MEM(BPF_B, R7, R1, K.R_MAC_READ))
    asm.place(no_mac)

def _emit_packet_copy(asm, captured: int) -> None:
    """The packet's first bytes, up to `captured`, through the prologue's skb
    dynptr (which reads paged data too)."""
    short = asm.label("short_packet")
    asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, facts.LEN),
             BPF_JMP_IMM(I.BPF_JLE, R2, captured, short),
             BPF_MOV64_IMM(R2, captured))
    asm.place(short)
    asm.emit(BPF_STX_MEM(BPF_H, R7, R2, K.R_CAPTURED),
             BPF_MOV64_REG(R1, R7), BPF_ALU64_IMM(I.BPF_ADD, R1, K.R_PACKET),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_IMM(R4, 0), BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_STX_MEM(BPF_B, R7, R0, K.R_PACKET_READ))


@dataclass(frozen=True)
class _Offsets:
    state_net: int
    net_inum: int
    skb_dev: int
    skb_head: int
    skb_end: int              # u32, an offset from head
    shinfo_gso_size: int
    shinfo_gso_type: int
    skb_mark: int
    skb_mac_header: int
    skb_network_header: int
    skb_vlan_proto: int
    skb_vlan_tci: int
    # (skb->active_extensions, bit of SKB_EXT_BRIDGE_NF); None without br_netfilter
    bridge_nf: "tuple[int, int] | None"
    dev_type: int
    dev_hard_header_len: int


@lru_cache(maxsize=1)
def _offsets() -> _Offsets:
    btf = Btf.vmlinux()
    try:
        bridge_nf = (btf.member("sk_buff", "active_extensions")[0],
                     btf.enum_value("skb_ext_id", "SKB_EXT_BRIDGE_NF"))
    except BtfError:
        bridge_nf = None
    return _Offsets(
        state_net=btf.member("nf_hook_state", "net")[0],
        net_inum=btf.member("net", "ns.inum")[0],
        skb_dev=btf.member("sk_buff", "dev")[0],
        skb_head=btf.member("sk_buff", "head")[0],
        skb_end=btf.member("sk_buff", "end")[0],
        shinfo_gso_size=btf.member("skb_shared_info", "gso_size")[0],
        shinfo_gso_type=btf.member("skb_shared_info", "gso_type")[0],
        skb_mark=btf.member("sk_buff", "mark")[0],
        skb_mac_header=btf.member("sk_buff", "mac_header")[0],
        skb_network_header=btf.member("sk_buff", "network_header")[0],
        skb_vlan_proto=btf.member("sk_buff", "vlan_proto")[0],
        skb_vlan_tci=btf.member("sk_buff", "vlan_tci")[0],
        bridge_nf=bridge_nf,
        dev_type=btf.member("net_device", "type")[0],
        dev_hard_header_len=btf.member("net_device", "hard_header_len")[0],
    )
