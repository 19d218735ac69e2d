"""eBPF instruction encoding, named after the kernel's include/linux/filter.h macros.

Naming the constructors exactly like the kernel's macros (BPF_MOV64_IMM, BPF_LDX_MEM, ...)
lets a reader hold generated code side by side with kernel selftests and verifier logs.
Jump offsets, call targets and map references may be symbolic (a Label or a MapRef);
the assembler in asm.py resolves them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional, Union

# instruction classes
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64 = range(8)
# sizes
BPF_W, BPF_H, BPF_B, BPF_DW = 0x00, 0x08, 0x10, 0x18
# modes
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_ATOMIC = 0x00, 0x20, 0x40, 0x60, 0xC0
# ALU operations
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70)
BPF_NEG, BPF_MOD, BPF_XOR, BPF_MOV, BPF_ARSH, BPF_END = 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0
# operand source
BPF_K, BPF_X = 0x00, 0x08
BPF_TO_LE, BPF_TO_BE = 0x00, 0x08
# jump operations
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_JSGT, BPF_JSGE, BPF_CALL, BPF_EXIT = 0x60, 0x70, 0x80, 0x90
BPF_JLT, BPF_JLE, BPF_JSLT, BPF_JSLE = 0xA0, 0xB0, 0xC0, 0xD0
# pseudo source registers
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_CALL = 1
BPF_PSEUDO_KFUNC_CALL = 2
BPF_PSEUDO_FUNC = 4          # ld_imm64 of a subprogram's address (a callback)

# registers
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10

# helper function ids (uapi enum bpf_func_id, stable ABI)
BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_tail_call = 12
BPF_FUNC_spin_lock = 93
BPF_FUNC_spin_unlock = 94
BPF_FUNC_probe_read_kernel = 113
BPF_FUNC_jiffies64 = 118
BPF_FUNC_get_prandom_u32 = 7
BPF_FUNC_get_smp_processor_id = 8
BPF_FUNC_loop = 181
BPF_FUNC_ringbuf_reserve = 131
BPF_FUNC_ringbuf_submit = 132
BPF_FUNC_dynptr_read = 201

# the condition that holds when the original one does not, for relaxing far jumps
INVERTED_JUMP = {
    BPF_JEQ: BPF_JNE, BPF_JNE: BPF_JEQ,
    BPF_JGT: BPF_JLE, BPF_JLE: BPF_JGT, BPF_JGE: BPF_JLT, BPF_JLT: BPF_JGE,
    BPF_JSGT: BPF_JSLE, BPF_JSLE: BPF_JSGT, BPF_JSGE: BPF_JSLT, BPF_JSLT: BPF_JSGE,
}


class Label:
    """A symbolic position in a program, placed once with Assembler.place()."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Slot(NamedTuple):
    """An offset into a struct whose layout the program's assembly decides (the
    packet facts' optional regions): region name and offset in it."""

    region: str
    offset: int = 0

    def __add__(self, more: int) -> "Slot":
        return Slot(self.region, self.offset + more)


@dataclass(frozen=True)
class MapRef:
    """A map named in the code; the loader substitutes its file descriptor."""

    name: str
    # what needs it and who provides it, for the refusal when it is missing
    purpose: str = field(default="", compare=False)


@dataclass(frozen=True)
class Kfunc:
    """A kernel function called by name; its BTF id comes from the running kernel:
    from vmlinux's BTF, or from the BTF of the module named `module`."""

    name: str
    module: Optional[str] = None


Target = Union[int, Label]


@dataclass(frozen=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: Union[int, Label, Slot] = 0
    imm: Union[int, Label, MapRef, Kfunc, Slot] = 0

    def encode(self) -> bytes:
        assert isinstance(self.off, int) and isinstance(self.imm, int), self
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off,
                           _s32(self.imm))

    @property
    def klass(self) -> int:
        return self.code & 0x07

    @property
    def op(self) -> int:
        return self.code & 0xF0

    def is_jump(self) -> bool:
        return self.klass in (BPF_JMP, BPF_JMP32) and self.op not in (BPF_CALL, BPF_EXIT)

    def with_(self, **fields) -> "Insn":
        return replace(self, **fields)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def decode(blob: bytes) -> list[Insn]:
    insns = []
    for pos in range(0, len(blob), 8):
        code, regs, off, imm = struct.unpack_from("<BBhi", blob, pos)
        insns.append(Insn(code, regs & 0xF, regs >> 4, off, imm))
    return insns


# ALU
def BPF_ALU64_REG(op, dst, src): return Insn(BPF_ALU64 | op | BPF_X, dst, src)
def BPF_ALU32_REG(op, dst, src): return Insn(BPF_ALU | op | BPF_X, dst, src)
def BPF_ALU64_IMM(op, dst, imm): return Insn(BPF_ALU64 | op | BPF_K, dst, 0, 0, imm)
def BPF_ALU32_IMM(op, dst, imm): return Insn(BPF_ALU | op | BPF_K, dst, 0, 0, imm)
def BPF_MOV64_REG(dst, src): return BPF_ALU64_REG(BPF_MOV, dst, src)
def BPF_MOV32_REG(dst, src): return BPF_ALU32_REG(BPF_MOV, dst, src)
def BPF_MOV64_IMM(dst, imm): return BPF_ALU64_IMM(BPF_MOV, dst, imm)
def BPF_MOV32_IMM(dst, imm): return BPF_ALU32_IMM(BPF_MOV, dst, imm)
def BPF_ENDIAN(kind, dst, bits): return Insn(BPF_ALU | BPF_END | kind, dst, 0, 0, bits)


# 64-bit immediates take two instruction slots
def BPF_LD_IMM64_RAW(dst, src, imm) -> list[Insn]:
    if isinstance(imm, int):
        return [Insn(BPF_LD | BPF_DW | BPF_IMM, dst, src, 0, imm & 0xFFFFFFFF),
                Insn(0, 0, 0, 0, (imm >> 32) & 0xFFFFFFFF)]
    return [Insn(BPF_LD | BPF_DW | BPF_IMM, dst, src, 0, imm), Insn(0)]


def BPF_LD_IMM64(dst, imm: int) -> list[Insn]:
    return BPF_LD_IMM64_RAW(dst, 0, imm)


def BPF_LD_MAP_FD(dst, map_ref: MapRef) -> list[Insn]:
    return BPF_LD_IMM64_RAW(dst, BPF_PSEUDO_MAP_FD, map_ref)


def BPF_LD_FUNC(dst, callback: Label) -> list[Insn]:
    """dst = a subprogram, for helpers taking a callback (bpf_loop)."""
    return BPF_LD_IMM64_RAW(dst, BPF_PSEUDO_FUNC, callback)


def BPF_LD_MAP_VALUE(dst, map_ref: MapRef, value_off: int) -> list[Insn]:
    """dst = the address of an array map's first value, plus value_off."""
    return [Insn(BPF_LD | BPF_DW | BPF_IMM, dst, BPF_PSEUDO_MAP_VALUE, 0, map_ref),
            Insn(0, 0, 0, 0, value_off)]


# memory
def BPF_LDX_MEM(size, dst, src, off): return Insn(BPF_LDX | size | BPF_MEM, dst, src, off)
def BPF_STX_MEM(size, dst, src, off): return Insn(BPF_STX | size | BPF_MEM, dst, src, off)
def BPF_ST_MEM(size, dst, off, imm): return Insn(BPF_ST | size | BPF_MEM, dst, 0, off, imm)
BPF_FETCH = 0x01   # an atomic op that also loads the old value into src


def BPF_ATOMIC_OP(size, op, dst, src, off): return Insn(BPF_STX | size | BPF_ATOMIC, dst, src, off, op)


# jumps: off may be a Label
def BPF_JMP_REG(op, dst, src, off): return Insn(BPF_JMP | op | BPF_X, dst, src, off)
def BPF_JMP_IMM(op, dst, imm, off): return Insn(BPF_JMP | op | BPF_K, dst, 0, off, imm)
def BPF_JMP32_REG(op, dst, src, off): return Insn(BPF_JMP32 | op | BPF_X, dst, src, off)
def BPF_JMP32_IMM(op, dst, imm, off): return Insn(BPF_JMP32 | op | BPF_K, dst, 0, off, imm)
def BPF_JMP_A(off): return Insn(BPF_JMP | BPF_JA, 0, 0, off)


# calls
def BPF_EMIT_CALL(func_id: int): return Insn(BPF_JMP | BPF_CALL, 0, 0, 0, func_id)
def BPF_CALL_REL(target: Target): return Insn(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_CALL, 0, target)
def BPF_CALL_KFUNC(func: Kfunc): return Insn(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_KFUNC_CALL, 0, func)
def BPF_EXIT_INSN(): return Insn(BPF_JMP | BPF_EXIT)
