"""eBPF disassembly in the text of the kernel's verifier log and `bpftool prog dump
xlated` (kernel/bpf/disasm.c), so that what `bpfilter show --bpf` prints can be held
side by side with either.

It reads code as the kernel hands it back (BPF_OBJ_GET_INFO_BY_FD's xlated_prog_insns),
which differs from what was loaded:
  * a 64-bit immediate that was a map fd holds the map's id (src_reg 1, shown as
    `map[id:N]`) or the id and an offset into its value (src_reg 2); our own pre-load
    code has an fd in the same place;
  * helper and kfunc calls hold the target's address minus __bpf_call_base, which
    only /proc/kallsyms can name (see Kallsyms); without it they print as the verifier
    does, `unknown#imm` and `kernel-function#imm`;
  * a bpf-to-bpf call has its relative target in `off` and the subprogram's index in
    `imm`, where the loaded form (off is then required to be 0) has it in `imm`.
A 64-bit immediate prints as bpftool prints it (`r3 = 0x6f6c`, no llvm-objdump ` ll`).
Unlike bpftool, a bpf-to-bpf call is not suffixed with the JITed subprogram's symbol
(`call pc+55`, not `call pc+55#bpf_prog_<tag>_F`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

from . import insn as I
from .insn import Insn, decode

_BPF_MEMSX = 0x80
_BPF_NOSPEC = 0xC0       # BPF_ST | BPF_NOSPEC: the verifier's speculation barrier
_BPF_JCOND = 0xE0        # may_goto
_BPF_FETCH = 0x01
_BPF_XCHG = 0xE0 | _BPF_FETCH
_BPF_CMPXCHG = 0xF0 | _BPF_FETCH
_BPF_LOAD_ACQ = 0x100
_BPF_STORE_REL = 0x110
_BPF_PSEUDO_MAP_IDX_VALUE = 6
_BPF_PSEUDO_FUNC = 4
_BPF_ADDR_SPACE_CAST = 1
_BPF_ADDR_PERCPU = -1

_ALU = {I.BPF_ADD: "+=", I.BPF_SUB: "-=", I.BPF_MUL: "*=", I.BPF_DIV: "/=", I.BPF_OR: "|=",
        I.BPF_AND: "&=", I.BPF_LSH: "<<=", I.BPF_RSH: ">>=", I.BPF_MOD: "%=", I.BPF_XOR: "^=",
        I.BPF_MOV: "=", I.BPF_ARSH: "s>>="}
_ALU_SIGNED = {I.BPF_DIV: "s/=", I.BPF_MOD: "s%="}          # when off == 1
_MOVSX = {8: "(s8)", 16: "(s16)", 32: "(s32)"}              # off of a sign-extending mov
_JMP = {I.BPF_JEQ: "==", I.BPF_JGT: ">", I.BPF_JLT: "<", I.BPF_JGE: ">=", I.BPF_JLE: "<=",
        I.BPF_JSET: "&", I.BPF_JNE: "!=", I.BPF_JSGT: "s>", I.BPF_JSLT: "s<",
        I.BPF_JSGE: "s>=", I.BPF_JSLE: "s<="}
_SIZE = {I.BPF_W: "u32", I.BPF_H: "u16", I.BPF_B: "u8", I.BPF_DW: "u64"}
_SIZE_SIGNED = {I.BPF_W: "s32", I.BPF_H: "s16", I.BPF_B: "s8"}
_ATOMIC_ALU = {I.BPF_ADD: "add", I.BPF_AND: "and", I.BPF_OR: "or", I.BPF_XOR: "xor"}


class _Unknown(Exception):
    """Raised by the formatters for an encoding the kernel would not accept."""


class Kallsyms:
    """Kernel symbols by address, to name the helpers and kfuncs of translated code
    the way bpftool does (an exact address match, else no name)."""

    def __init__(self, names: dict[int, str]):
        self._names = names
        self._call_base = next((a for a, n in names.items() if n == "__bpf_call_base"), None)

    @classmethod
    def read(cls, path: str = "/proc/kallsyms") -> "Kallsyms":
        names: dict[int, str] = {}
        with open(path) as f:
            for line in f:
                address, _type, name = line.split()[:3]
                names.setdefault(int(address, 16), name)
        return cls(names)

    def call_target(self, imm: int) -> Optional[str]:
        """Addresses read as zero without CAP_SYSLOG; nothing is named then."""
        if not self._call_base:
            return None
        return self._names.get(self._call_base + imm)


@lru_cache(maxsize=1)
def _helper_names() -> dict[int, str]:
    # The running kernel's enum bpf_func_id, spelled like its func_id_str[].
    from .btf import Btf
    btf = Btf.vmlinux()
    (type_id,) = [t for t in btf.ids("bpf_func_id") if btf.kind(t) == "enum"]
    return {value: "bpf_" + name[len("BPF_FUNC_"):]
            for name, value in btf.enumerators(type_id).items() if name.startswith("BPF_FUNC_")}


def _reg(klass: int, n: int) -> str:
    return f"{'w' if klass in (I.BPF_ALU, I.BPF_JMP32) else 'r'}{n}"


def _where(size: int, reg: int, off: int, sizes=_SIZE) -> str:
    if size not in sizes:
        raise _Unknown
    return f"({sizes[size]} *)(r{reg} {off:+d})"


def _mem(size: int, reg: int, off: int, sizes=_SIZE) -> str:
    return "*" + _where(size, reg, off, sizes)


def _alu(ins: Insn) -> str:
    klass, op, src = ins.klass, ins.op, ins.code & 0x08
    dst = _reg(klass, ins.dst)
    if op == I.BPF_END:
        if klass == I.BPF_ALU64:
            if src:
                raise _Unknown
            return f"r{ins.dst} = bswap{ins.imm} r{ins.dst}"
        return f"r{ins.dst} = {'be' if src == I.BPF_TO_BE else 'le'}{ins.imm} r{ins.dst}"
    if op == I.BPF_NEG:
        if src:
            raise _Unknown
        return f"{dst} = -{dst}"
    if op not in _ALU:
        raise _Unknown
    text = _ALU_SIGNED[op] if op in _ALU_SIGNED and ins.off == 1 else _ALU[op]
    if src == I.BPF_K:
        return f"{dst} {text} {ins.imm}"
    if klass == I.BPF_ALU64 and op == I.BPF_MOV:
        if ins.off == _BPF_ADDR_SPACE_CAST:
            imm = ins.imm & 0xFFFFFFFF
            return f"r{ins.dst} = addr_space_cast(r{ins.src}, {imm >> 16}, {imm & 0xFFFF})"
        if ins.off == _BPF_ADDR_PERCPU:
            return f"r{ins.dst} = &(void __percpu *)(r{ins.src})"
    movsx = _MOVSX.get(ins.off, "") if op == I.BPF_MOV else ""
    return f"{dst} {text} {movsx}{_reg(klass, ins.src)}"


def _atomic(ins: Insn) -> str:
    size = ins.code & 0x18
    where = _where(size, ins.dst, ins.off)
    bits = "64" if size == I.BPF_DW else ""
    if ins.imm in _ATOMIC_ALU:
        return f"lock {_mem(size, ins.dst, ins.off)} {_ALU[ins.imm]} r{ins.src}"
    if ins.imm & ~_BPF_FETCH in _ATOMIC_ALU:
        return (f"r{ins.src} = atomic{bits}_fetch_{_ATOMIC_ALU[ins.imm & ~_BPF_FETCH]}"
                f"({where}, r{ins.src})")
    if ins.imm == _BPF_XCHG:
        return f"r{ins.src} = atomic{bits}_xchg({where}, r{ins.src})"
    if ins.imm == _BPF_CMPXCHG:
        return f"r0 = atomic{bits}_cmpxchg({where}, r0, r{ins.src})"
    if ins.imm == _BPF_LOAD_ACQ:
        return f"r{ins.dst} = load_acquire({_where(size, ins.src, ins.off)})"
    if ins.imm == _BPF_STORE_REL:
        return f"store_release({where}, r{ins.src})"
    raise _Unknown


def _call(ins: Insn, kallsyms: Optional[Kallsyms]) -> str:
    if ins.src == I.BPF_PSEUDO_CALL:
        return f"call pc{ins.off or ins.imm:+d}"
    name = _helper_names().get(ins.imm) if ins.src == 0 else None
    if name is None and kallsyms is not None:
        name = kallsyms.call_target(ins.imm)
    if name is None:
        name = "kernel-function" if ins.src == I.BPF_PSEUDO_KFUNC_CALL else "unknown"
    return f"call {name}#{ins.imm}"


def _jump(ins: Insn, kallsyms: Optional[Kallsyms]) -> str:
    klass, op = ins.klass, ins.op
    if klass == I.BPF_JMP and ins.code & 0x08 == I.BPF_K:
        if op == I.BPF_CALL:
            return _call(ins, kallsyms)
        if op == I.BPF_EXIT:
            return "exit"
        if op == I.BPF_JA:
            return f"goto pc{ins.off:+d}"
        if op == _BPF_JCOND and ins.src == 0:
            return f"may_goto pc{ins.off:+d}"
    if ins.code == I.BPF_JMP32 | I.BPF_JA:
        return f"gotol pc{ins.imm:+d}"
    if op not in _JMP:
        raise _Unknown
    operand = _reg(klass, ins.src) if ins.code & 0x08 else f"0x{ins.imm & 0xFFFFFFFF:x}"
    return f"if {_reg(klass, ins.dst)} {_JMP[op]} {operand} goto pc{ins.off:+d}"


def _ld_imm64(ins: Insn, high: Insn) -> str:
    if ins.src == I.BPF_PSEUDO_MAP_FD:
        value = f"map[id:{ins.imm & 0xFFFFFFFF}]"
    elif ins.src == I.BPF_PSEUDO_MAP_VALUE:
        value = f"map[id:{ins.imm & 0xFFFFFFFF}][0]+{high.imm & 0xFFFFFFFF}"
    elif ins.src == _BPF_PSEUDO_MAP_IDX_VALUE:
        value = f"map[idx:{ins.imm & 0xFFFFFFFF}]+{high.imm & 0xFFFFFFFF}"
    elif ins.src == _BPF_PSEUDO_FUNC:
        value = f"subprog[{ins.imm:+d}]"
    else:
        value = f"0x{(high.imm & 0xFFFFFFFF) << 32 | ins.imm & 0xFFFFFFFF:x}"
    return f"r{ins.dst} = {value}"


def _text(ins: Insn, kallsyms: Optional[Kallsyms]) -> str:
    klass, mode, size = ins.klass, ins.code & 0xE0, ins.code & 0x18
    if klass in (I.BPF_ALU, I.BPF_ALU64):
        return _alu(ins)
    if klass in (I.BPF_JMP, I.BPF_JMP32):
        return _jump(ins, kallsyms)
    if klass == I.BPF_LDX and mode in (I.BPF_MEM, _BPF_MEMSX):
        sizes = _SIZE if mode == I.BPF_MEM else _SIZE_SIGNED
        return f"r{ins.dst} = {_mem(size, ins.src, ins.off, sizes)}"
    if klass == I.BPF_STX and mode == I.BPF_MEM:
        return f"{_mem(size, ins.dst, ins.off)} = r{ins.src}"
    if klass == I.BPF_STX and mode == I.BPF_ATOMIC:
        return _atomic(ins)
    if klass == I.BPF_ST and mode == I.BPF_MEM:
        return f"{_mem(size, ins.dst, ins.off)} = {ins.imm}"
    if ins.code == I.BPF_ST | _BPF_NOSPEC:
        return "nospec"
    if klass == I.BPF_LD and mode == I.BPF_ABS and size in _SIZE:
        return f"r0 = *({_SIZE[size]} *)skb[{ins.imm}]"
    if klass == I.BPF_LD and mode == I.BPF_IND and size in _SIZE:
        return f"r0 = *({_SIZE[size]} *)skb[r{ins.src} + {ins.imm}]"
    raise _Unknown


def disassemble(insns: bytes, kallsyms: Optional[Kallsyms] = None) -> list[str]:
    """One line per instruction, `  12: (61) r1 = *(u32 *)(r6 +40)` as bpftool prints
    them; the second half of a 64-bit immediate load gets no line of its own, and an
    encoding the kernel would refuse prints as `.insn 0x<its 8 bytes>`."""
    code = decode(insns)
    lines = []
    pos = 0
    while pos < len(code):
        ins = code[pos]
        width = 1
        try:
            if ins.code == I.BPF_LD | I.BPF_DW | I.BPF_IMM:
                if pos + 1 >= len(code):
                    raise _Unknown
                text, width = _ld_imm64(ins, code[pos + 1]), 2
            else:
                text = _text(ins, kallsyms)
            line = f"({ins.code:02x}) {text}"
        except _Unknown:
            line = f".insn 0x{insns[pos * 8:pos * 8 + 8].hex()}"
        lines.append(f"{pos: 4d}: {line}")
        pos += width
    return lines
