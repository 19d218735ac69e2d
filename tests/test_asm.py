"""The BPF encoder (bpf/insn.py) and assembler (bpf/asm.py).

Encodings are compared byte for byte with what the kernel (and llvm-objdump)
spell for the same instruction. The far-jump relaxation is proven by loading the
relaxed program as a netfilter program and running it on both branch outcomes.
"""
import os
import struct

import pytest

from bpfilter.bpf import insn as I
from bpfilter.bpf import syscall as bpf
from bpfilter.bpf.asm import S16, VERIFIER_HEADROOM_REACH, Assembler, AsmError
from bpfilter.bpf.btf import Btf
from bpfilter.bpf.insn import (BPF_ADD, BPF_ALU32_IMM, BPF_ALU64_IMM, BPF_ALU64_REG,
                               BPF_ATOMIC_OP, BPF_B, BPF_CALL_KFUNC, BPF_CALL_REL, BPF_DW,
                               BPF_EMIT_CALL, BPF_ENDIAN, BPF_EXIT_INSN, BPF_H, BPF_JEQ,
                               BPF_JGE, BPF_JGT, BPF_JLE, BPF_JLT, BPF_JMP_A, BPF_JMP_IMM,
                               BPF_JMP_REG, BPF_JMP32_IMM, BPF_JNE, BPF_JSET, BPF_JSGT,
                               BPF_JSLE, BPF_LD_IMM64, BPF_LD_MAP_FD, BPF_LDX_MEM, BPF_MOV32_REG,
                               BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W,
                               FP, R0, R1, R2, R3, R6, Kfunc, MapRef)
from bpfilter.packet.facts import KernelOffsets
from bpfilter.model import Hook

pytestmark = pytest.mark.kernel

FAR = 33_000   # more instructions than a 16-bit jump offset can skip


def hexcode(*items) -> str:
    """The encoding of instructions (or lists of them, like LD_IMM64) as spaced hex."""
    flat = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    return " ".join(i.encode().hex(" ") for i in flat)


# ---------------------------------------------------------------- encoding

@pytest.mark.parametrize("insn, expected", [
    # r0 = 1 / exit: the smallest program
    (BPF_MOV64_IMM(R0, 1), "b7 00 00 00 01 00 00 00"),
    (BPF_EXIT_INSN(), "95 00 00 00 00 00 00 00"),
    # r0 = -1: imm is a signed 32-bit field; 0xffffffff encodes the same
    (BPF_MOV64_IMM(R0, -1), "b7 00 00 00 ff ff ff ff"),
    (BPF_MOV64_IMM(R0, 0xFFFFFFFF), "b7 00 00 00 ff ff ff ff"),
    # r6 = r1 (src in the high nibble of the register byte)
    (BPF_MOV64_REG(R6, R1), "bf 16 00 00 00 00 00 00"),
    # w0 = w1
    (BPF_MOV32_REG(R0, R1), "bc 10 00 00 00 00 00 00"),
    # r2 += -8
    (BPF_ALU64_IMM(BPF_ADD, R2, -8), "07 02 00 00 f8 ff ff ff"),
    # r1 ^= r3
    (BPF_ALU64_REG(I.BPF_XOR, R1, R3), "af 31 00 00 00 00 00 00"),
    # w1 &= 0x1fff
    (BPF_ALU32_IMM(I.BPF_AND, R1, 0x1FFF), "54 01 00 00 ff 1f 00 00"),
    # r1 = be16 r1 / r1 = le32 r1
    (BPF_ENDIAN(I.BPF_TO_BE, R1, 16), "dc 01 00 00 10 00 00 00"),
    (BPF_ENDIAN(I.BPF_TO_LE, R1, 32), "d4 01 00 00 20 00 00 00"),
    # r1 = *(u32 *)(r6 + 40)
    (BPF_LDX_MEM(BPF_W, R1, R6, 40), "61 61 28 00 00 00 00 00"),
    # r1 = *(u8 *)(r0 + 9)
    (BPF_LDX_MEM(BPF_B, R1, R0, 9), "71 01 09 00 00 00 00 00"),
    # *(u64 *)(r10 - 8) = r1
    (BPF_STX_MEM(BPF_DW, FP, R1, -8), "7b 1a f8 ff 00 00 00 00"),
    # *(u16 *)(r6 + 46) = r1
    (BPF_STX_MEM(BPF_H, R6, R1, 46), "6b 16 2e 00 00 00 00 00"),
    # *(u32 *)(r10 - 4) = 7
    (BPF_ST_MEM(BPF_W, FP, -4, 7), "62 0a fc ff 07 00 00 00"),
    # lock *(u64 *)(r0 + 8) += r1   (BPF_STX|BPF_DW|BPF_ATOMIC, imm = BPF_ADD)
    (BPF_ATOMIC_OP(BPF_DW, BPF_ADD, R0, R1, 8), "db 10 08 00 00 00 00 00"),
    # lock *(u32 *)(r1 + 0) += r2
    (BPF_ATOMIC_OP(BPF_W, BPF_ADD, R1, R2, 0), "c3 21 00 00 00 00 00 00"),
    # if r1 == 5 goto +3 / if r1 > r2 goto -2 / if w1 != 0x1234 goto +1
    (BPF_JMP_IMM(BPF_JEQ, R1, 5, 3), "15 01 03 00 05 00 00 00"),
    (BPF_JMP_REG(BPF_JGT, R1, R2, -2), "2d 21 fe ff 00 00 00 00"),
    (BPF_JMP32_IMM(BPF_JNE, R1, 0x1234, 1), "56 01 01 00 34 12 00 00"),
    # if r1 & 4 goto +7
    (BPF_JMP_IMM(BPF_JSET, R1, 4, 7), "45 01 07 00 04 00 00 00"),
    # goto +2
    (BPF_JMP_A(2), "05 00 02 00 00 00 00 00"),
    # call bpf_map_lookup_elem (helper 1) / call bpf_tail_call (helper 12)
    (BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem), "85 00 00 00 01 00 00 00"),
    (BPF_EMIT_CALL(I.BPF_FUNC_tail_call), "85 00 00 00 0c 00 00 00"),
])
def test_encoding(insn, expected):
    assert hexcode(insn) == expected


def test_ld_imm64_takes_two_slots_low_word_first():
    # r1 = 0x1122334455667788 ll
    assert hexcode(BPF_LD_IMM64(R1, 0x1122334455667788)) == (
        "18 01 00 00 88 77 66 55 "
        "00 00 00 00 44 33 22 11")


def test_ld_map_fd_is_ld_imm64_with_pseudo_map_fd_resolved_by_the_assembler():
    asm = Assembler()
    asm.emit(BPF_LD_MAP_FD(R1, MapRef("counters")), BPF_EXIT_INSN())
    code = asm.assemble(map_fd={MapRef("counters"): 9}.__getitem__)
    assert code.hex(" ") == ("18 11 00 00 09 00 00 00 "
                             "00 00 00 00 00 00 00 00 "
                             "95 00 00 00 00 00 00 00")


def test_kfunc_call_has_src_reg_2_and_the_btf_id_as_imm():
    asm = Assembler()
    asm.emit(BPF_CALL_KFUNC(Kfunc("bpf_dynptr_from_skb")), BPF_EXIT_INSN())
    code = asm.assemble(kfunc_id={Kfunc("bpf_dynptr_from_skb"): (0x1234, 0)}.__getitem__)
    assert code[:8].hex(" ") == "85 20 00 00 34 12 00 00"


def test_module_kfunc_call_names_its_btf_in_off():
    """off indexes the program's fd_array, where the module's BTF fd is."""
    asm = Assembler()
    asm.emit(BPF_CALL_KFUNC(Kfunc("bpfilter_reject", "bpfilter")), BPF_EXIT_INSN())
    code = asm.assemble(kfunc_id={Kfunc("bpfilter_reject", "bpfilter"): (0x1a36b, 1)}.__getitem__)
    assert code[:8].hex(" ") == "85 20 01 00 6b a3 01 00"


def test_bpf_to_bpf_call_has_src_reg_1_and_a_relative_imm():
    asm = Assembler()
    sub = asm.label("sub")
    asm.emit(BPF_CALL_REL(sub), BPF_EXIT_INSN())
    asm.place(sub)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    code = asm.assemble()
    # call +1: the callee starts after the exit at slot 1
    assert code[:8].hex(" ") == "85 10 00 00 01 00 00 00"


def test_decode_inverts_encode():
    insns = [BPF_MOV64_IMM(R0, -3), BPF_JMP_IMM(BPF_JSGT, R2, -1, -5),
             BPF_ATOMIC_OP(BPF_DW, BPF_ADD, R0, R1, 8), *BPF_LD_IMM64(R3, 1 << 40)]
    assert I.decode(b"".join(i.encode() for i in insns)) == insns


# ---------------------------------------------------------------- labels

def test_forward_and_backward_labels():
    asm = Assembler()
    top, end = asm.label("top"), asm.label("end")
    asm.place(top)                                   # slot 0
    asm.emit(BPF_JMP_IMM(BPF_JEQ, R1, 0, end))       # slot 0 -> 3: off +2
    asm.emit(BPF_MOV64_IMM(R0, 0))                   # slot 1
    asm.emit(BPF_JMP_IMM(BPF_JNE, R1, 1, top))       # slot 2 -> 0: off -3
    asm.place(end)
    asm.emit(BPF_EXIT_INSN())                        # slot 3
    out = asm.resolve()
    assert [(i.code, i.off) for i in out] == [
        (I.BPF_JMP | BPF_JEQ, 2), (I.BPF_ALU64 | I.BPF_MOV, 0),
        (I.BPF_JMP | BPF_JNE, -3), (I.BPF_JMP | I.BPF_EXIT, 0)]


def test_ld_imm64_counts_two_slots_in_jump_distances():
    asm = Assembler()
    end = asm.label("end")
    asm.emit(BPF_JMP_IMM(BPF_JEQ, R1, 0, end), BPF_LD_IMM64(R2, 7), BPF_MOV64_IMM(R0, 0))
    asm.place(end)
    asm.emit(BPF_EXIT_INSN())
    assert asm.resolve()[0].off == 3


def test_label_referenced_but_never_placed_is_an_error():
    asm = Assembler()
    nowhere = asm.label("nowhere")
    asm.emit(BPF_JMP_IMM(BPF_JEQ, R1, 0, nowhere), BPF_EXIT_INSN())
    with pytest.raises(AsmError, match="never placed"):
        asm.assemble()


def test_call_to_a_label_never_placed_is_an_error():
    asm = Assembler()
    asm.emit(BPF_CALL_REL(asm.label("sub")), BPF_EXIT_INSN())
    with pytest.raises(AsmError, match="never placed"):
        asm.assemble()


def test_label_placed_twice_is_an_error():
    asm = Assembler()
    here = asm.label("here")
    asm.place(here)
    asm.emit(BPF_EXIT_INSN())
    with pytest.raises(AsmError, match="placed twice"):
        asm.place(here)


def test_labels_with_the_same_name_are_distinct():
    asm = Assembler()
    a, b = asm.label("next"), asm.label("next")
    assert a is not b and a.name != b.name
    asm.place(a)
    asm.place(b)   # not "placed twice"


# ---------------------------------------------------------------- relaxation

def filler(n: int) -> list:
    return [BPF_ALU64_IMM(BPF_ADD, R0, 0)] * n


def test_offset_32767_stays_short_32768_is_relaxed():
    for gap, relaxed in ((32767, False), (32768, True)):
        asm = Assembler(short_reach=S16)
        far = asm.label("far")
        asm.emit(BPF_MOV64_IMM(R0, 0), BPF_JMP_IMM(BPF_JEQ, R1, 0, far), filler(gap))
        asm.place(far)
        asm.emit(BPF_EXIT_INSN())
        out = asm.resolve()
        if relaxed:
            assert out[1] == BPF_JMP_IMM(BPF_JNE, R1, 0, 1)
            assert out[2] == I.Insn(I.BPF_JMP32 | I.BPF_JA, imm=gap)
        else:
            assert out[1] == BPF_JMP_IMM(BPF_JEQ, R1, 0, gap)


def test_backward_offset_minus_32768_stays_short():
    asm = Assembler(short_reach=S16)
    top = asm.label("top")
    asm.place(top)
    asm.emit(filler(32767), BPF_JMP_IMM(BPF_JEQ, R1, 0, top), BPF_EXIT_INSN())
    assert asm.resolve()[32767].off == -32768


@pytest.mark.parametrize("op, inverse", [
    (BPF_JEQ, BPF_JNE), (BPF_JNE, BPF_JEQ), (BPF_JGT, BPF_JLE), (BPF_JGE, BPF_JLT),
    (BPF_JLT, BPF_JGE), (BPF_JLE, BPF_JGT), (BPF_JSGT, BPF_JSLE), (BPF_JSLE, BPF_JSGT),
])
def test_far_conditional_jump_becomes_inverted_jump_over_gotol(op, inverse):
    asm = Assembler()
    far = asm.label("far")
    asm.emit(BPF_JMP_REG(op, R1, R2, far), filler(FAR))
    asm.place(far)
    asm.emit(BPF_EXIT_INSN())
    out = asm.resolve()
    assert out[0] == BPF_JMP_REG(inverse, R1, R2, 1)
    # gotol at slot 1 lands on slot 2 + FAR
    assert hexcode(out[1]) == "06 00 00 00 " + struct.pack("<i", FAR).hex(" ")
    assert len(out) == 2 + FAR + 1


def test_far_jmp32_conditional_keeps_its_class():
    asm = Assembler()
    far = asm.label("far")
    asm.emit(BPF_JMP32_IMM(BPF_JEQ, R1, 9, far), filler(FAR))
    asm.place(far)
    asm.emit(BPF_EXIT_INSN())
    assert asm.resolve()[0] == BPF_JMP32_IMM(BPF_JNE, R1, 9, 1)


def test_far_jset_becomes_three_slots():
    asm = Assembler()
    far = asm.label("far")
    asm.emit(BPF_JMP_IMM(BPF_JSET, R1, 4, far), filler(FAR))
    asm.place(far)
    asm.emit(BPF_EXIT_INSN())
    out = asm.resolve()
    # if r1 & 4 goto +1; goto +1; gotol far
    assert out[:3] == [BPF_JMP_IMM(BPF_JSET, R1, 4, 1), BPF_JMP_A(1),
                       I.Insn(I.BPF_JMP32 | I.BPF_JA, imm=FAR)]


def test_far_unconditional_jump_becomes_gotol_backward_too():
    asm = Assembler()
    top, end = asm.label("top"), asm.label("end")
    asm.emit(BPF_JMP_A(end))
    asm.place(top)
    asm.emit(filler(FAR), BPF_EXIT_INSN())
    asm.place(end)
    asm.emit(BPF_JMP_A(top))
    out = asm.resolve()
    assert hexcode(out[0])[:2] == "06" and out[0].imm == FAR + 1
    assert out[-1] == I.Insn(I.BPF_JMP32 | I.BPF_JA, imm=-(FAR + 2))


def test_relaxation_repeats_until_stable():
    """A jump that fits only until another jump inside its span grows must grow too."""
    asm = Assembler(short_reach=S16)
    outer, inner = asm.label("outer"), asm.label("inner")
    asm.emit(BPF_JMP_IMM(BPF_JEQ, R1, 0, outer))        # spans exactly 32767 slots...
    asm.emit(BPF_JMP_IMM(BPF_JEQ, R2, 0, inner))        # ...until this one becomes 2
    asm.emit(filler(32766))
    asm.place(outer)
    asm.emit(filler(10))
    asm.place(inner)
    asm.emit(BPF_EXIT_INSN())
    out = asm.resolve()
    assert out[0] == BPF_JMP_IMM(BPF_JNE, R1, 0, 1)
    assert out[1].code == I.BPF_JMP32 | I.BPF_JA
    assert out[2] == BPF_JMP_IMM(BPF_JNE, R2, 0, 1)
    # outer lands after the inner expansion (4 slots) and the filler
    assert out[1].imm == 4 + 32766 - 2
    assert out[3].imm == 32766 + 10


# ---------------------------------------------------------------- in the kernel

@pytest.fixture(scope="module")
def offsets() -> KernelOffsets:
    return KernelOffsets.from_btf(Btf.vmlinux())


def ip_packet(length: int) -> bytes:
    """A bare IPv4 header (no transport) padded to `length`: skb->len at LOCAL_OUT."""
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, 1, 0, 64, 253, 0,
                       bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])).ljust(length, b"\0")


def run(asm: Assembler, *lengths: int) -> list[int]:
    """Load as a netfilter program and return its verdict for packets of each length."""
    fd = bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, asm.assemble(), "test_asm",
                       expected_attach_type=bpf.BPF_NETFILTER)
    try:
        return [bpf.nf_test_run(fd, Hook.LOCAL_OUT, ip_packet(n))[0] for n in lengths]
    finally:
        os.close(fd)


def load_len(asm: Assembler, k: KernelOffsets, reg=R3) -> None:
    """reg = ctx->skb->len"""
    asm.emit(BPF_LDX_MEM(BPF_DW, R2, R1, k.ctx_skb), BPF_LDX_MEM(BPF_W, reg, R2, k.skb_len))


@pytest.mark.parametrize("op, taken_len, fallthrough_len", [
    (BPF_JEQ, 20, 28), (BPF_JNE, 28, 20), (BPF_JGT, 28, 20), (BPF_JLE, 20, 28),
    # 20 = 0b10100 has bit 4; 24 = 0b11000 does not
    (BPF_JSET, 20, 24),
])
def test_far_conditional_jump_runs_in_the_kernel(offsets, op, taken_len, fallthrough_len):
    asm = Assembler()
    far = asm.label("far")
    load_len(asm, offsets)
    asm.emit(BPF_JMP_IMM(op, R3, 20 if op != BPF_JSET else 4, far),
             BPF_MOV64_IMM(R0, 0), filler(FAR), BPF_EXIT_INSN())
    asm.place(far)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    gotol = 4 if op == BPF_JSET else 3
    assert asm.resolve()[gotol].code == I.BPF_JMP32 | I.BPF_JA
    assert run(asm, taken_len, fallthrough_len) == [1, 0]


def test_far_unconditional_and_far_backward_jumps_run_in_the_kernel(offsets):
    asm = Assembler()
    back, mid = asm.label("back"), asm.label("mid")
    load_len(asm, offsets)
    asm.emit(BPF_JMP_A(mid))                                  # far forward gotol
    asm.place(back)
    asm.emit(BPF_MOV64_IMM(R0, 1), filler(FAR), BPF_EXIT_INSN())
    asm.place(mid)
    asm.emit(BPF_JMP_IMM(BPF_JEQ, R3, 20, back),              # far backward, conditional
             BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    out = asm.resolve()
    assert out[2].code == I.BPF_JMP32 | I.BPF_JA
    assert run(asm, 20, 28) == [1, 0]


# ---------------------------------------------------------------- unreachable code

def test_dead_code_after_exit_is_dropped_and_the_program_loads(offsets):
    asm = Assembler()
    end = asm.label("end")
    load_len(asm, offsets)
    asm.emit(BPF_MOV64_IMM(R0, 0),
             BPF_JMP_IMM(BPF_JEQ, R3, 20, end),
             BPF_EXIT_INSN(),
             BPF_MOV64_IMM(R0, 1), BPF_LD_IMM64(I.R4, 5), BPF_EXIT_INSN())  # dead
    asm.place(end)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    out = asm.resolve()
    assert len(out) == 2 + 3 + 2
    assert out[3] == BPF_JMP_IMM(BPF_JEQ, R3, 20, 1)   # re-resolved past the dropped code
    assert run(asm, 20, 28) == [1, 0]


def test_code_after_arithmetic_whose_op_bits_are_a_jumps_is_kept():
    """BPF_MOD shares BPF_EXIT's op bits, BPF_ADD BPF_JA's: only a jump ends a path."""
    asm = Assembler()
    asm.emit(BPF_MOV64_IMM(R0, 7), BPF_ALU64_IMM(I.BPF_MOD, R0, 4),
             BPF_ALU64_IMM(I.BPF_ADD, R0, 1), BPF_EXIT_INSN())
    assert asm.resolve() == [BPF_MOV64_IMM(R0, 7), BPF_ALU64_IMM(I.BPF_MOD, R0, 4),
                             BPF_ALU64_IMM(I.BPF_ADD, R0, 1), BPF_EXIT_INSN()]


def test_dead_code_between_jump_and_its_label_shortens_the_jump():
    asm = Assembler()
    end = asm.label("end")
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_JMP_A(end), filler(FAR))
    asm.place(end)
    asm.emit(BPF_EXIT_INSN())
    out = asm.resolve()
    assert out == [BPF_MOV64_IMM(R0, 1), BPF_JMP_A(0), BPF_EXIT_INSN()]


def test_unreferenced_subprogram_is_dropped_called_one_is_kept():
    asm = Assembler()
    used, unused = asm.label("used"), asm.label("unused")
    asm.emit(BPF_CALL_REL(used), BPF_EXIT_INSN())
    asm.place(unused)
    asm.emit(BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    asm.place(used)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    out = asm.resolve()
    assert out == [BPF_CALL_REL(used).with_(imm=1), BPF_EXIT_INSN(),
                   BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN()]
    assert run(asm, 20) == [1]


def test_label_at_the_very_end_after_dropped_code_resolves():
    asm = Assembler()
    end = asm.label("end")
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN(), BPF_JMP_A(end), BPF_MOV64_IMM(R0, 0))
    asm.place(end)   # nothing follows: one past the end
    out = asm.resolve()
    assert out == [BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN()]
    assert run(asm, 20) == [1]


def test_jumps_past_half_the_16_bit_reach_are_relaxed_for_the_verifier():
    """The verifier inlines code after assembly; a jump kept short must stay short."""
    for gap, relaxed in ((VERIFIER_HEADROOM_REACH - 1, False), (VERIFIER_HEADROOM_REACH, True)):
        asm = Assembler()
        end = asm.label("end")
        asm.emit(BPF_JMP_IMM(BPF_JEQ, R1, 0, end), filler(gap))
        asm.place(end)
        asm.emit(BPF_EXIT_INSN())
        assert (asm.resolve()[1].code == I.BPF_JMP32 | I.BPF_JA) == relaxed
