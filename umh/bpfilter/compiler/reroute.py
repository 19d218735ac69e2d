"""The mangle table's OUTPUT hook routes a packet again when its rules changed what
decided its route, as iptable_mangle's ipt_mangle_out() and ip6table_mangle's
ip6t_mangle_out() do around ipt_do_table(): a mark for `ip rule fwmark`, the TOS, an
address (IPv6: the hop limit, traffic class or flow label too).

The program notes them first thing (bpfilter_route_snapshot(), into a fact region),
and every verdict of the hook's main program leaves through an epilogue that hands
the verdict to bpfilter_reroute(), which compares and calls the kernel's
ip_route_me_harder() / ip6_route_me_harder() (kmod/mangle.c). Only the module can:
without it no rule of the table can write any of these (MARK, TOS, ... need it), so
there is nothing to route again.
"""
from __future__ import annotations

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_ALU64_IMM, BPF_CALL_KFUNC, BPF_DW, BPF_EXIT_INSN, BPF_JMP_A,
                        BPF_JMP_IMM, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, Kfunc, R0, R1, R2,
                        R3, R4, R5, R6)
from ..ext import MODULE, missing_kfunc
from ..ext.reject import NF_STATE
from ..model import Hook, Table
from ..packet import facts
from ..tables import TABLES

SNAPSHOT_KFUNC = Kfunc("bpfilter_route_snapshot", MODULE)
REROUTE_KFUNC = Kfunc("bpfilter_reroute", MODULE)
SNAP_SIZE = 48   # BPFILTER_ROUTE_SNAP_SIZE (kmod/bpfilter_proto.h)
SNAP = facts.reserve("route_snap", SNAP_SIZE)
facts.OPTIONAL["route_snap"] = lambda asm, k: None   # filled by the snapshot call
FACTS = frozenset({"skb", "nf_state", "route_snap"})
NF_DROP, NF_ACCEPT = 0, 1


def rerouted(table: Table) -> frozenset[Hook]:
    """The table's hooks whose verdicts go through the reroute epilogue."""
    hooks = TABLES[table.name].reroutes
    if not hooks or missing_kfunc(REROUTE_KFUNC):
        return frozenset()
    return frozenset(hooks)


def emit_snapshot(asm: Assembler) -> None:
    """After the prologue (R6 = &facts, skb and hook state among them)."""
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, SNAP),
             BPF_MOV64_IMM(R4, SNAP_SIZE), BPF_CALL_KFUNC(SNAPSHOT_KFUNC))


def emit_epilogue(asm: Assembler, start: int) -> None:
    """Every exit of the main program from item `start` on (after the snapshot) goes
    through the reroute; subprograms return their verdicts to one of those."""
    epilogue, done = asm.label("reroute"), asm.label("rerouted")
    exit_code = BPF_EXIT_INSN().code
    for i in range(start, len(asm.items)):
        if asm.items[i].code == exit_code:
            asm.items[i] = BPF_JMP_A(epilogue)
    asm.place(epilogue)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, NF_ACCEPT, done),
             BPF_MOV64_REG(R5, R0),
             BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, SNAP),
             BPF_MOV64_IMM(R4, SNAP_SIZE), BPF_CALL_KFUNC(REROUTE_KFUNC),
             # NF_ACCEPT or NF_DROP, the only verdicts a netfilter program returns
             BPF_JMP_IMM(I.BPF_JEQ, R0, NF_ACCEPT, done), BPF_MOV64_IMM(R0, NF_DROP))
    asm.place(done)
    asm.emit(BPF_EXIT_INSN())
