"""-p tcp / -m tcp: --sport, --dport, --tcp-flags, --syn, --tcp-option (struct xt_tcp,
revision 0)."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int16un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_H,
                        BPF_JMP_A, BPF_JMP_IMM, BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, R0, R1, R2, R3, R4, R5, R6,
                        R9)
from ..packet import facts
from ..packet.facts import TCP_HEADER
from ..packet.primitives import (RuleOutcome, emit_equal_hotdrop, emit_masked_equal,
                                   emit_nonzero_bit)
from ..errors import BpfilterError
from ..model import Match
from . import BOTH_FAMILIES, MatchExtension, register_match
from .ports import PortRange, describe_ports, emit_ports, emit_transport_header

IPPROTO_TCP = 6
XT_TCP_INV_SRCPT, XT_TCP_INV_DSTPT, XT_TCP_INV_FLAGS, XT_TCP_INV_OPTION = 0x01, 0x02, 0x04, 0x08
XT_TCP_INV_MASK = 0x0F
EVIL_FRAGMENT_OFFSET = 1
MAX_OPTIONS = 40                 # a data offset of 15 words, less the 20-byte header
_BYTES_01, _BYTES_7F = 0x0101010101010101, 0x7F7F7F7F7F7F7F7F

xt_tcp = Struct(
    "spts" / Int16un[2],
    "dpts" / Int16un[2],
    "option" / Int8un,
    "flg_mask" / Int8un,
    "flg_cmp" / Int8un,
    "invflags" / Int8un,
)


@dataclass(frozen=True)
class TcpMatch(Match):
    sport: PortRange
    dport: PortRange
    flags_mask: int = 0
    flags_cmp: int = 0
    invert_flags: bool = False
    option: int = 0           # 0: no option test, whatever XT_TCP_INV_OPTION says
    invert_option: bool = False
    name = "tcp"
    revision = 0


@register_match
class Tcp(MatchExtension):
    reads_transport = True
    name = "tcp"
    families = BOTH_FAMILIES
    proto = IPPROTO_TCP
    struct = xt_tcp

    def decode(self, payload: bytes, where: str) -> TcpMatch:
        p = self.packed.unpack_from(payload)
        (spt_lo, spt_hi), (dpt_lo, dpt_hi) = p[_SPTS], p[_DPTS]
        invflags = p[_INVFLAGS]
        if invflags & ~XT_TCP_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: tcp: unknown inversion flags {invflags:#x}")
        return TcpMatch(
            sport=PortRange(spt_lo, spt_hi, bool(invflags & XT_TCP_INV_SRCPT)),
            dport=PortRange(dpt_lo, dpt_hi, bool(invflags & XT_TCP_INV_DSTPT)),
            flags_mask=p[_FLG_MASK], flags_cmp=p[_FLG_CMP],
            invert_flags=bool(invflags & XT_TCP_INV_FLAGS),
            option=p[_OPTION], invert_option=bool(invflags & XT_TCP_INV_OPTION))

    def facts_of(self, match: TcpMatch) -> frozenset[str]:
        return frozenset({"tcpopt"}) if match.option else frozenset()

    def emit(self, match: TcpMatch, asm, out) -> None:
        # tcp_mt() drops a fragment at offset 1 (8 bytes) outright: it could
        # overwrite the flags of the first fragment to sneak past direction checks.
        emit_equal_hotdrop(asm, facts.FRAGOFF, 2, EVIL_FRAGMENT_OFFSET, out)
        emit_transport_header(asm, facts.TCP_HEADER, out)
        emit_ports(asm, match.sport, match.dport, out)
        emit_masked_equal(asm, facts.TCP_FLAGS, 1, match.flags_mask, match.flags_cmp,
                          match.invert_flags, out)
        if match.option:
            _emit_option(asm, match.option, match.invert_option, out)

    def describe(self, match: TcpMatch) -> str:
        parts = ["tcp", describe_ports("spt", match.sport), describe_ports("dpt", match.dport)]
        if match.option:
            parts.append(f"option={'!' if match.invert_option else ''}{match.option}")
        if match.flags_mask or match.invert_flags:
            bang = "!" if match.invert_flags else ""
            parts.append(f"flags:{bang}0x{match.flags_mask:02X}/0x{match.flags_cmp:02X}")
        return " ".join(p for p in parts if p)


def _emit_option(asm, option: int, invert: bool, out: RuleOutcome) -> None:
    """tcp_find_option(): a hotdrop for a data offset under 5 words or options cut
    short, else whether an option the kernel's walk looks at is of kind `option`.
    Eight option bytes at a time: bytes equal to the kind become zero, a zero byte
    gets its top bit set, and TCPOPT_START keeps only the bytes the walk looks at."""
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.TCPOPT_DROP))
    out.hotdrop(R1)
    asm.emit(BPF_MOV64_IMM(R0, 0))
    for at in range(0, MAX_OPTIONS, 8):
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.TCPOPT + at),
                 *BPF_LD_IMM64(R2, option * _BYTES_01), BPF_ALU64_REG(I.BPF_XOR, R1, R2),
                 *BPF_LD_IMM64(R2, _BYTES_7F), BPF_MOV64_REG(R3, R1),
                 BPF_ALU64_REG(I.BPF_AND, R3, R2), BPF_ALU64_REG(I.BPF_ADD, R3, R2),
                 BPF_ALU64_REG(I.BPF_OR, R3, R1), BPF_ALU64_IMM(I.BPF_XOR, R3, -1),
                 BPF_LDX_MEM(BPF_DW, R2, R6, facts.TCPOPT_START + at),
                 BPF_ALU64_REG(I.BPF_AND, R3, R2), BPF_ALU64_REG(I.BPF_OR, R0, R3))
    emit_nonzero_bit(asm, R0, R3)
    if not invert:
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R0, 1))
    out.mismatch(R0)


def _read_options(asm, k: facts.KernelOffsets) -> None:
    """TCPOPT, TCPOPT_START and TCPOPT_DROP for a first tcp fragment: the options
    (doff * 4 - 20 bytes after the header), and the walk of tcp_find_option() over
    them, unrolled without branches: an option starts at 0, a kind below 2 (EOL, NOP)
    is one byte, any other kind is as long as its length byte says, 0 counting as 1.
    Only starts before the options' end matter: the bytes past it are zero, and 0 is
    never the option a rule asks for."""
    done, drop = asm.label("tcpopt_done"), asm.label("tcpopt_drop")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.PROTO),
             BPF_JMP_IMM(I.BPF_JNE, R1, IPPROTO_TCP, done),
             BPF_LDX_MEM(BPF_H, R1, R6, facts.FRAGOFF),
             BPF_JMP_IMM(I.BPF_JNE, R1, 0, done))
    # the data offset byte; without it the tcp match hotdrops before any option test
    _emit_read(asm, 12, length=None)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, done),
             BPF_LDX_MEM(BPF_B, R2, R6, facts.TCPOPT),
             BPF_ST_MEM(BPF_B, R6, facts.TCPOPT, 0),
             BPF_ALU64_IMM(I.BPF_RSH, R2, 4), BPF_ALU64_IMM(I.BPF_LSH, R2, 2),
             BPF_JMP_IMM(I.BPF_JLT, R2, TCP_HEADER, drop),
             BPF_ALU64_IMM(I.BPF_SUB, R2, TCP_HEADER),
             BPF_JMP_IMM(I.BPF_JEQ, R2, 0, done))
    _emit_read(asm, TCP_HEADER, length=R2)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, drop),
             BPF_MOV64_IMM(R2, 0))                       # R2: where the next option starts
    for p in range(MAX_OPTIONS):
        # Selections multiply by a 0/1 bit rather than mask with 0/-1: the verifier
        # forks its state on every AND with a value it knows is 0 or -1.
        asm.emit(
            BPF_LDX_MEM(BPF_B, R1, R6, facts.TCPOPT + p),         # kind
            BPF_LDX_MEM(BPF_B, R3, R6, facts.TCPOPT + p + 1),     # length (past the end at 39:
            # never used, the next start is then beyond the options anyway)
            # R4 = 1 when an option starts here
            BPF_MOV64_REG(R4, R2), BPF_ALU64_IMM(I.BPF_XOR, R4, p),
            BPF_ALU64_IMM(I.BPF_SUB, R4, 1), BPF_ALU64_IMM(I.BPF_RSH, R4, 63),
            BPF_MOV64_REG(R5, R4), BPF_ALU64_IMM(I.BPF_LSH, R5, 7),
            BPF_STX_MEM(BPF_B, R6, R5, facts.TCPOPT_START + p),
            # R3 = the option's size: length ?: 1, or 1 for a kind below 2
            BPF_MOV64_REG(R0, R3), BPF_ALU64_IMM(I.BPF_SUB, R0, 1),
            BPF_ALU64_IMM(I.BPF_RSH, R0, 63), BPF_ALU64_REG(I.BPF_ADD, R3, R0),
            BPF_MOV64_REG(R0, R1), BPF_ALU64_IMM(I.BPF_SUB, R0, 2),
            BPF_ALU64_IMM(I.BPF_RSH, R0, 63),
            BPF_MOV64_IMM(R5, 1), BPF_ALU64_REG(I.BPF_SUB, R5, R3),
            BPF_ALU64_REG(I.BPF_MUL, R5, R0), BPF_ALU64_REG(I.BPF_ADD, R3, R5),
            # next start += (p + size - next start) where an option starts
            BPF_ALU64_IMM(I.BPF_ADD, R3, p), BPF_ALU64_REG(I.BPF_SUB, R3, R2),
            BPF_ALU64_REG(I.BPF_MUL, R3, R4), BPF_ALU64_REG(I.BPF_ADD, R2, R3),
        )
    asm.emit(BPF_JMP_A(done))
    asm.place(drop)
    asm.emit(BPF_ST_MEM(BPF_B, R6, facts.TCPOPT_DROP, 1))
    asm.place(done)


def _emit_read(asm, offset: int, length) -> None:
    """R0 = bpf_dynptr_read(&facts[TCPOPT], length (a register, or 1 when None),
    &dynptr, thoff + offset, 0): 0, or an error when the packet is too short."""
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, facts.TCPOPT),
             BPF_MOV64_IMM(R2, 1) if length is None else BPF_MOV64_REG(R2, length),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_REG(R4, R9), BPF_ALU64_IMM(I.BPF_ADD, R4, offset),
             BPF_MOV64_IMM(R5, 0), BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read))


facts.OPTIONAL["tcpopt"] = _read_options

_SPTS, _DPTS, _OPTION, _FLG_MASK, _FLG_CMP, _INVFLAGS = map(
    Tcp.packed.index, ("spts", "dpts", "option", "flg_mask", "flg_cmp", "invflags"))
