"""-m ecn (xt_ecn.c), pure BPF (Ecn below), and -j ECN (ipt_ECN.c: --ecn-tcp-remove,
--ecn-ip-ect), IPv4's mangle table: the kernel's own, run by bpfilter.ko
(ext/xtmatch.py), which rewrites the IP header's ECN bits and the tcp header's ECE and
CWR flags with the checksum updates the kernel makes; its checkentry refuses a tcp
operation on a rule not limited to -p tcp. The tcp flags are one of the facts the
prologue reads once: after the target they are as it left them, so that a later
`--tcp-flags` sees them as the kernel's does (the match reads the packet afresh)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_ALU64_IMM, BPF_B, BPF_LDX_MEM, BPF_STX_MEM, R1, R6
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import emit_masked_equal
from . import BOTH_FAMILIES, MatchExtension, register_match
from .dscp import DSFIELD, emit_dsfield
from .exthdr import BUF, READS, emit_read, emit_thoff
from .tcp import IPPROTO_TCP
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


XT_ECN_IP_MASK = 0x03
XT_ECN_OP_MATCH_IP, XT_ECN_OP_MATCH_ECE, XT_ECN_OP_MATCH_CWR = 0x01, 0x10, 0x20
XT_ECN_OP_MATCH_MASK = 0xCE
_TCP_BITS = ((XT_ECN_OP_MATCH_ECE, TCP_ECE, "ECE"), (XT_ECN_OP_MATCH_CWR, TCP_CWR, "CWR"))

xt_ecn_info = Struct("operation" / Int8un, "invert" / Int8un, "ip_ect" / Int8un,
                     "tcp_ect" / Int8un)


@dataclass(frozen=True)
class EcnMatch(Match):
    operation: int
    invert: int
    ip_ect: int
    name = "ecn"
    revision = 0


@register_match
class Ecn(MatchExtension):
    """-m ecn (xt_ecn.c), pure BPF: the ECN bits of the DS field (ext/dscp.py reads it
    as the packet is now) and the tcp header's ECE and CWR flags, read afresh at
    par->thoff as match_tcp() does (whatever the fragment offset; a header shorter
    than 20 bytes fails the match, with no hotdrop)."""
    name = "ecn"
    families = BOTH_FAMILIES
    struct = xt_ecn_info
    facts = READS

    def check_ip_payload(self, ip, payload: bytes, where: str) -> None:
        operation, invert, _, _ = self.packed.unpack_from(payload)
        if operation & XT_ECN_OP_MATCH_MASK or invert & XT_ECN_OP_MATCH_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: ecn: unknown operation or inversion "
                                              f"flags {operation:#x}/{invert:#x}")
        if operation & (XT_ECN_OP_MATCH_ECE | XT_ECN_OP_MATCH_CWR) and \
                (ip.proto != IPPROTO_TCP or ip.invert_proto):
            raise BpfilterError(errno.EINVAL, f"{where}: ecn: cannot match TCP bits in rule "
                                              "for non-tcp packets")

    def decode(self, payload: bytes, where: str) -> EcnMatch:
        operation, invert, ip_ect, _ = self.packed.unpack_from(payload)
        return EcnMatch(operation, invert, ip_ect)

    def emit(self, m: EcnMatch, asm, out) -> None:
        if m.operation & XT_ECN_OP_MATCH_IP:
            emit_dsfield(asm, self.family, out)
            emit_masked_equal(asm, DSFIELD, 1, XT_ECN_IP_MASK, m.ip_ect,
                              bool(m.invert & XT_ECN_OP_MATCH_IP), out)
        if m.operation & (XT_ECN_OP_MATCH_ECE | XT_ECN_OP_MATCH_CWR):
            # the whole header (20 bytes) must be there: bytes 4..19 read into BUF
            emit_thoff(asm)
            emit_read(asm, 4, 16, out, short_fails=True)
            for op, flag, _ in _TCP_BITS:
                if m.operation & op:
                    emit_masked_equal(asm, BUF + (13 - 4), 1, flag, flag,
                                      bool(m.invert & op), out)

    def describe(self, m: EcnMatch) -> str:
        # ecn_print() of libxt_ecn.c
        words = ["ECN match"]
        for op, _, word in _TCP_BITS:
            if m.operation & op:
                words.append(f"{'!' if m.invert & op else ''}{word}")
        if m.operation & XT_ECN_OP_MATCH_IP:
            words.append(f"{'!' if m.invert & XT_ECN_OP_MATCH_IP else ''}ECT={m.ip_ect}")
        return " ".join(words)
