"""Packet tracing, as ipt_do_table() and ip6t_do_table() do it: a packet whose
skb->nf_trace is set (-j TRACE in the raw table, ext/trace.py; or nftables) is logged
at every rule it passes, in every table, after the rule is counted and before its
target runs: "TRACE: table:chain:type:rulenum " and the packet, through the kernel's
nf_log_trace().

A traced program reads the bit once (the "nf_trace" fact) and, where it counts an
entry, calls bpfilter_trace() (kmod/trace.c) when the bit is set, with the entry and
the table's trace info: its chains (where each starts, its name) and which entries are
unconditional verdicts, from which the module names the rule as trace_packet()'s walk
does. Only the module can log so, and only it can set the bit for a table of
bpfilter's (TRACE is the kernel's own target): without it nothing is traced.

A program calling a module's kfunc holds the module, and `rmmod bpfilter` is refused
while one is loaded. So the programs of a namespace and family trace only while its
raw table has a TRACE rule (sets_trace()), which is the only way a bpfilter table sets
the bit there (veth and tunnels clear it between namespaces): the service loads its
other tables again then, traced or not, sharing their counters and state
(loader.load_twin()). A bit set by nftables in a namespace without a TRACE rule of
bpfilter's is not seen.
"""
from __future__ import annotations

import errno
import struct
from typing import Optional

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_B, BPF_CALL_KFUNC, BPF_DW, BPF_JMP_IMM, BPF_LD_MAP_VALUE,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_W, FP, Kfunc, MapRef, R1, R2, R3, R4, R5,
                        R6)
from ..errors import BpfilterError
from ..ext import MODULE
from ..ext.reject import NF_STATE
from ..ext.trace import NF_TRACE, TRACE_TARGET
from ..model import Accept, Drop, ExtensionTarget, Return, Table
from ..packet import facts

TRACE_KFUNC = Kfunc("bpfilter_trace", MODULE)
TRACE_INFO = MapRef("trace_info", purpose="the table's chains, for bpfilter_trace()")
FACTS = frozenset({"skb", "nf_state", "nf_trace"})

NAME_SIZE = 32        # BPFILTER_TRACE_NAME_SIZE (kmod/bpfilter_proto.h)
BUILTIN = 1           # BPFILTER_TRACE_BUILTIN
_HEAD = struct.Struct(f"<{NAME_SIZE}sII")          # struct bpfilter_trace_info
_CHAIN = struct.Struct(f"<II{NAME_SIZE}s")         # struct bpfilter_trace_chain
# An array map's value is one allocation: the kernel's KMALLOC_MAX_SIZE with 4 KiB
# pages (MAX_PAGE_ORDER 10)
MAX_INFO = 4 << 20


def sets_trace(table: Table) -> bool:
    """Whether the table has a TRACE rule: its namespace's programs of its family
    trace."""
    return any(isinstance(r.target, ExtensionTarget) and r.target.name == TRACE_TARGET
               for chain in table.chains.values() for r in chain.rules)


def info(table: Table) -> bytes:
    """The table's struct bpfilter_trace_info."""
    chains, tails = [], bytearray((table.num_entries + 7) // 8)
    for chain in table.chains.values():
        first = chain.rules[0].entry if chain.rules else chain.tail_entry
        # rule numbers count from a user chain's ERROR head, the entry before its first
        chains.append(_CHAIN.pack(first if chain.builtin else first - 1,
                                  BUILTIN if chain.builtin else 0,
                                  chain.name.encode("latin-1")[:NAME_SIZE]))
        ends = [r.entry for r in chain.rules
                if r.unconditional and isinstance(r.target, (Accept, Drop, Return))]
        for entry in ends + [chain.tail_entry]:
            tails[entry // 8] |= 1 << entry % 8
    blob = _HEAD.pack(table.name.encode("latin-1"), table.num_entries, len(chains)) \
        + b"".join(chains) + bytes(tails)
    if len(blob) > MAX_INFO:
        raise BpfilterError(errno.E2BIG, f"table {table.name}: its {len(chains)} chains are "
                            f"more than bpfilter.ko's packet tracing can name (a map value of "
                            f"{len(blob)} bytes, beyond {MAX_INFO}); it cannot be traced")
    return blob


def emit_call(asm: Assembler, key_fp: int, info_size: int) -> None:
    """Where an entry was counted (its index at FP + key_fp): its trace, if the
    packet is traced."""
    untraced = asm.label("untraced")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, NF_TRACE), BPF_JMP_IMM(I.BPF_JEQ, R1, 0, untraced),
             BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
             BPF_LD_MAP_VALUE(R3, TRACE_INFO, 0), BPF_MOV64_IMM(R4, info_size),
             BPF_LDX_MEM(BPF_W, R5, FP, key_fp), BPF_CALL_KFUNC(TRACE_KFUNC))
    asm.place(untraced)


def table_info(table: Table, traced: bool) -> Optional[bytes]:
    """The trace info the table's programs read, if they trace."""
    return info(table) if traced else None
