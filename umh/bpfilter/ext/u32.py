"""-m u32 (struct xt_u32, revision 0, both families): u32_match_it(), a little program
of tests over the packet, each reading a big-endian word at a position (moving on with
`@` from the word read), masking and shifting it, and holding if the result is in one
of its ranges; every test must hold, `!` inverts the whole.

With bpfilter.ko: the kernel's own (ext/xtmatch.py). Without it: each test compiled
to straight-line BPF, with the kernel's bounds checks (a word past skb->len fails the
match, as an offset that wraps does) on the packet from its network header, where
skb_copy_bits() reads at the hooks.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Array, Bytes, Int8un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_ENDIAN, BPF_JMP_A,
                        BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV32_REG,
                        BPF_MOV64_IMM, BPF_MOV64_REG, BPF_W, R0, R1, R2, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from ..packet.primitives import emit_answer_and_hotdrop, emit_skip_if_decided
from . import BOTH_FAMILIES, register_match
from .xtmatch import ServedKernelMatch

XT_U32_MAXSIZE = 10
XT_U32_AND, XT_U32_LEFTSH, XT_U32_RIGHTSH, XT_U32_AT = 0, 1, 2, 3
U32 = (1 << 32) - 1

_location = Struct("number" / Int32un, "nextop" / Int8un, Padding(3))
_value = Struct("min" / Int32un, "max" / Int32un)
_test = Struct("location" / Array(XT_U32_MAXSIZE + 1, _location),
               "value" / Array(XT_U32_MAXSIZE + 1, _value),
               "nnums" / Int8un, "nvalues" / Int8un, Padding(2))
_PROGRAM = Struct("tests" / Array(XT_U32_MAXSIZE + 1, _test), "ntests" / Int8un,
                  "invert" / Int8un, Padding(2))
# what the registry sizes the payload by (its parts: _PROGRAM)
xt_u32 = Struct("program" / Bytes(_PROGRAM.sizeof()))


@dataclass(frozen=True)
class U32Test:
    start: int
    steps: tuple[tuple[int, int], ...]      # (nextop, number)
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ServedU32Match(Match):
    tests: tuple[U32Test, ...]
    invert: int
    name = "u32"
    revision = 0


def _program(p) -> tuple[U32Test, ...]:
    return tuple(U32Test(t.location[0].number,
                         tuple((loc.nextop, loc.number) for loc in t.location[1:t.nnums]),
                         tuple((v.min, v.max) for v in t.value[:t.nvalues]))
                 for t in p.tests[:p.ntests])


@register_match
class U32Match(ServedKernelMatch):
    name = "u32"
    revision = 0
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_u32
    why = "which only the kernel's code can run"
    served_model = ServedU32Match
    served_facts = frozenset({"skb"})

    def served(self, payload: bytes, where: str) -> ServedU32Match:
        p = _PROGRAM.parse(payload)
        # u32_mt_checkentry()
        if p.ntests > XT_U32_MAXSIZE + 1:
            raise BpfilterError(errno.EINVAL, f"{where}: u32: {p.ntests} tests")
        for t in p.tests[:p.ntests]:
            if t.nnums > XT_U32_MAXSIZE + 1 or t.nvalues > XT_U32_MAXSIZE + 1:
                raise BpfilterError(errno.EINVAL, f"{where}: u32: a test of {t.nnums} "
                                                  f"locations and {t.nvalues} ranges")
            # (since CVE-2026-72350's fix: a shift of a u32 by 32 or more is undefined)
            for loc in t.location[1:t.nnums]:
                if loc.nextop in (XT_U32_LEFTSH, XT_U32_RIGHTSH) and loc.number >= 32:
                    raise BpfilterError(errno.EINVAL, f"{where}: u32: a shift by "
                                                      f"{loc.number}")
        return ServedU32Match(_program(p), p.invert)

    def describe(self, m) -> str:
        # libxt_u32's u32_print() with its u32_dump()
        if isinstance(m, ServedU32Match):
            tests, invert = m.tests, m.invert
        else:
            p = _PROGRAM.parse(m.payload)
            tests, invert = _program(p), p.invert
        ops = {XT_U32_AND: "&", XT_U32_LEFTSH: "<<", XT_U32_RIGHTSH: ">>", XT_U32_AT: "@"}
        text = "&&".join(
            f"0x{t.start:x}" + "".join(f"{ops.get(op, '')}0x{n:x}" for op, n in t.steps) + "="
            + ",".join(f"0x{lo:x}" if lo == hi else f"0x{lo:x}:0x{hi:x}" for lo, hi in t.ranges)
            for t in tests)
        return f"u32{' !' if invert else ''} \"{text}\""

    def emit_served(self, m: ServedU32Match, asm, out) -> None:
        """u32_match_it() ^ invert: R7 the word (val), R8 `at`, R9 the answer."""
        done, failed, answer = (asm.label("u32_done"), asm.label("u32_failed"),
                                asm.label("u32_answer"))
        emit_skip_if_decided(asm, done)
        for test in m.tests:
            _emit_read(asm, None, test.start, failed)
            asm.emit(BPF_MOV64_IMM(R8, 0))
            for op, number in test.steps:
                if op == XT_U32_AND:
                    asm.emit(BPF_ALU32_IMM(I.BPF_AND, R7, number))
                elif op in (XT_U32_LEFTSH, XT_U32_RIGHTSH):
                    asm.emit(BPF_ALU32_IMM(I.BPF_LSH if op == XT_U32_LEFTSH else I.BPF_RSH,
                                           R7, number))
                elif op == XT_U32_AT:
                    # at += val, failing where it wraps
                    asm.emit(BPF_ALU64_REG(I.BPF_ADD, R8, R7),
                             *BPF_LD_IMM64(R1, U32), BPF_JMP_REG(I.BPF_JGT, R8, R1, failed))
                    _emit_read(asm, R8, number, failed)
            in_range = asm.label("u32_in_range")
            for lo, hi in test.ranges:
                other = asm.label("u32_other_range")
                asm.emit(*BPF_LD_IMM64(R1, lo), BPF_JMP_REG(I.BPF_JGT, R1, R7, other),
                         *BPF_LD_IMM64(R1, hi), BPF_JMP_REG(I.BPF_JGE, R1, R7, in_range))
                asm.place(other)
            asm.emit(BPF_JMP_A(failed))
            asm.place(in_range)
        asm.emit(BPF_MOV64_IMM(R9, 1), BPF_JMP_A(answer))
        asm.place(failed)
        asm.emit(BPF_MOV64_IMM(R9, 0))
        asm.place(answer)
        if m.invert:
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R9, 1))
        emit_answer_and_hotdrop(asm, R9)
        asm.place(done)


def _emit_read(asm, at, pos: int, failed) -> None:
    """R7 = the big-endian word at `at` (a register, or none: 0) + pos, after the
    kernel's checks against skb->len: the first word's (len < 4, pos > len - 4), an
    `@` word's (at + 4 wrapping, len < at + 4, pos > len - at - 4)."""
    asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, facts.LEN), BPF_JMP_IMM(I.BPF_JLT, R2, 4, failed),
             BPF_ALU64_IMM(I.BPF_SUB, R2, 4))
    if at is not None:
        asm.emit(*BPF_LD_IMM64(R1, U32 - 4), BPF_JMP_REG(I.BPF_JGT, at, R1, failed),
                 BPF_JMP_REG(I.BPF_JGT, at, R2, failed), BPF_ALU64_REG(I.BPF_SUB, R2, at))
    asm.emit(*BPF_LD_IMM64(R1, pos), BPF_JMP_REG(I.BPF_JGT, R1, R2, failed))
    if at is not None:
        asm.emit(BPF_ALU64_REG(I.BPF_ADD, R1, at))
    asm.emit(BPF_MOV64_REG(R2, R1))
    facts.emit_slice(asm, offset_reg=R2, size=4)
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, 0, failed),
             BPF_LDX_MEM(BPF_W, R7, R0, 0), BPF_ENDIAN(I.BPF_TO_BE, R7, 32),
             BPF_MOV32_REG(R7, R7))
