"""IPv4's flavour of the prologue and of a rule's ip part (ip_tables.c's
ipt_do_table() and ip_packet_match())."""
from __future__ import annotations

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_IMM, BPF_B, BPF_ENDIAN, BPF_H, BPF_JMP_IMM, BPF_LDX_MEM,
                        BPF_STX_MEM, BPF_W, R0, R1, R6, R9)
from ..model import IpHeader
from . import facts
from .facts import (DADDR, FRAGOFF, PROTO, SADDR, THOFF, TOT_LEN, TTL, Flavour, KernelOffsets,
                    emit_slice)
from .primitives import Hole, RuleOutcome, emit_masked_equal, emit_name_equal, emit_nonzero

IP_OFFSET_MASK = 0x1FFF
IPV4_HEADER = 20


class Ipv4(Flavour):
    def emit_network_header(self, asm, k: KernelOffsets, drop, needs: frozenset) -> None:
        emit_slice(asm, offset_reg=None, size=IPV4_HEADER)
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
            # thoff = ihl * 4
            BPF_LDX_MEM(BPF_B, R9, R0, 0),
            BPF_ALU32_IMM(I.BPF_AND, R9, 0x0F),
            BPF_ALU32_IMM(I.BPF_LSH, R9, 2),
            BPF_STX_MEM(BPF_W, R6, R9, THOFF),
        )

    def transport_readable(self, asm, skip) -> None:
        asm.emit(BPF_LDX_MEM(BPF_H, R1, R6, FRAGOFF), BPF_JMP_IMM(I.BPF_JNE, R1, 0, skip))

    def emit_ip_match(self, asm, ip: IpHeader, out: RuleOutcome) -> None:
        for prefix, off in ((ip.src, SADDR), (ip.dst, DADDR)):
            if not prefix.is_any:
                addr = prefix.addr   # a template's Hole, or the bytes
                emit_masked_equal(asm, off, 4, int.from_bytes(prefix.mask, "little"),
                                  addr if isinstance(addr, Hole) else int.from_bytes(addr, "little"),
                                  prefix.invert, out)
        for iface, off in ((ip.in_iface, facts.IN_NAME), (ip.out_iface, facts.OUT_NAME)):
            if not iface.is_any:
                emit_name_equal(asm, off, iface.name, iface.mask, iface.invert, out)
        if ip.proto:
            emit_masked_equal(asm, PROTO, 1, 0xFF, ip.proto, ip.invert_proto, out)
        # NF_INVF(IPT_INV_FRAG, (flags & IPT_F_FRAG) && !isfrag) must be false
        if ip.fragment:
            emit_nonzero(asm, FRAGOFF, 2, ip.invert_fragment, out)
        elif ip.invert_fragment:
            out.never()


IPV4 = Ipv4()
