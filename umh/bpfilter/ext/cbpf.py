"""-m bpf --bytecode (struct xt_bpf_info, revision 0; xt_bpf_info_v1's bytecode mode,
revision 1; both families): a classic BPF program run on the packet from its network
header, matching when it returns non-zero (bpf_mt()).

The kernel checks the program as bpf_prog_create() does (bpf_check_classic(): the
opcodes, division by a constant 0, shifts, memory cells, jumps inside the program,
ancillary loads it knows, a last RET; check_load_and_stores(): no cell read before
every path stored it) and runs its eBPF conversion. bpfilter checks it the same way
(EINVAL) and translates it into the rule's own code, with or without bpfilter.ko: A
and X in registers, the 16 cells in the facts, loads as the conversion's helpers make
them (bpf_skb_load_helper_*: an offset within skb->len through skb_header_pointer();
one in SKF_NET_OFF's or SKF_LL_OFF's range from the network or link-layer header,
within the linear data; anything else, or a division by X = 0, ends the program with
0), ancillary loads of the protocol, mark, input device's index, length and A ^ X.
Programs using the other ancillary loads (VLAN, hash, queue, netlink attributes, the
payload offset, random numbers, the CPU), and the pinned-program modes of revision 1,
are refused.
"""
from __future__ import annotations

import errno
import functools
from dataclasses import dataclass
from typing import Optional

from construct import Array, Bytes, Int8un, Int16un, Int32sn, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW,
                        BPF_EMIT_CALL, BPF_ENDIAN, BPF_H, BPF_JMP32_IMM, BPF_JMP32_REG, BPF_JMP_A,
                        BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV32_IMM,
                        BPF_MOV32_REG, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_STX_MEM, BPF_W, R0, R1,
                        R2, R3, R4, R5, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from ..packet.primitives import emit_answer_and_hotdrop, emit_skip_if_decided
from . import BOTH_FAMILIES, MatchExtension, register_match

XT_BPF_MAX_NUM_INSTR = 64
XT_BPF_MODE_BYTECODE = 0
BPF_MEMWORDS = 16

_insn = Struct("code" / Int16un, "jt" / Int8un, "jf" / Int8un, "k" / Int32un)
xt_bpf_info = Struct("bpf_program_num_elem" / Int16un, Padding(2),
                     "bpf_program" / Bytes(8 * XT_BPF_MAX_NUM_INSTR), Padding(4),
                     "_filter" / Bytes(8))
xt_bpf_info_v1 = Struct("mode" / Int16un, "bpf_program_num_elem" / Int16un, "fd" / Int32sn,
                        "bpf_program" / Bytes(8 * XT_BPF_MAX_NUM_INSTR), "_filter" / Bytes(8))
_PROGRAM = Array(XT_BPF_MAX_NUM_INSTR, _insn)

# classic BPF's opcodes (include/uapi/linux/filter.h, bpf_common.h)
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B_ = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
K, X = 0x00, 0x08
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (0x00, 0x10, 0x20, 0x30, 0x40, 0x50,
                                                       0x60, 0x70, 0x80, 0x90, 0xA0)
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
RET_A = 0x10
TAX, TXA = 0x00, 0x80
SKF_AD_OFF, SKF_NET_OFF, SKF_LL_OFF = -0x1000, -0x100000, -0x200000
# ancillary loads: offset from SKF_AD_OFF -> name; those translated
_ANCILLARY = {0: "protocol", 4: "pkttype", 8: "ifindex", 12: "nlattr", 16: "nlattr_nest",
              20: "mark", 24: "queue", 28: "hatype", 32: "rxhash", 36: "cpu",
              40: "alu_xor_x", 44: "vlan_tag", 48: "vlan_tag_present", 52: "pay_offset",
              56: "random", 60: "vlan_tpid"}
_TRANSLATED = {"protocol", "ifindex", "mark", "alu_xor_x"}
U32 = (1 << 32) - 1


def _allowed(code: int) -> bool:
    """chk_code_allowed()."""
    cls, op = code & 0x07, code & 0xF0
    if cls == ALU:
        return (op in (ADD, SUB, MUL, DIV, MOD, AND, OR, XOR, LSH, RSH) and code & 0x08 in (K, X)
                and code & ~0xF8 == ALU) or code == ALU | NEG
    if cls == LD:
        return code in (LD | W | ABS, LD | H | ABS, LD | B_ | ABS, LD | W | IND, LD | H | IND,
                        LD | B_ | IND, LD | MEM, LD | IMM, LD | W | LEN)
    if cls == LDX:
        return code in (LDX | W | LEN, LDX | B_ | MSH, LDX | IMM, LDX | MEM)
    if cls in (ST, STX):
        return code == cls
    if cls == MISC:
        return code in (MISC | TAX, MISC | TXA)
    if cls == RET:
        return code in (RET | K, RET | RET_A)
    if cls == JMP:
        return code == JMP | JA or (op in (JEQ, JGT, JGE, JSET) and code & ~0xF8 == JMP)
    return False


def _signed(k: int) -> int:
    return k - (1 << 32) if k & (1 << 31) else k


def _is_ancillary(k: int) -> bool:
    """k >= SKF_AD_OFF, as the kernel compares them: unsigned."""
    return k >= SKF_AD_OFF & U32


def _ancillary(k: int) -> Optional[str]:
    return _ANCILLARY.get(_signed(k) - SKF_AD_OFF) if _is_ancillary(k) else None


def check_classic(program: list, where: str) -> None:
    """bpf_check_basics_ok(), bpf_check_classic(), check_load_and_stores(): EINVAL."""
    def invalid(why: str):
        return BpfilterError(errno.EINVAL, f"{where}: bpf: {why}")
    n = len(program)
    if n == 0:
        raise invalid("an empty program")
    for pc, ins in enumerate(program):
        code, k = ins.code, ins.k
        if not _allowed(code):
            raise invalid(f"instruction {pc}: opcode {code:#x} is not classic BPF's")
        if code in (ALU | DIV | K, ALU | MOD | K) and k == 0:
            raise invalid(f"instruction {pc}: a division by 0")
        if code in (ALU | LSH | K, ALU | RSH | K) and k >= 32:
            raise invalid(f"instruction {pc}: a shift by {k}")
        if code in (LD | MEM, LDX | MEM, ST, STX) and k >= BPF_MEMWORDS:
            raise invalid(f"instruction {pc}: memory cell {k}")
        if code == JMP | JA and k >= n - pc - 1:
            raise invalid(f"instruction {pc}: a jump out of the program")
        if code & 0x07 == JMP and code != JMP | JA and \
                (pc + ins.jt + 1 >= n or pc + ins.jf + 1 >= n):
            raise invalid(f"instruction {pc}: a jump out of the program")
        if code in (LD | W | ABS, LD | H | ABS, LD | B_ | ABS) and \
                _is_ancillary(k) and _ancillary(k) is None:
            raise invalid(f"instruction {pc}: unknown ancillary load {k:#x}")
    if program[-1].code not in (RET | K, RET | RET_A):
        raise invalid("the last instruction is no RET")
    masks, valid = [0xFFFF] * n, 0
    for pc, ins in enumerate(program):
        valid &= masks[pc]
        code, k = ins.code, ins.k
        if code in (ST, STX):
            valid |= 1 << k
        elif code in (LD | MEM, LDX | MEM):
            if not valid & (1 << k):
                raise invalid(f"instruction {pc}: memory cell {k} read before it is written")
        elif code == JMP | JA:
            masks[pc + 1 + k] &= valid
            valid = 0xFFFF
        elif code & 0x07 == JMP:
            masks[pc + 1 + ins.jt] &= valid
            masks[pc + 1 + ins.jf] &= valid
            valid = 0xFFFF


@dataclass(frozen=True)
class CbpfMatch(Match):
    program: tuple[tuple[int, int, int, int], ...]     # (code, jt, jf, k)
    revision: int
    mode: int = XT_BPF_MODE_BYTECODE
    name = "bpf"


@functools.lru_cache(maxsize=1)
def _offsets() -> dict[str, int]:
    b = Btf.vmlinux()
    return dict(protocol=b.member("sk_buff", "protocol")[0], mark=b.member("sk_buff", "mark")[0],
                dev=b.member("sk_buff", "dev")[0], ifindex=b.member("net_device", "ifindex")[0],
                head=b.member("sk_buff", "head")[0], tail=b.member("sk_buff", "tail")[0],
                network_header=b.member("sk_buff", "network_header")[0],
                mac_header=b.member("sk_buff", "mac_header")[0])


# the program's 16 memory cells, and the loads' scratch
_REGION = facts.reserve("cbpf", 4 * BPF_MEMWORDS + 8)
_MEM = _REGION
_LOADED = _REGION + 4 * BPF_MEMWORDS
_SIZES = {W: (4, BPF_W), H: (2, BPF_H), B_: (1, BPF_B)}


class _Cbpf(MatchExtension):
    name = "bpf"
    families = BOTH_FAMILIES
    family_independent = True
    facts = frozenset({"skb", "cbpf"})

    def program_of(self, p, where: str) -> tuple:
        count = p.bpf_program_num_elem
        if count > XT_BPF_MAX_NUM_INSTR:
            raise BpfilterError(errno.EINVAL, f"{where}: bpf: {count} instructions, more than "
                                              f"{XT_BPF_MAX_NUM_INSTR}")
        program = list(_PROGRAM.parse(p.bpf_program))[:count]
        check_classic(program, where)
        return tuple((i.code, i.jt, i.jf, i.k) for i in program)

    def unsupported(self, m: CbpfMatch) -> Optional[str]:
        for code, _, _, k in m.program:
            if code in (LD | W | ABS, LD | H | ABS, LD | B_ | ABS):
                name = _ancillary(k)
                if name is not None and name not in _TRANSLATED:
                    return (f"the classic BPF program's ancillary load of {name} is not "
                            f"supported by bpfilter")
        _offsets()
        return None

    def describe(self, m: CbpfMatch) -> str:
        # libxt_bpf's bpf_print_code() with -n
        return "match bpf " + ",".join(f"{code} {jt} {jf} {k}" for code, jt, jf, k in m.program)

    def emit(self, m: CbpfMatch, asm, out) -> None:
        """The program, A in R7, X in R8; R9 its answer (it returned non-zero)."""
        done, ret0, answer = asm.label("cbpf_done"), asm.label("cbpf_0"), asm.label("cbpf_answer")
        emit_skip_if_decided(asm, done)
        labels = [asm.label(f"cbpf_{pc}") for pc in range(len(m.program))]
        asm.emit(BPF_MOV64_IMM(R7, 0), BPF_MOV64_IMM(R8, 0))
        for pc, (code, jt, jf, k) in enumerate(m.program):
            asm.place(labels[pc])
            _emit_insn(asm, code, jt, jf, k, labels, pc, ret0, answer)
        asm.place(ret0)
        asm.emit(BPF_MOV64_IMM(R9, 0))
        asm.place(answer)
        emit_answer_and_hotdrop(asm, R9)
        asm.place(done)


def _emit_ret_a(asm, answer) -> None:
    nonzero = asm.label("cbpf_nonzero")
    asm.emit(BPF_MOV64_IMM(R9, 1), BPF_JMP32_IMM(I.BPF_JNE, R7, 0, nonzero), BPF_MOV64_IMM(R9, 0))
    asm.place(nonzero)
    asm.emit(BPF_JMP_A(answer))


def _emit_insn(asm, code, jt, jf, k, labels, pc, ret0, answer) -> None:
    cls = code & 0x07
    o = _offsets()
    if cls == RET:
        if code == RET | K:
            asm.emit(BPF_MOV64_IMM(R9, 1 if k else 0), BPF_JMP_A(answer))
        else:
            _emit_ret_a(asm, answer)
    elif cls == LD and code & 0xE0 in (ABS, IND):
        size = code & 0x18
        name = _ancillary(k) if code & 0xE0 == ABS else None
        if name is not None:
            _emit_ancillary(asm, name, o, answer)
        else:
            asm.emit(*BPF_LD_IMM64(R2, k) if code & 0xE0 == ABS else
                     [BPF_MOV32_REG(R2, R8), BPF_ALU32_IMM(I.BPF_ADD, R2, k)])
            _emit_load(asm, size, o, ret0)
            asm.emit(BPF_MOV32_REG(R7, R0))
    elif code == LDX | B_ | MSH:
        asm.emit(*BPF_LD_IMM64(R2, k))
        _emit_load(asm, B_, o, ret0)
        asm.emit(BPF_ALU32_IMM(I.BPF_AND, R0, 0xF), BPF_ALU32_IMM(I.BPF_LSH, R0, 2),
                 BPF_MOV32_REG(R8, R0))
    elif code in (LD | W | LEN, LDX | W | LEN):
        asm.emit(BPF_LDX_MEM(BPF_W, R7 if cls == LD else R8, R6, facts.LEN))
    elif code in (LD | IMM, LDX | IMM):
        asm.emit(BPF_MOV32_IMM(R7 if cls == LD else R8, k))
    elif code in (LD | MEM, LDX | MEM):
        asm.emit(BPF_LDX_MEM(BPF_W, R7 if cls == LD else R8, R6, _MEM + 4 * k))
    elif code in (ST, STX):
        asm.emit(BPF_STX_MEM(BPF_W, R6, R7 if code == ST else R8, _MEM + 4 * k))
    elif code == MISC | TAX:
        asm.emit(BPF_MOV32_REG(R8, R7))
    elif code == MISC | TXA:
        asm.emit(BPF_MOV32_REG(R7, R8))
    elif cls == ALU:
        _emit_alu(asm, code, k, ret0)
    elif cls == JMP:
        if code == JMP | JA:
            asm.emit(BPF_JMP_A(labels[pc + 1 + k]))
            return
        op = {JEQ: I.BPF_JEQ, JGT: I.BPF_JGT, JGE: I.BPF_JGE, JSET: I.BPF_JSET}[code & 0xF0]
        if code & X:
            asm.emit(BPF_JMP32_REG(op, R7, R8, labels[pc + 1 + jt]))
        else:
            asm.emit(BPF_JMP32_IMM(op, R7, k, labels[pc + 1 + jt]))
        asm.emit(BPF_JMP_A(labels[pc + 1 + jf]))


def _emit_alu(asm, code: int, k: int, ret0) -> None:
    op = code & 0xF0
    if op == NEG:
        asm.emit(BPF_ALU32_IMM(I.BPF_NEG, R7, 0))
        return
    bpf_op = {ADD: I.BPF_ADD, SUB: I.BPF_SUB, MUL: I.BPF_MUL, DIV: I.BPF_DIV, MOD: I.BPF_MOD,
              OR: I.BPF_OR, AND: I.BPF_AND, XOR: I.BPF_XOR, LSH: I.BPF_LSH, RSH: I.BPF_RSH}[op]
    if code & X:
        if op in (DIV, MOD):
            # the conversion's: X = 0 ends the program with 0
            asm.emit(BPF_JMP32_IMM(I.BPF_JEQ, R8, 0, ret0))
        asm.emit(BPF_ALU32_REG(bpf_op, R7, R8))
    else:
        asm.emit(BPF_ALU32_IMM(bpf_op, R7, k))


def _emit_ancillary(asm, name: str, o: dict, answer) -> None:
    """convert_bpf_extensions()'s loads into A."""
    if name == "protocol":
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_H, R7, R1, o["protocol"]),
                 BPF_ENDIAN(I.BPF_TO_BE, R7, 16))
    elif name == "mark":
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_W, R7, R1, o["mark"]))
    elif name == "alu_xor_x":
        asm.emit(BPF_ALU32_REG(I.BPF_XOR, R7, R8))
    elif name == "ifindex":
        # no device: the program ends, returning A
        have = asm.label("cbpf_dev")
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R1, R1, o["dev"]),
                 BPF_JMP_IMM(I.BPF_JNE, R1, 0, have))
        _emit_ret_a(asm, answer)
        asm.place(have)
        asm.emit(BPF_LDX_MEM(BPF_W, R7, R1, o["ifindex"]))
    else:
        raise AssertionError(name)     # refused by unsupported()


def _emit_load(asm, size: int, o: dict, ret0) -> None:
    """R0 = the big-endian value of `size` at the offset R2 (a u32 read as s32), as
    bpf_skb_load_helper_*() load it; to `ret0` where they fail."""
    nbytes, bpf_size = _SIZES[size]
    negative, loaded = asm.label("cbpf_negative"), asm.label("cbpf_loaded")
    asm.emit(BPF_JMP32_IMM(I.BPF_JSLT, R2, 0, negative),
             # skb_header_pointer(): within skb->len
             BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_MOV64_REG(R3, R2),
             BPF_ALU64_IMM(I.BPF_ADD, R3, nbytes), BPF_JMP_REG(I.BPF_JGT, R3, R1, ret0),
             BPF_MOV64_REG(R4, R2), BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _LOADED),
             BPF_MOV64_IMM(R2, nbytes),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_IMM(R5, 0), BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, ret0), BPF_JMP_A(loaded))
    asm.place(negative)
    # bpf_internal_load_pointer_neg_helper(): from the network or link-layer header,
    # within the linear data (skb->head .. skb_tail_pointer())
    ll, base_read = asm.label("cbpf_ll"), asm.label("cbpf_base")
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_MOV64_REG(R3, R2),
             BPF_JMP32_IMM(I.BPF_JSLT, R2, SKF_NET_OFF, ll),
             BPF_ALU32_IMM(I.BPF_SUB, R3, SKF_NET_OFF),
             BPF_LDX_MEM(BPF_H, R4, R1, o["network_header"]), BPF_JMP_A(base_read))
    asm.place(ll)
    asm.emit(BPF_JMP32_IMM(I.BPF_JSLT, R2, SKF_LL_OFF, ret0),
             BPF_ALU32_IMM(I.BPF_SUB, R3, SKF_LL_OFF),
             BPF_LDX_MEM(BPF_H, R4, R1, o["mac_header"]))
    asm.place(base_read)
    # R3 = the offset from the header, R4 = the header's from head
    asm.emit(BPF_ALU64_REG(I.BPF_ADD, R3, R4), BPF_MOV64_REG(R4, R3),
             BPF_ALU64_IMM(I.BPF_ADD, R4, nbytes),
             BPF_LDX_MEM(BPF_W, R5, R1, o["tail"]), BPF_JMP_REG(I.BPF_JGT, R4, R5, ret0),
             BPF_LDX_MEM(BPF_DW, R1, R1, o["head"]), BPF_ALU64_REG(I.BPF_ADD, R3, R1),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _LOADED),
             BPF_MOV64_IMM(R2, nbytes), BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, ret0))
    asm.place(loaded)
    asm.emit(BPF_LDX_MEM(bpf_size, R0, R6, _LOADED))
    if nbytes > 1:
        asm.emit(BPF_ENDIAN(I.BPF_TO_BE, R0, 8 * nbytes))


@register_match
class Cbpf0(_Cbpf):
    revision = 0
    struct = xt_bpf_info

    def decode(self, payload: bytes, where: str) -> CbpfMatch:
        return CbpfMatch(self.program_of(self.struct.parse(payload), where), 0)


@register_match
class Cbpf1(_Cbpf):
    revision = 1
    struct = xt_bpf_info_v1

    def decode(self, payload: bytes, where: str) -> CbpfMatch:
        p = self.struct.parse(payload)
        if p.mode != XT_BPF_MODE_BYTECODE:
            if p.mode not in (1, 2):
                raise BpfilterError(errno.EINVAL, f"{where}: bpf: unknown mode {p.mode}")
            return CbpfMatch((), 1, p.mode)
        return CbpfMatch(self.program_of(p, where), 1)

    def unsupported(self, m: CbpfMatch) -> Optional[str]:
        if m.mode != XT_BPF_MODE_BYTECODE:
            return "an eBPF program (--object-pinned) is not supported by bpfilter"
        return super().unsupported(m)
