"""Tests on packet facts, shared by the ip header part of rules and by extensions.

A rule's tests do not branch: each one folds into the rule's outcome (RuleOutcome),
and the rule branches once at its end. The verifier walks code branch by branch and
keeps every branch it has not walked yet pending, up to 8192; a branch per test
would leave several pending per rule and cap chains at a couple of thousand rules.

Each emitter takes `invert` as iptables' `!`. A test that always holds emits nothing,
one that never holds marks the rule as never matching.
"""
from __future__ import annotations

import struct

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B,
                        BPF_DW, BPF_EMIT_CALL, BPF_ENDIAN, BPF_H, BPF_JMP_IMM, BPF_LD_IMM64,
                        BPF_LD_MAP_FD, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W, FP, R0, R1,
                        R2, R3, R4, R5, R6)

_SIZE = {1: BPF_B, 2: BPF_H, 4: BPF_W}
MISMATCH, HOTDROP = R4, R5
# A chain template's subprogram (compiler/templates.py) keeps its record's address in
# its frame here: where the code of its rules reads their constants.
RECORD_FP = -16


class Hole:
    """A rule's constant that a template's instances each have their own of: a u32
    word of the instance's record, at `offset`. Emitters take it where they take the
    number (the rule model holds it in its place) and load it where they would write
    an immediate. Their choices of code compare it: it compares as `exemplar`, the
    value of the first instance, and every instance of a template answers those
    comparisons alike (templates.py's shape). It does no arithmetic: an emitter that
    computed with it would compute with one instance's value for all."""

    __slots__ = ("offset", "exemplar")

    def __init__(self, offset: int, exemplar: int):
        self.offset, self.exemplar = offset, exemplar

    def _value(self, other):
        return other.exemplar if isinstance(other, Hole) else other

    def __eq__(self, other):
        return self.exemplar == self._value(other)

    def __ne__(self, other):
        return self.exemplar != self._value(other)

    def __lt__(self, other):
        return self.exemplar < self._value(other)

    def __le__(self, other):
        return self.exemplar <= self._value(other)

    def __gt__(self, other):
        return self.exemplar > self._value(other)

    def __ge__(self, other):
        return self.exemplar >= self._value(other)

    def __bool__(self):
        return bool(self.exemplar)

    # unhashable: a cache keyed by value would hand it an immediate made for another
    __hash__ = None

    def __repr__(self):
        return f"Hole({self.offset}, {self.exemplar})"


class HoleBlock(bytes):
    """Bytes of a template's instance record (a NAT range) at `offset`: the exemplar's
    bytes, which only emit_store_words may use."""

    offset: int

    def __new__(cls, exemplar: bytes, offset: int):
        block = super().__new__(cls, exemplar)
        block.offset = offset
        return block


def emit_hole(asm: Assembler, reg: int, hole: Hole) -> None:
    """reg = the instance's word for `hole`."""
    asm.emit(BPF_LDX_MEM(BPF_DW, reg, FP, RECORD_FP), BPF_LDX_MEM(BPF_W, reg, reg, hole.offset))


def emit_store_words(asm: Assembler, base: int, off: int, data: bytes) -> None:
    """*(base + off) = data, 4-byte words; a HoleBlock's come from the record (through
    R0 and R1)."""
    if isinstance(data, HoleBlock):
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, FP, RECORD_FP))
        for at in range(0, len(data), 4):
            asm.emit(BPF_LDX_MEM(BPF_W, R0, R1, data.offset + at),
                     BPF_STX_MEM(BPF_W, base, R0, off + at))
        return
    asm.emit(BPF_ST_MEM(BPF_W, base, off + at, struct.unpack_from("<i", data, at)[0])
             for at in range(0, len(data), 4))


def emit_nonzero_bit(asm: Assembler, reg: int, tmp: int) -> None:
    """reg = 1 if reg != 0 else 0, for any 64-bit value: x | -x has its top bit set
    exactly when x is not zero."""
    asm.emit(BPF_MOV64_REG(tmp, reg), BPF_ALU64_IMM(I.BPF_NEG, tmp, 0),
             BPF_ALU64_REG(I.BPF_OR, reg, tmp), BPF_ALU64_IMM(I.BPF_RSH, reg, 63))


class RuleOutcome:
    """One rule's outcome, folded without branches: MISMATCH (R4) is non-zero once a
    test failed; HOTDROP (R5) is 1 once a match would drop the packet (the kernel's
    par->hotdrop) while every test before it held. finish() branches: to `drop` on a
    hotdrop, to `next` on a mismatch, on through otherwise."""

    def __init__(self, asm: Assembler, rule=None):
        self.asm = asm
        self.rule = rule    # matches with per-rule state (limit) key it by the rule
        self.hotdrops = False
        asm.emit(BPF_MOV64_IMM(MISMATCH, 0), BPF_MOV64_IMM(HOTDROP, 0))

    def never(self) -> None:
        self.asm.emit(BPF_ALU64_IMM(I.BPF_OR, MISMATCH, 1))

    def mismatch(self, reg: int) -> None:
        """The test failed if `reg` is not zero."""
        self.asm.emit(BPF_ALU64_REG(I.BPF_OR, MISMATCH, reg))

    def hotdrop(self, bit: int) -> None:
        """The match drops the packet if `bit` (0 or 1) is set and no test failed yet."""
        self.hotdrops = True
        asm = self.asm
        asm.emit(BPF_MOV64_REG(R0, MISMATCH))
        emit_nonzero_bit(asm, R0, R3)
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R0, 1), BPF_ALU64_REG(I.BPF_AND, bit, R0),
                 BPF_ALU64_REG(I.BPF_OR, HOTDROP, bit))

    def finish(self, next_rule, drop) -> None:
        # A hotdrop outranks any later mismatch: clear MISMATCH then, so that the
        # mismatch branch comes first and the drop branch, pushed last, is walked first.
        asm = self.asm
        if self.hotdrops:
            asm.emit(BPF_MOV64_REG(R0, HOTDROP), BPF_ALU64_IMM(I.BPF_SUB, R0, 1),
                     BPF_ALU64_REG(I.BPF_AND, MISMATCH, R0))
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, MISMATCH, 0, next_rule))
        if self.hotdrops:
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, HOTDROP, 0, drop))


def emit_skip_if_decided(asm: Assembler, skip) -> None:
    """To `skip` once a test of the rule failed or a match hotdropped: the kernel stops
    at the first match that fails, so a match with side effects (state it updates, a
    counter, the kernel's own match) must not run after one."""
    asm.emit(BPF_MOV64_REG(R1, MISMATCH), BPF_ALU64_REG(I.BPF_OR, R1, HOTDROP),
             BPF_JMP_IMM(I.BPF_JNE, R1, 0, skip))


def emit_answer_and_hotdrop(asm: Assembler, reg: int) -> None:
    """The rule's outcome from `reg` (a callee-saved register that outlived a stateful
    match's helper calls): bit 0, the match's answer; bit 1, a hotdrop, whose outcome
    is not a match's. Only where emit_skip_if_decided() let the match run."""
    asm.emit(BPF_MOV64_REG(HOTDROP, reg), BPF_ALU64_IMM(I.BPF_RSH, HOTDROP, 1),
             BPF_MOV64_REG(MISMATCH, reg), BPF_ALU64_IMM(I.BPF_AND, MISMATCH, 1),
             BPF_ALU64_IMM(I.BPF_XOR, MISMATCH, 1),
             BPF_ALU64_REG(I.BPF_OR, MISMATCH, HOTDROP))


def emit_state_lookup(asm: Assembler, state_map, key: int, key_slot) -> None:
    """R0 = the value of `key` (a u64, written at the facts' `key_slot`, where helpers
    can read it from any frame) in the per-rule state map `state_map`, or NULL."""
    asm.emit(BPF_LD_IMM64(R1, key), BPF_STX_MEM(BPF_DW, R6, R1, key_slot),
             BPF_LD_MAP_FD(R1, state_map), BPF_MOV64_REG(R2, R6),
             BPF_ALU64_IMM(I.BPF_ADD, R2, key_slot),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem))


def _invert_bit(asm: Assembler, reg: int) -> None:
    emit_nonzero_bit(asm, reg, R3)
    asm.emit(BPF_ALU64_IMM(I.BPF_XOR, reg, 1))


def emit_masked_equal(asm: Assembler, off: int, size: int, mask: int, value: int,
                      invert: bool, out: RuleOutcome) -> None:
    """Holds iff ((field & mask) == value) != invert, the kernel's comparison of
    addresses, protocols and tcp flags (value bits outside mask never match)."""
    full = (1 << (8 * size)) - 1
    if mask == 0:
        if (value == 0) == invert:
            out.never()
        return
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off))
    if mask != full:
        asm.emit(BPF_ALU32_IMM(I.BPF_AND, R1, mask))
    if isinstance(value, Hole):
        emit_hole(asm, R0, value)
        asm.emit(BPF_ALU32_REG(I.BPF_XOR, R1, R0))
    elif value:
        asm.emit(BPF_ALU32_IMM(I.BPF_XOR, R1, value))
    if invert:
        _invert_bit(asm, R1)
    out.mismatch(R1)


def emit_name_equal(asm: Assembler, off: int, name: bytes, mask: bytes, invert: bool,
                    out: RuleOutcome) -> None:
    """Holds iff ((field ^ name) & mask) == 0 over 16 bytes, != invert: the kernel's
    ifname_compare_aligned(), compared 8 bytes at a time as it does, and IPv6's
    ipv6_masked_addr_cmp(). A template's IPv6 address is a HoleBlock, read from the
    instance's record."""
    chunks = [(o, int.from_bytes(name[o:o + 8], "little"), int.from_bytes(mask[o:o + 8], "little"))
              for o in range(0, len(name), 8)]
    chunks = [c for c in chunks if c[2]]
    if not chunks:
        if invert:
            out.never()
        return
    for i, (o, value, m) in enumerate(chunks):
        acc = R1 if i == 0 else R2
        asm.emit(BPF_LDX_MEM(BPF_DW, acc, R6, off + o))
        if isinstance(name, HoleBlock):
            asm.emit(BPF_LDX_MEM(BPF_DW, R3, FP, RECORD_FP),
                     BPF_LDX_MEM(BPF_DW, R3, R3, name.offset + o))
        else:
            asm.emit(BPF_LD_IMM64(R3, value))
        asm.emit(BPF_ALU64_REG(I.BPF_XOR, acc, R3),
                 BPF_LD_IMM64(R3, m), BPF_ALU64_REG(I.BPF_AND, acc, R3))
        if i:
            asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2))
    if invert:
        _invert_bit(asm, R1)
    out.mismatch(R1)


def emit_const(asm: Assembler, reg: int, value: int) -> None:
    """reg = value, an unsigned 32-bit value (a mov's immediate is sign-extended), or a
    template's Hole."""
    if isinstance(value, Hole):
        emit_hole(asm, reg, value)
        return
    asm.emit(BPF_MOV64_IMM(reg, value) if value < 1 << 31 else BPF_LD_IMM64(reg, value))


def _alu_const(asm: Assembler, op: int, reg: int, value: int) -> None:
    """reg op= value, an unsigned 32-bit value, through R0 if it needs 64 bits (or is
    a Hole)."""
    if isinstance(value, Hole):
        emit_hole(asm, R0, value)
        asm.emit(BPF_ALU64_REG(op, reg, R0))
    elif value < 1 << 31:
        asm.emit(BPF_ALU64_IMM(op, reg, value))
    else:
        asm.emit(BPF_LD_IMM64(R0, value), BPF_ALU64_REG(op, reg, R0))


def emit_outside(asm: Assembler, dst: int, off: int, size: int, lo: int, hi: int,
                 wire_order: bool = False) -> None:
    """dst = 1 if the field is outside [lo, hi], else 0. Fields are at most 32 bits,
    so a 64-bit difference is negative exactly when the bound is crossed. A
    `wire_order` field (an address) is compared as the number it spells."""
    full = (1 << (8 * size)) - 1
    asm.emit(BPF_LDX_MEM(_SIZE[size], R3, R6, off))
    if wire_order:
        asm.emit(BPF_ENDIAN(I.BPF_TO_BE, R3, 8 * size))
    if lo == hi:
        asm.emit(BPF_MOV64_REG(dst, R3))
        if lo:
            _alu_const(asm, I.BPF_XOR, dst, lo)
        emit_nonzero_bit(asm, dst, R0)
        return
    asm.emit(BPF_MOV64_IMM(dst, 0))
    if lo > 0:
        asm.emit(BPF_MOV64_REG(dst, R3))
        _alu_const(asm, I.BPF_SUB, dst, lo)
        asm.emit(BPF_ALU64_IMM(I.BPF_RSH, dst, 63))
    if hi < full:
        emit_const(asm, R0, hi)
        asm.emit(BPF_ALU64_REG(I.BPF_SUB, R0, R3),
                 BPF_ALU64_IMM(I.BPF_RSH, R0, 63), BPF_ALU64_REG(I.BPF_OR, dst, R0))


def emit_range(asm: Assembler, off: int, size: int, lo: int, hi: int, invert: bool,
               out: RuleOutcome, wire_order: bool = False) -> None:
    """Holds iff (lo <= field <= hi) != invert, as the kernel's port_match()."""
    full = (1 << (8 * size)) - 1
    if lo == 0 and hi >= full:
        if invert:
            out.never()
        return
    emit_outside(asm, R1, off, size, lo, hi, wire_order)
    if invert:
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
    out.mismatch(R1)


def emit_nonzero(asm: Assembler, off: int, size: int, invert: bool, out: RuleOutcome) -> None:
    """Holds iff (field != 0) != invert."""
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off))
    emit_nonzero_bit(asm, R1, R3)
    if not invert:
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
    out.mismatch(R1)


def emit_below(asm: Assembler, off: int, size: int, minimum: int, out: RuleOutcome) -> None:
    """A hotdrop when field < minimum (a transport header too short for the match)."""
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off), BPF_ALU64_IMM(I.BPF_SUB, R1, minimum),
             BPF_ALU64_IMM(I.BPF_RSH, R1, 63))
    out.hotdrop(R1)


def emit_equal_hotdrop(asm: Assembler, off: int, size: int, value: int, out: RuleOutcome) -> None:
    """A hotdrop when field == value."""
    asm.emit(BPF_LDX_MEM(_SIZE[size], R1, R6, off), BPF_ALU64_IMM(I.BPF_XOR, R1, value))
    _invert_bit(asm, R1)
    out.hotdrop(R1)
