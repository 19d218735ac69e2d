"""-j TTL (IPv4) and -j HL (IPv6) (xt_HL.c): the kernel's own, run by bpfilter.ko
(ext/xtmatch.py), which writes the header with the checksum update the kernel makes
(mangle table only). The packet's TTL (hop limit) is one of the facts the prologue
reads once: after the target it is set as the target set it, so that a later
`-m ttl` (`-m hl`) sees the new value, as it does in the kernel."""
from __future__ import annotations

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_B, BPF_JMP_IMM, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_STX_MEM, R1, R6)
from ..model import Family
from ..packet import facts
from .xtmatch import plain_kernel_extension

SET, INC, DEC = 0, 1, 2   # IPT_TTL_SET/INC/DEC, IP6T_HL_SET/INC/DEC

ipt_TTL_info = Struct("mode" / Int8un, "ttl" / Int8un)
ip6t_HL_info = Struct("mode" / Int8un, "hop_limit" / Int8un)


def _refresh(self, target, asm) -> None:
    """ttl_tg()'s and hl_tg6()'s arithmetic, on the TTL fact (saturating at 0 and 255);
    a mode the kernel's checkentry refused never runs."""
    mode, value = (v for _, v in target.fields)
    if mode == SET:
        asm.emit(BPF_MOV64_IMM(R1, value), BPF_STX_MEM(BPF_B, R6, R1, facts.TTL))
        return
    done = asm.label("ttl_kept")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.TTL))
    if mode == INC:
        asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R1, value),
                 BPF_JMP_IMM(I.BPF_JLE, R1, 255, done), BPF_MOV64_IMM(R1, 255))
    else:
        asm.emit(BPF_ALU64_IMM(I.BPF_SUB, R1, value),
                 BPF_JMP_IMM(I.BPF_JSGE, R1, 0, done), BPF_MOV64_IMM(R1, 0))
    asm.place(done)
    asm.emit(BPF_STX_MEM(BPF_B, R6, R1, facts.TTL))


_WORDS = {SET: "set to", INC: "increment by", DEC: "decrement by"}


def _describe(name: str, value_field: str):
    return lambda f: f"{name} {_WORDS.get(f['mode'], '?')} {f[value_field]}"


plain_kernel_extension("target", "TTL", ipt_TTL_info, (Family.IPV4,), table="mangle",
                       refresh=_refresh, describe=_describe("TTL", "ttl"))
plain_kernel_extension("target", "HL", ip6t_HL_info, (Family.IPV6,), table="mangle",
                       refresh=_refresh, describe=_describe("HL", "hop_limit"))
