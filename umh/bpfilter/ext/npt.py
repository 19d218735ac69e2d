"""-j SNPT and -j DNPT (IPv6, struct ip6t_npt_tginfo, revision 0): RFC 6296's
checksum-neutral prefix translation of the source (SNPT) or destination (DNPT)
address, in the mangle table. The kernel's own, run by bpfilter.ko (ext/xtmatch.py).
The addresses are facts the prologue reads once: after the target the one it wrote is
read again from the packet, so that the next rules see it as the kernel's do. (The
prefixes' checksum difference its checkentry stores is past the target's usersize.)"""
from __future__ import annotations

import ipaddress

from construct import Bytes, Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_EMIT_CALL, BPF_MOV64_IMM, BPF_MOV64_REG, R1, R2, R3,
                        R4, R5, R6)
from ..model import Family, Hook
from ..packet import facts
from .xtmatch import plain_kernel_extension

ip6t_npt_tginfo = Struct("src_pfx" / Bytes(16), "dst_pfx" / Bytes(16),
                         "src_pfx_len" / Int8un, "dst_pfx_len" / Int8un,
                         "_adjustment" / Bytes(2))
IPV6_SADDR_AT, IPV6_DADDR_AT = 8, 24
_ADDRESS = 16


def _reread(at: int, fact: int):
    def refresh(self, target, asm) -> None:
        """The address as the target left it: bpf_dynptr_read() from the IPv6 header."""
        asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, fact),
                 BPF_MOV64_IMM(R2, _ADDRESS),
                 BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
                 BPF_MOV64_IMM(R4, at), BPF_MOV64_IMM(R5, 0),
                 BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read))
    return refresh


def _describe(name: str):
    def describe(f: dict) -> str:
        src = ipaddress.IPv6Address(f["src_pfx"])
        dst = ipaddress.IPv6Address(f["dst_pfx"])
        return f"{name} src-pfx {src}/{f['src_pfx_len']} dst-pfx {dst}/{f['dst_pfx_len']}"
    return describe


def _hooks(*hooks: Hook) -> int:
    return sum(1 << h.value for h in hooks)


for _name, _hooks_of, _at, _fact in (
        ("SNPT", _hooks(Hook.LOCAL_IN, Hook.POST_ROUTING), IPV6_SADDR_AT, facts.SADDR),
        ("DNPT", _hooks(Hook.PRE_ROUTING, Hook.LOCAL_OUT), IPV6_DADDR_AT, facts.DADDR)):
    plain_kernel_extension("target", _name, ip6t_npt_tginfo, (Family.IPV6,), table="mangle",
                           hooks=_hooks_of, why="which rewrites the packet's address",
                           refresh=_reread(_at, _fact), describe=_describe(_name))
