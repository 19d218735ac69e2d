"""-m cluster (struct xt_cluster_match_info, revision 0): the kernel's own, run by
bpfilter.ko (ext/xtmatch.py). It hashes the conntrack entry's (its master's) original
source address with the rule's seed; and, to let a cluster share a multicast MAC
address, it turns a unicast-addressed packet of type PACKET_MULTICAST into
PACKET_HOST. The packet type is one of the facts the prologue reads once: after the
match it is read again, so that a later `-m pkttype` sees what the kernel's would."""
from __future__ import annotations

from construct import Int32un, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import BPF_ALU64_IMM, BPF_B, BPF_JMP_IMM, BPF_LDX_MEM, BPF_DW, BPF_ST_MEM, R1, R6
from ..packet import facts
from . import BOTH_FAMILIES
from .pkttype import FACT_GROUP, PACKET_HOST
from .xtmatch import KernelMatch, plain_kernel_extension

XT_CLUSTER_F_INV = 1

xt_cluster_match_info = Struct("total_nodes" / Int32un, "node_mask" / Int32un,
                               "hash_seed" / Int32un, "flags" / Int32un)


def _facts(self, match) -> frozenset[str]:
    return KernelMatch.facts | {FACT_GROUP[self.family]}


def _after(self, match, asm) -> None:
    """xt_cluster_mt() may have made the packet PACKET_HOST (R0 kept): then it is,
    for pkttype_mt() too, which maps only PACKET_LOOPBACK."""
    bit_offset, _ = Btf.vmlinux().bitfield("sk_buff", "pkt_type")
    byte, shift = divmod(bit_offset, 8)
    kept = asm.label("cluster_pkttype_kept")
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_B, R1, R1, byte))
    if shift:
        asm.emit(BPF_ALU64_IMM(I.BPF_RSH, R1, shift))
    asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, 7), BPF_JMP_IMM(I.BPF_JNE, R1, PACKET_HOST, kept),
             BPF_ST_MEM(BPF_B, R6, facts.PKTTYPE, PACKET_HOST))
    asm.place(kept)


def _describe(f: dict) -> str:
    # libxt_cluster's cluster_mt_print()
    bang = "!" if f["flags"] & XT_CLUSTER_F_INV else ""
    return (f"cluster {bang}node_mask=0x{f['node_mask']:08x} total_nodes={f['total_nodes']} "
            f"hash_seed=0x{f['hash_seed']:08x}")


plain_kernel_extension("match", "cluster", xt_cluster_match_info, BOTH_FAMILIES,
                       why="which hashes the conntrack entry and may change the packet's type",
                       family_independent=True, facts_of=_facts, after_call=_after,
                       describe=_describe)
