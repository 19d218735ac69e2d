"""-m tcpmss (xt_tcpmss.c), pure BPF (Tcpmss below), and -j TCPMSS (xt_TCPMSS.c): the
kernel's own, run by bpfilter.ko (ext/xtmatch.py). The target rewrites (or adds) the
MSS option of a SYN with the checksum update the kernel makes; its checkentry looks for
the rule's tcp SYN test among the rule's matches, which the module hands it as
ip_tables would. What it adds is past the tcp options the prologue read once
(`--tcp-option`): a table reading them beside a TCPMSS rule is refused (stale); the
match reads the packet afresh, and sees it."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Int8un, Int16un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL,
                        BPF_H, BPF_JMP_A, BPF_JMP_IMM, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG,
                        BPF_ST_MEM, BPF_STX_MEM, BPF_W, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..model import Match
from ..packet import facts
from ..packet.facts import TCP_HEADER
from ..packet.primitives import HOTDROP, MISMATCH, emit_outside
from . import BOTH_FAMILIES, MatchExtension, register_match
from .tcp import IPPROTO_TCP, MAX_OPTIONS
from .xtmatch import plain_kernel_extension

XT_TCPMSS_CLAMP_PMTU = 0xFFFF

xt_tcpmss_match_info = Struct("mss_min" / Int16un, "mss_max" / Int16un, "invert" / Int8un,
                              Padding(1))
xt_tcpmss_info = Struct("mss" / Int16un)


def _describe_match(mss_min: int, mss_max: int, invert: int) -> str:
    span = f"{mss_min}" if mss_min == mss_max else f"{mss_min}:{mss_max}"
    return f"tcpmss match {'!' if invert else ''}{span}"


plain_kernel_extension("target", "TCPMSS", xt_tcpmss_info, BOTH_FAMILIES, proto=IPPROTO_TCP,
                       stale=frozenset({"tcpopt"}),
                       describe=lambda f: "TCPMSS clamp to PMTU"
                       if f["mss"] == XT_TCPMSS_CLAMP_PMTU else f"TCPMSS set {f['mss']}")


# The match's own reads (facts region "tcpmss_read"): the tcp header's first 20 bytes
# in OPTIONS' place, then the options, zero past their length (and 8 bytes beyond,
# which the walk looks at from its last positions), where the MSS was found, and
# whether the kernel's match drops.
_REGION = facts.reserve("tcpmss_read", MAX_OPTIONS + 8 + 8)
OPTIONS = _REGION
MSS = _REGION + (MAX_OPTIONS + 8)            # u16, host order
FOUND = _REGION + (MAX_OPTIONS + 10)         # u8
DROP = _REGION + (MAX_OPTIONS + 11)          # u8
TCPOPT_MSS, TCPOLEN_MSS = 2, 4


@dataclass(frozen=True)
class TcpmssMatch(Match):
    mss_min: int
    mss_max: int
    invert: int         # the raw byte: `(in range) ^ info->invert`
    name = "tcpmss"
    revision = 0


def _emit_read(asm, at: int, length_reg=None) -> None:
    """R0 = bpf_dynptr_read(OPTIONS, the length in `length_reg` (else the tcp
    header's), the packet, thoff + at): 0, or an error when the packet is shorter."""
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, OPTIONS),
             BPF_MOV64_IMM(R2, TCP_HEADER) if length_reg is None else BPF_MOV64_REG(R2, length_reg),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_LDX_MEM(BPF_W, R4, R6, facts.THOFF), BPF_ALU64_IMM(I.BPF_ADD, R4, at),
             BPF_MOV64_IMM(R5, 0), BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read))


def _emit_walk(asm) -> None:
    """R4 = 1 and R5 = the MSS where the kernel's loop returns (the first option it
    steps on that is kind 2, length 4, and whole within optlen, R7), else R4 = 0.
    Unrolled without branches over every position, as tcp.py's walk: R2 is where
    the next option starts."""
    asm.emit(BPF_MOV64_IMM(R2, 0), BPF_MOV64_IMM(R4, 0), BPF_MOV64_IMM(R5, 0))
    for p in range(MAX_OPTIONS):
        asm.emit(
            # R0 = 1 when an option starts here
            BPF_MOV64_REG(R0, R2), BPF_ALU64_IMM(I.BPF_XOR, R0, p),
            BPF_ALU64_IMM(I.BPF_SUB, R0, 1), BPF_ALU64_IMM(I.BPF_RSH, R0, 63),
            # R1 = 1 when it is the MSS option, whole, and the first one
            BPF_LDX_MEM(BPF_B, R1, R6, OPTIONS + p), BPF_ALU64_IMM(I.BPF_XOR, R1, TCPOPT_MSS),
            BPF_LDX_MEM(BPF_B, R3, R6, OPTIONS + (p + 1)),
            BPF_ALU64_IMM(I.BPF_XOR, R3, TCPOLEN_MSS), BPF_ALU64_REG(I.BPF_OR, R1, R3),
            BPF_ALU64_IMM(I.BPF_SUB, R1, 1), BPF_ALU64_IMM(I.BPF_RSH, R1, 63),
            BPF_ALU64_REG(I.BPF_MUL, R1, R0),
            BPF_MOV64_REG(R3, R7), BPF_ALU64_IMM(I.BPF_SUB, R3, p + TCPOLEN_MSS),
            BPF_ALU64_IMM(I.BPF_RSH, R3, 63), BPF_ALU64_IMM(I.BPF_XOR, R3, 1),
            BPF_ALU64_REG(I.BPF_MUL, R1, R3),
            BPF_MOV64_REG(R3, R4), BPF_ALU64_IMM(I.BPF_XOR, R3, 1),
            BPF_ALU64_REG(I.BPF_MUL, R1, R3), BPF_ALU64_REG(I.BPF_OR, R4, R1),
            # (the stack takes no unaligned u16 load)
            BPF_LDX_MEM(BPF_B, R3, R6, OPTIONS + (p + 2)), BPF_ALU64_IMM(I.BPF_LSH, R3, 8),
            BPF_LDX_MEM(BPF_B, R0, R6, OPTIONS + (p + 3)), BPF_ALU64_REG(I.BPF_OR, R3, R0),
            BPF_ALU64_REG(I.BPF_MUL, R3, R1), BPF_ALU64_REG(I.BPF_ADD, R5, R3),
            # the next start: the option's size (length ?: 1, or 1 for a kind below 2)
            BPF_LDX_MEM(BPF_B, R1, R6, OPTIONS + p), BPF_LDX_MEM(BPF_B, R3, R6, OPTIONS + (p + 1)),
            BPF_MOV64_REG(R0, R3), BPF_ALU64_IMM(I.BPF_SUB, R0, 1),
            BPF_ALU64_IMM(I.BPF_RSH, R0, 63), BPF_ALU64_REG(I.BPF_ADD, R3, R0),
            BPF_ALU64_IMM(I.BPF_SUB, R1, 2), BPF_ALU64_IMM(I.BPF_RSH, R1, 63),
            BPF_MOV64_IMM(R0, 1), BPF_ALU64_REG(I.BPF_SUB, R0, R3),
            BPF_ALU64_REG(I.BPF_MUL, R0, R1), BPF_ALU64_REG(I.BPF_ADD, R3, R0),
            BPF_ALU64_IMM(I.BPF_ADD, R3, p), BPF_ALU64_REG(I.BPF_SUB, R3, R2),
            BPF_MOV64_REG(R0, R2), BPF_ALU64_IMM(I.BPF_XOR, R0, p),
            BPF_ALU64_IMM(I.BPF_SUB, R0, 1), BPF_ALU64_IMM(I.BPF_RSH, R0, 63),
            BPF_ALU64_REG(I.BPF_MUL, R3, R0), BPF_ALU64_REG(I.BPF_ADD, R2, R3),
        )


@register_match
class Tcpmss(MatchExtension):
    """-m tcpmss [!] --mss MIN[:MAX] (xt_tcpmss.c), pure BPF. The kernel's match reads
    the packet as each rule meets it (whatever the fragment offset: only checkentry
    asks for -p tcp), so this one does too, and sees what an earlier TCPMSS target
    wrote: the tcp header (else hotdrop), its data offset (under 5 words: hotdrop),
    the options (cut short: hotdrop), and the first MSS option its walk steps on."""
    name = "tcpmss"
    families = BOTH_FAMILIES
    struct = xt_tcpmss_match_info
    proto = IPPROTO_TCP
    reads_transport = True
    facts = frozenset({"tcpmss_read"})

    def decode(self, payload: bytes, where: str) -> TcpmssMatch:
        return TcpmssMatch(*self.packed.unpack_from(payload))

    def emit(self, m: TcpmssMatch, asm, out) -> None:
        drop, done = asm.label("tcpmss_drop"), asm.label("tcpmss_done")
        asm.emit(BPF_MOV64_REG(R8, MISMATCH), BPF_MOV64_REG(R9, HOTDROP),
                 BPF_ST_MEM(BPF_B, R6, DROP, 0))
        _emit_read(asm, 0)
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, drop),
                 BPF_LDX_MEM(BPF_B, R7, R6, OPTIONS + 12),
                 BPF_ALU64_IMM(I.BPF_RSH, R7, 4), BPF_ALU64_IMM(I.BPF_LSH, R7, 2),
                 BPF_JMP_IMM(I.BPF_JLT, R7, TCP_HEADER, drop),
                 BPF_ALU64_IMM(I.BPF_SUB, R7, TCP_HEADER),
                 BPF_MOV64_IMM(R4, 0), BPF_MOV64_IMM(R5, 0),
                 BPF_JMP_IMM(I.BPF_JEQ, R7, 0, done),
                 *(BPF_ST_MEM(BPF_DW, R6, OPTIONS + at, 0) for at in range(0, MAX_OPTIONS + 8, 8)))
        _emit_read(asm, TCP_HEADER, R7)
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, drop))
        _emit_walk(asm)
        asm.emit(BPF_JMP_A(done))
        asm.place(drop)
        asm.emit(BPF_ST_MEM(BPF_B, R6, DROP, 1), BPF_MOV64_IMM(R4, 0), BPF_MOV64_IMM(R5, 0))
        asm.place(done)
        asm.emit(BPF_STX_MEM(BPF_B, R6, R4, FOUND), BPF_STX_MEM(BPF_H, R6, R5, MSS),
                 BPF_MOV64_REG(MISMATCH, R8), BPF_MOV64_REG(HOTDROP, R9),
                 BPF_LDX_MEM(BPF_B, R1, R6, DROP))
        out.hotdrop(R1)
        if m.invert > 1:        # true whatever was found
            return
        emit_outside(asm, R1, MSS, 2, m.mss_min, m.mss_max)
        asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, FOUND), BPF_ALU64_IMM(I.BPF_XOR, R2, 1),
                 BPF_ALU64_REG(I.BPF_OR, R1, R2))       # 1: not (found and in range)
        if m.invert:
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
        out.mismatch(R1)

    def describe(self, m: TcpmssMatch) -> str:
        return _describe_match(m.mss_min, m.mss_max, m.invert)
