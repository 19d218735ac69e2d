"""-m connbytes (struct xt_connbytes_info, revision 0): the packets, bytes or average
packet size its conntrack entry counted, in one direction or both, within a range.

With bpfilter.ko: the kernel's own xt_connbytes (ext/xtmatch.py), whose checkentry
takes conntrack and, as it says, forces its accounting on.

Without it (`bpfilter serve`): connbytes_mt() in BPF. The counters are conntrack's
accounting extension (struct nf_conn_acct, found as nf_ct_ext_find() finds it: the
entry's extension area and its offset for NF_CT_EXT_ACCT, from BTF), which the
"ctacct" fact group reads once per packet: conntrack counted the packet before any
table runs, and no table changes the counters. connbytes_mt_check()'s side effect is
the service's (ctnetns.force_accounting): a table with connbytes turns conntrack on and
sets the namespace's nf_conntrack_acct, as the kernel's check does, with its warning.
An entry made before accounting was on has no counters: the match fails, as the
kernel's does.
"""
from __future__ import annotations

import errno
import functools
from dataclasses import dataclass
from typing import Optional

from construct import Int8un, Int64un, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_JMP_A, BPF_JMP_IMM,
                        BPF_JMP_REG, BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_ST_MEM, R0,
                        R1, R2, R3, R6, R7)
from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from . import BOTH_FAMILIES, register_match
from .ctext import conntrack_btf, emit_ext_find, emit_nf_ct_get, ext_offsets
from .kread import probe
from .xtmatch import ServedKernelMatch

xt_connbytes_info = Struct("from_" / Int64un, "to" / Int64un, "what" / Int8un,
                           "direction" / Int8un, Padding(6))
XT_CONNBYTES_PKTS, XT_CONNBYTES_BYTES, XT_CONNBYTES_AVGPKT = 0, 1, 2
XT_CONNBYTES_DIR_ORIGINAL, XT_CONNBYTES_DIR_REPLY, XT_CONNBYTES_DIR_BOTH = 0, 1, 2
_WHAT = ("packets", "bytes", "avgpkt")
_DIRECTION = ("original", "reply", "both")

# The "ctacct" region: whether the entry has counters, then struct nf_conn_counter[2]
# as the kernel keeps them (original, reply; each packets then bytes, u64).
_REGION = facts.reserve("ctacct", 40)
ACCT_PRESENT = _REGION
ACCT_COUNTERS = _REGION + 8
_PACKETS, _BYTES, _REPLY = 0, 8, 16
facts.READ_CONNTRACK.add("ctacct")
facts.COUNT_CONNTRACK.add("ctacct")


@dataclass(frozen=True)
class AcctOffsets:
    counter: int        # nf_conn_acct->counter
    counters_size: int


def _acct(b) -> AcctOffsets:
    counters_size = 2 * b.struct_size("nf_conn_counter")
    if counters_size != 32 or b.member("nf_conn_counter", "bytes")[0] != 8:
        raise BtfError("struct nf_conn_counter is not {packets, bytes}")
    return AcctOffsets(counter=b.member("nf_conn_acct", "counter")[0],
                       counters_size=counters_size)


@functools.lru_cache(maxsize=1)
def acct_offsets() -> AcctOffsets:
    ext_offsets("NF_CT_EXT_ACCT")
    return conntrack_btf("connbytes needs conntrack's accounting extension", _acct)


def _read_counters(asm, k: facts.KernelOffsets) -> None:
    """The prologue's part (R7 = skb): nf_ct_get(), nf_conn_acct_find(), its counters.
    The counters' slots are the walk's scratch on the way."""
    o = acct_offsets()
    done = asm.label("ctacct_done")
    emit_nf_ct_get(asm, R7, done)
    emit_ext_find(asm, "NF_CT_EXT_ACCT", ACCT_COUNTERS, done)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, o.counter))
    probe(asm, ACCT_COUNTERS, o.counters_size)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, done), BPF_ST_MEM(BPF_B, R6, ACCT_PRESENT, 1))
    asm.place(done)


facts.OPTIONAL["ctacct"] = _read_counters


@dataclass(frozen=True)
class ServedConnbytesMatch(Match):
    """connbytes without bpfilter.ko: its payload's fields, run in BPF."""
    from_: int
    to: int
    what: int
    direction: int
    name = "connbytes"
    revision = 0


@register_match
class Connbytes(ServedKernelMatch):
    name = "connbytes"
    revision = 0
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_connbytes_info
    why = "which reads conntrack's accounting"
    served_model = ServedConnbytesMatch
    served_facts = frozenset({"ctacct"})

    def served(self, payload: bytes, where: str) -> ServedConnbytesMatch:
        p = self.struct.parse(payload)
        # connbytes_mt_check()
        if p.what > XT_CONNBYTES_AVGPKT or p.direction > XT_CONNBYTES_DIR_BOTH:
            raise BpfilterError(errno.EINVAL, f"{where}: connbytes: unknown "
                                              f"{'mode' if p.what > XT_CONNBYTES_AVGPKT else 'direction'} "
                                              f"({p.what}, {p.direction})")
        return ServedConnbytesMatch(p.from_, p.to, p.what, p.direction)

    def served_unsupported(self, match) -> Optional[str]:
        acct_offsets()
        return None

    def describe(self, m) -> str:
        f = self.fields_of(m)
        return f"connbytes {f['from_']}:{f['to']} connbytes mode {_WHAT[f['what']]} " \
               f"connbytes direction {_DIRECTION[f['direction']]}"

    def emit_served(self, match, asm, out) -> None:
        _emit_served(match, asm, out)


def _emit_served(m: ServedConnbytesMatch, asm, out) -> None:
    """connbytes_mt(): R2 = what it counts, R1 = 1 unless it is in the range (an
    entry without counters: never)."""
    done = asm.label("connbytes_done")
    asm.emit(BPF_MOV64_IMM(R1, 1), BPF_LDX_MEM(BPF_B, R2, R6, ACCT_PRESENT),
             BPF_JMP_IMM(I.BPF_JEQ, R2, 0, done))

    def total(reg: int, field: int) -> None:
        """reg = the counter `field` in the rule's direction (both: their sum)."""
        base = ACCT_COUNTERS + (_REPLY if m.direction == XT_CONNBYTES_DIR_REPLY else 0)
        asm.emit(BPF_LDX_MEM(BPF_DW, reg, R6, base + field))
        if m.direction == XT_CONNBYTES_DIR_BOTH:
            asm.emit(BPF_LDX_MEM(BPF_DW, R0, R6, ACCT_COUNTERS + _REPLY + field),
                     BPF_ALU64_REG(I.BPF_ADD, reg, R0))

    if m.what == XT_CONNBYTES_PKTS:
        total(R2, _PACKETS)
    elif m.what == XT_CONNBYTES_BYTES:
        total(R2, _BYTES)
    else:
        # div64_u64(bytes, packets) when packets; a BPF division by zero gives 0, which
        # is connbytes_mt()'s answer then
        total(R2, _BYTES)
        total(R3, _PACKETS)
        asm.emit(BPF_ALU64_REG(I.BPF_DIV, R2, R3))
    asm.emit(*BPF_LD_IMM64(R3, m.from_), *BPF_LD_IMM64(R0, m.to))
    if m.to >= m.from_:
        asm.emit(BPF_JMP_REG(I.BPF_JLT, R2, R3, done), BPF_JMP_REG(I.BPF_JGT, R2, R0, done),
                 BPF_MOV64_IMM(R1, 0))
    else:
        # the range inverted (iptables' `!`): below `to` or above `from`
        within = asm.label("connbytes_within")
        asm.emit(BPF_JMP_REG(I.BPF_JLT, R2, R0, within), BPF_JMP_REG(I.BPF_JGT, R2, R3, within),
                 BPF_JMP_A(done))
        asm.place(within)
        asm.emit(BPF_MOV64_IMM(R1, 0))
    asm.place(done)
    out.mismatch(R1)
