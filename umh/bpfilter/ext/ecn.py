"""-j ECN (ipt_ECN.c: --ecn-tcp-remove, --ecn-ip-ect), IPv4's mangle table: the
kernel's own, run by bpfilter.ko (ext/xtmatch.py), which rewrites the IP header's ECN
bits and the tcp header's ECE and CWR flags with the checksum updates the kernel
makes; its checkentry refuses a tcp operation on a rule not limited to -p tcp. The
tcp flags are one of the facts the prologue reads once: after the target they are
as it left them, so that a later `--tcp-flags` sees them as the kernel's does."""
from __future__ import annotations

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_ALU64_IMM, BPF_B, BPF_LDX_MEM, BPF_STX_MEM, R1, R6
from ..model import Family
from ..packet import facts
from .xtmatch import plain_kernel_extension

IPT_ECN_OP_SET_IP, IPT_ECN_OP_SET_ECE, IPT_ECN_OP_SET_CWR = 0x01, 0x10, 0x20
TCP_ECE, TCP_CWR = 0x40, 0x80   # in byte 13 of the tcp header (facts.TCP_FLAGS)

# ipt_ECN_info's proto.tcp is a bitfield byte: ece is bit 0, cwr bit 1
ipt_ECN_info = Struct("operation" / Int8un, "ip_ect" / Int8un, "tcp" / Int8un)


def _flags(f: dict) -> tuple[int, int]:
    """(the tcp flag bits the target sets, those it clears)."""
    set_, cleared = 0, 0
    for op, bit, flag in ((IPT_ECN_OP_SET_ECE, 1, TCP_ECE), (IPT_ECN_OP_SET_CWR, 2, TCP_CWR)):
        if f["operation"] & op:
            if f["tcp"] & bit:
                set_ |= flag
            else:
                cleared |= flag
    return set_, cleared


def _refresh(self, target, asm) -> None:
    """set_ect_tcp()'s writes, on the tcp flags fact (read only for tcp packets)."""
    set_, cleared = _flags(dict(target.fields))
    if not set_ | cleared:
        return
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.TCP_FLAGS))
    if cleared:
        asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, ~cleared & 0xFF))
    if set_:
        asm.emit(BPF_ALU64_IMM(I.BPF_OR, R1, set_))
    asm.emit(BPF_STX_MEM(BPF_B, R6, R1, facts.TCP_FLAGS))


def _describe(f: dict) -> str:
    words = ["ECN"]
    if f["operation"] & IPT_ECN_OP_SET_ECE:
        words.append(f"ECE={f['tcp'] & 1}")
    if f["operation"] & IPT_ECN_OP_SET_CWR:
        words.append(f"CWR={f['tcp'] >> 1 & 1}")
    if f["operation"] & IPT_ECN_OP_SET_IP:
        words.append(f"ECT codepoint={f['ip_ect']}")
    return " ".join(words)


plain_kernel_extension("target", "ECN", ipt_ECN_info, (Family.IPV4,), table="mangle",
                       refresh=_refresh, describe=_describe)
