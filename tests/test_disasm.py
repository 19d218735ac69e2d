"""The disassembler against `bpftool prog dump xlated` on programs the kernel really
translated, and against the kernel's disasm.c formats for what bpftool v7.1 (whose
disassembler predates cpu v4 and several verifier-internal encodings) cannot check.

Normalized away on both sides, because bpftool adds or drops them and the operands
do not depend on it:
  * the JITed symbol bpftool appends to bpf-to-bpf calls (`call pc+55#bpf_prog_<tag>_F`);
  * the verifier's per-CPU address mov (ALU64 MOV X with off -1, which inlined per-CPU
    array lookups contain): kernels since 6.9 print `r0 = &(void __percpu *)(r0)`, an
    older bpftool prints `r0 = r0`.
"""
import os
import re
import subprocess

import pytest

from bpfilter.bpf import insn as I
from bpfilter.bpf import syscall as bpf
from bpfilter.bpf.disasm import Kallsyms, disassemble
from bpfilter.bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG,
                               BPF_ATOMIC_OP, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_ENDIAN,
                               BPF_EXIT_INSN, BPF_H, BPF_JMP32_IMM, BPF_JMP32_REG, BPF_JMP_A,
                               BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_IMM64, BPF_LD_IMM64_RAW,
                               BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM,
                               BPF_STX_MEM, BPF_W, FP, Insn, R0, R1, R2, R3, R4, R5, R6, R7)
from bpfilter.compiler.codegen import PROG_ARRAY, dispatcher
from bpfilter.loader import load_filter_table
from bpfilter_lab import demo
from bpfilter_lab.scratch import replace_blob


def normalized(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        line = re.sub(r"(call pc[+-]\d+)#\S+$", r"\1", line)
        out.append(re.sub(r"= &\(void __percpu \*\)\((r\d+)\)$", r"= \1", line))
    return out


def bpftool_xlated(prog_id: int) -> list[str]:
    text = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id)],
                          capture_output=True, text=True, check=True).stdout
    return normalized([line for line in text.splitlines() if line])


def assert_as_bpftool(prog_fd: int, kallsyms: Kallsyms) -> list[str]:
    ours = disassemble(bpf.prog_xlated_insns(prog_fd), kallsyms)
    assert normalized(ours) == bpftool_xlated(bpf.prog_info(prog_fd)["id"])
    return ours


@pytest.fixture(scope="module")
def kallsyms():
    return Kallsyms.read()


# a user chain called from two places: a subprogram (one called once is inlined)
CALLED_TWICE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:TWICE - [0:0]
-A OUTPUT -p udp -j TWICE
-A OUTPUT -p tcp -j TWICE
-A TWICE -d 10.0.0.1 -j DROP
COMMIT
"""


def test_demo_programs_as_bpftool_prints_them(kallsyms):
    code = []
    for ruleset in (demo.RULESET, CALLED_TWICE):
        loaded = load_filter_table(replace_blob(ruleset), attach=False)
        try:
            for rules in loaded.hooks.values():
                code += assert_as_bpftool(rules.prog_fd, kallsyms)
        finally:
            loaded.close()
    text = "\n".join(code)
    # what the compiler emits, as the kernel translated it
    for pattern in (r"\(79\) r7 = \*\(u64 \*\)\(r1 \+\d+\)", r"\(7a\) \*\(u64 \*\)\(r6 \+0\) = 0",
                    r"\(85\) call bpf_dynptr_slice#-?\d+", r"\(85\) call pc\+\d+",
                    r"\(18\) r1 = map\[id:\d+\]", r"\(18\) r3 = 0x[0-9a-f]+",
                    r"\(db\) lock \*\(u64 \*\)\(r0 \+8\) \+= r1", r"\(dc\) r1 = be16 r1",
                    r"\(54\) w1 &= \d+", r"\(64\) w9 <<= 2", r"\(a4\) w1 \^= (0x[0-9a-f]+|\d+)",
                    r"\(87\) r3 = -r3", r"\(77\) r1 >>= 63", r"\(4f\) r4 \|= r1",
                    r"\(55\) if r4 != 0x0 goto pc\+\d+", r"\(55\) if r5 != 0x0 goto pc\+\d+",
                    r"\(05\) goto pc\+\d+",
                    r"\(bf\) r0 = &\(void __percpu \*\)\(r0\)", r"\(b7\) r0 = 1", r"\(95\) exit"):
        assert re.search(pattern, text), pattern


def test_dispatcher_as_bpftool_prints_it(kallsyms):
    array_fd = bpf.map_create(bpf.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, "disasm_test")
    try:
        code = dispatcher().assemble(map_fd={PROG_ARRAY: array_fd}.__getitem__)
        prog_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, code, "disasm_test",
                                expected_attach_type=bpf.BPF_NETFILTER)
        try:
            ours = assert_as_bpftool(prog_fd, kallsyms)
        finally:
            os.close(prog_fd)
        array_id = bpf.map_info(array_fd)["id"]
    finally:
        os.close(array_fd)
    assert ours == [f"   0: (18) r2 = map[id:{array_id}]", "   2: (b7) r3 = 0",
                    "   3: (85) call bpf_tail_call#12", "   4: (b7) r0 = 0", "   5: (95) exit"]


_ALU_OPS = (I.BPF_ADD, I.BPF_SUB, I.BPF_MUL, I.BPF_DIV, I.BPF_OR, I.BPF_AND, I.BPF_LSH,
            I.BPF_RSH, I.BPF_MOD, I.BPF_XOR, I.BPF_ARSH, I.BPF_MOV)
_JMP_OPS = (I.BPF_JEQ, I.BPF_JGT, I.BPF_JGE, I.BPF_JSET, I.BPF_JNE, I.BPF_JSGT, I.BPF_JSGE,
            I.BPF_JLT, I.BPF_JLE, I.BPF_JSLT, I.BPF_JSLE)
_SIZES = ((BPF_DW, -8), (BPF_W, -16), (BPF_H, -20), (BPF_B, -22))


def _isa_program() -> bytes:
    """A socket filter using every pre-v4 encoding, on values the verifier cannot know
    (skb->len), so that it neither folds the arithmetic nor hard-wires the branches."""
    unknown = [BPF_LDX_MEM(BPF_W, R2, R6, 0), BPF_LDX_MEM(BPF_W, R3, R6, 0)]
    p = [BPF_MOV64_REG(R6, R1)]
    for op in _ALU_OPS:
        p += unknown + [BPF_ALU64_IMM(op, R2, 3), BPF_ALU64_REG(op, R2, R3),
                        BPF_ALU32_IMM(op, R2, 5), BPF_ALU32_REG(op, R2, R3)]
    p += [BPF_ALU64_IMM(I.BPF_NEG, R2, 0), BPF_ALU32_IMM(I.BPF_NEG, R2, 0),
          BPF_ALU64_IMM(I.BPF_AND, R2, -7)]
    p += [BPF_ENDIAN(I.BPF_TO_BE, R2, 16), BPF_ENDIAN(I.BPF_TO_BE, R2, 32),
          BPF_ENDIAN(I.BPF_TO_BE, R2, 64), BPF_ENDIAN(I.BPF_TO_LE, R2, 32)]
    for size, off in _SIZES:
        p += [BPF_ST_MEM(size, FP, off, -3), BPF_STX_MEM(size, FP, R2, off),
              BPF_LDX_MEM(size, R4, FP, off)]
    p += BPF_LD_IMM64(R5, 0x123456789ABCDEF0) + BPF_LD_IMM64(R5, -2)
    for size, off in _SIZES[:2]:
        for op in (I.BPF_ADD, I.BPF_AND, I.BPF_OR, I.BPF_XOR):
            p += [BPF_ATOMIC_OP(size, op, FP, R2, off), BPF_ATOMIC_OP(size, op | 1, FP, R2, off)]
        p += [BPF_ATOMIC_OP(size, 0xE1, FP, R2, off), BPF_MOV64_IMM(R0, 0),
              BPF_ATOMIC_OP(size, 0xF1, FP, R2, off)]
    p += unknown
    for op in _JMP_OPS:
        p += [BPF_JMP_IMM(op, R2, 7, 0), BPF_JMP_IMM(op, R2, -7, 0), BPF_JMP_REG(op, R2, R3, 0),
              BPF_JMP32_IMM(op, R2, 7, 0), BPF_JMP32_REG(op, R2, R3, 0)]
    p += [BPF_JMP_IMM(I.BPF_JGT, R2, 5, 1), BPF_JMP_A(1), BPF_MOV64_IMM(R2, 1)]
    p += [BPF_EMIT_CALL(7), BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN()]    # bpf_get_prandom_u32
    return b"".join(i.encode() for i in p)


def test_isa_as_bpftool_prints_it(kallsyms):
    prog_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_SOCKET_FILTER, _isa_program(), "disasm_isa")
    try:
        ours = assert_as_bpftool(prog_fd, kallsyms)
    finally:
        os.close(prog_fd)
    codes = {int(line.split("(")[1][:2], 16) for line in ours}
    alu = {klass | op | src for klass in (I.BPF_ALU, I.BPF_ALU64) for op in _ALU_OPS
           for src in (I.BPF_K, I.BPF_X)}
    jmp = {klass | op | src for klass in (I.BPF_JMP, I.BPF_JMP32) for op in _JMP_OPS
           for src in (I.BPF_K, I.BPF_X)}
    mem = {klass | size | I.BPF_MEM for klass in (I.BPF_ST, I.BPF_STX, I.BPF_LDX)
           for size, _ in _SIZES}
    # the verifier keeps every one of them: the comparison above covered them all
    assert alu | jmp | mem | {0x87, 0x84, 0xD4, 0xDC, 0x18, 0xC3, 0xDB, 0x05, 0x85} <= codes


def _code(*insns) -> bytes:
    flat = []
    for item in insns:
        flat += item if isinstance(item, list) else [item]
    return b"".join(i.encode() for i in flat)


# (instructions, what kernel/bpf/disasm.c prints for them), for encodings the
# kernel's translation of our programs does not produce or bpftool v7.1 cannot print
KERNEL_FORMATS = [
    (Insn(0xBF, R1, R2, 8), "(bf) r1 = (s8)r2"),
    (Insn(0xBC, R1, R2, 16), "(bc) w1 = (s16)w2"),
    (Insn(0xBF, R1, R2, 32), "(bf) r1 = (s32)r2"),
    (Insn(0x3F, R1, R2, 1), "(3f) r1 s/= r2"),
    (Insn(0x94, R1, 0, 1, -3), "(94) w1 s%= -3"),
    (Insn(0x89, R1, R2, -4), "(89) r1 = *(s16 *)(r2 -4)"),
    (Insn(0xD7, R3, 0, 0, 64), "(d7) r3 = bswap64 r3"),
    (Insn(0x06, imm=-70000), "(06) gotol pc-70000"),
    (Insn(0xE5, off=3), "(e5) may_goto pc+3"),
    (Insn(0xC2), "(c2) nospec"),
    (Insn(0xBF, R0, R0, -1), "(bf) r0 = &(void __percpu *)(r0)"),
    (Insn(0xBF, R1, R2, 1, 0x10002), "(bf) r1 = addr_space_cast(r2, 1, 2)"),
    (Insn(0xDB, R1, R2, 8, 0x100), "(db) r1 = load_acquire((u64 *)(r2 +8))"),
    (Insn(0xD3, R1, R2, -2, 0x110), "(d3) store_release((u8 *)(r1 -2), r2)"),
    (Insn(0x30, imm=12), "(30) r0 = *(u8 *)skb[12]"),
    (Insn(0x40, 0, R7, 0, 2), "(40) r0 = *(u32 *)skb[r7 + 2]"),
    (BPF_LD_IMM64_RAW(R1, I.BPF_PSEUDO_MAP_VALUE, 9)[:1] + [Insn(0, imm=24)],
     "(18) r1 = map[id:9][0]+24"),
    (BPF_LD_IMM64_RAW(R1, 6, 2)[:1] + [Insn(0, imm=4)], "(18) r1 = map[idx:2]+4"),
    (BPF_LD_IMM64_RAW(R1, 4, 17), "(18) r1 = subprog[+17]"),
    (Insn(0x85, src=I.BPF_PSEUDO_CALL, imm=-5), "(85) call pc-5"),   # as loaded: imm holds it
    (BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem), "(85) call bpf_map_lookup_elem#1"),
    (Insn(0x85, src=I.BPF_PSEUDO_KFUNC_CALL, imm=1234), "(85) call kernel-function#1234"),
    (Insn(0x85, imm=-99999), "(85) call unknown#-99999"),
    (Insn(0x8D, R1), ".insn 0x8d01000000000000"),
    (Insn(0xF7, R1), ".insn 0xf701000000000000"),
    (Insn(0xDB, R1, R2, 0, 0x42), ".insn 0xdb21000042000000"),
    (Insn(0x1B, R1, R2), ".insn 0x1b21000000000000"),
    (Insn(0x18, R1, 0, 0, 1), ".insn 0x1801000001000000"),   # a 64-bit load cut short
]


@pytest.mark.parametrize("insns,text", KERNEL_FORMATS, ids=[t for _, t in KERNEL_FORMATS])
def test_kernel_formats(insns, text):
    assert disassemble(_code(insns)) == [f"   0: {text}"]


def test_instruction_numbers_count_slots():
    code = _code(BPF_LD_IMM64(R1, 1 << 40), [BPF_MOV64_IMM(R0, 0)] * 1000, BPF_EXIT_INSN())
    lines = disassemble(code)
    assert lines[:2] == ["   0: (18) r1 = 0x10000000000", "   2: (b7) r0 = 0"]
    assert lines[-1] == " 1002: (95) exit"


def test_calls_are_named_from_kallsyms_only_with_addresses():
    named = Kallsyms({0x1000: "__bpf_call_base", 0x1400: "bpf_dynptr_slice"})
    hidden = Kallsyms({0: "__bpf_call_base"})
    kfunc = _code(Insn(0x85, src=I.BPF_PSEUDO_KFUNC_CALL, imm=0x400))
    assert disassemble(kfunc, named) == ["   0: (85) call bpf_dynptr_slice#1024"]
    assert disassemble(kfunc, hidden) == ["   0: (85) call kernel-function#1024"]
