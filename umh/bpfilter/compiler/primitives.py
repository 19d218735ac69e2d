"""Tests on packet facts, shared by the ip header part of rules and by extensions.

Each emitter jumps to `fail` when the test does not hold and falls through when it
does; `invert` is iptables' `!`. A test that always holds emits nothing, one that
never holds emits an unconditional jump, so trivially true parts of rules cost nothing.
"""
from __future__ import annotations

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_H, BPF_JMP32_IMM,
                        BPF_JMP_A, BPF_JMP_IMM, BPF_LD_IMM64, BPF_LDX_MEM, BPF_W, R1, R2, R3, R6)

_SIZE = {1: BPF_B, 2: BPF_H, 4: BPF_W}


def emit_masked_equal(asm: Assembler, off: int, size: int, mask: int, value: int,
                      invert: bool, fail) -> None:
    """Holds iff ((field & mask) == value) != invert, the kernel's comparison of
    addresses, protocols and tcp flags (value bits outside mask never match)."""
    full = (1 << (8 * size)) - 1
    if mask == 0:
        if (value == 0) == invert:
            asm.emit(BPF_JMP_A(fail))
        return
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off))
    if mask != full:
        asm.emit(BPF_ALU32_IMM(I.BPF_AND, R1, mask))
    asm.emit(BPF_JMP32_IMM(I.BPF_JEQ if invert else I.BPF_JNE, R1, value, fail))


def emit_name_equal(asm: Assembler, off: int, name: bytes, mask: bytes, invert: bool, fail) -> None:
    """Holds iff ((field ^ name) & mask) == 0 over 16 bytes, != invert: the kernel's
    ifname_compare_aligned(), compared 8 bytes at a time as it does."""
    chunks = [(o, int.from_bytes(name[o:o + 8], "little"), int.from_bytes(mask[o:o + 8], "little"))
              for o in range(0, len(name), 8)]
    chunks = [c for c in chunks if c[2]]
    if not chunks:
        if invert:
            asm.emit(BPF_JMP_A(fail))
        return
    for i, (o, value, m) in enumerate(chunks):
        acc = R1 if i == 0 else R2
        asm.emit(BPF_LDX_MEM(BPF_DW, acc, R6, off + o),
                 BPF_LD_IMM64(R3, value), BPF_ALU64_REG(I.BPF_XOR, acc, R3),
                 BPF_LD_IMM64(R3, m), BPF_ALU64_REG(I.BPF_AND, acc, R3))
        if i:
            asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2))
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ if invert else I.BPF_JNE, R1, 0, fail))


def emit_range(asm: Assembler, off: int, size: int, lo: int, hi: int, invert: bool, fail) -> None:
    """Holds iff (lo <= field <= hi) != invert, as the kernel's port_match()."""
    full = (1 << (8 * size)) - 1
    if lo == 0 and hi >= full:
        if invert:
            asm.emit(BPF_JMP_A(fail))
        return
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off))
    if not invert:
        if lo > 0:
            asm.emit(BPF_JMP_IMM(I.BPF_JLT, R1, lo, fail))
        if hi < full:
            asm.emit(BPF_JMP_IMM(I.BPF_JGT, R1, hi, fail))
        return
    outside = asm.label("out_of_range")
    asm.emit(BPF_JMP_IMM(I.BPF_JLT, R1, lo, outside), BPF_JMP_IMM(I.BPF_JGT, R1, hi, outside),
             BPF_JMP_A(fail))
    asm.place(outside)


def emit_nonzero(asm: Assembler, off: int, size: int, invert: bool, fail) -> None:
    """Holds iff (field != 0) != invert."""
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off),
             BPF_JMP_IMM(I.BPF_JNE if invert else I.BPF_JEQ, R1, 0, fail))


def emit_at_least(asm: Assembler, off: int, size: int, minimum: int, target) -> None:
    """Jumps to `target` when field < minimum (used for the matches' hotdrop)."""
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off),
             BPF_JMP_IMM(I.BPF_JLT, R1, minimum, target))
