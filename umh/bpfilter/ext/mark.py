"""-m mark: --mark VALUE[/MASK] (struct xt_mark_mtinfo1, revision 1), -j MARK, and
-j HMARK (the kernel's own: its hash of the packet's or its connection's tuple)."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Int8un, Int16ul, Int32ul, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU32_IMM, BPF_CALL_KFUNC, BPF_DW, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_STX_MEM, BPF_W, R1, R2, R3, R6, R7, Kfunc)
from ..packet import facts
from ..packet.primitives import emit_masked_equal
from ..model import ExtensionTarget, Match
from . import (BOTH_FAMILIES, MODULE, MatchExtension, TargetExtension, missing_kfunc,
               register_match, register_target, xt_invert)
from .xtmatch import plain_kernel_extension

xt_mark_mtinfo1 = Struct(
    "mark" / Int32ul,
    "mask" / Int32ul,
    "invert" / Int8un,
)


@dataclass(frozen=True)
class MarkMatch(Match):
    mark: int
    mask: int
    invert: int    # the raw byte: the kernel xors it into a bool (see xt_invert)
    name = "mark"
    revision = 1


def _read_mark(asm, k: facts.KernelOffsets) -> None:
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R7, k.skb_mark), BPF_STX_MEM(BPF_W, R6, R1, facts.MARK))


facts.OPTIONAL["mark"] = _read_mark


@register_match
class Mark(MatchExtension):
    name = "mark"
    families = BOTH_FAMILIES
    revision = 1
    family_independent = True
    struct = xt_mark_mtinfo1
    facts = frozenset({"mark"})

    def decode(self, payload: bytes, where: str) -> MarkMatch:
        # mark_mt() has no checkentry: every payload of the right size is valid
        mark, mask, invert = self.packed.unpack_from(payload)
        return MarkMatch(mark, mask, invert)

    def emit(self, match: MarkMatch, asm, out) -> None:
        invert = xt_invert(match.invert)
        if invert is not None:
            emit_masked_equal(asm, facts.MARK, 4, match.mask, match.mark, invert, out)

    def describe(self, match: MarkMatch) -> str:
        bang = " !" if match.invert else ""
        value = f"0x{match.mark:x}" if match.mask == 0xFFFFFFFF else \
            f"0x{match.mark:x}/0x{match.mask:x}"
        return f"mark match{bang} {value}"


# -j MARK (struct xt_mark_tginfo2, revision 2, every table since Linux 5.x):
# mark_tg() sets skb->mark = (skb->mark & ~mask) ^ mark and goes on to the next rule.
# A netfilter program may read skb->mark but not write it: bpfilter.ko's kfunc does.
SET_MARK_KFUNC = Kfunc("bpfilter_set_mark", MODULE)

xt_mark_tginfo2 = Struct(
    "mark" / Int32ul,
    "mask" / Int32ul,
)


@dataclass(frozen=True)
class MarkTarget(ExtensionTarget):
    mark: int
    mask: int
    name = "MARK"
    revision = 2


@register_target
class SetMark(TargetExtension):
    name = "MARK"
    families = BOTH_FAMILIES
    revision = 2
    family_independent = True
    struct = xt_mark_tginfo2
    # the mark the next rules' `-m mark` read is the one written here
    facts = frozenset({"skb", "mark"})

    def decode(self, payload: bytes, ip, where: str) -> MarkTarget:
        mark, mask = self.packed.unpack_from(payload)   # no checkentry
        return MarkTarget(mark, mask)

    def unsupported(self, target: MarkTarget) -> "str | None":
        missing = missing_kfunc(SET_MARK_KFUNC)
        if missing:
            return (f"needs bpfilter.ko (kernel module mode) to write the packet's mark: a "
                    f"netfilter BPF program cannot ({missing})")
        return None

    def describe(self, target: MarkTarget) -> str:
        # libxt_MARK's mark_tg_print(): the or/and/xor spellings of set-xmark
        mark, mask = target.mark, target.mask
        if mark == mask:
            return f"MARK or 0x{mark:x}"
        if mark == 0:
            return f"MARK and 0x{~mask & 0xFFFFFFFF:x}"
        if mask == 0:
            return f"MARK xor 0x{mark:x}"
        if mask == 0xFFFFFFFF:
            return f"MARK set 0x{mark:x}"
        return f"MARK xset 0x{mark:x}/0x{mask:x}"

    def emit(self, target: MarkTarget, asm, next_rule) -> None:
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB),
                 # u32 immediates: Insn.encode() keeps their low 32 bits
                 BPF_MOV64_IMM(R2, target.mark), BPF_MOV64_IMM(R3, target.mask),
                 BPF_CALL_KFUNC(SET_MARK_KFUNC),
                 BPF_LDX_MEM(BPF_W, R1, R6, facts.MARK),
                 BPF_ALU32_IMM(I.BPF_AND, R1, ~target.mask & 0xFFFFFFFF),
                 BPF_ALU32_IMM(I.BPF_XOR, R1, target.mark),
                 BPF_STX_MEM(BPF_W, R6, R1, facts.MARK))



# -j HMARK (struct xt_hmark_info, revision 0): hmark_tg_v4/v6 write the mark from
# their hash; the kernel's own, run by bpfilter.ko (ext/xtmatch.py). The next rules'
# `-m mark` read what it wrote.
xt_hmark_info = Struct("src_mask" / Bytes(16), "dst_mask" / Bytes(16), "port_mask" / Int32ul,
                       "port_set" / Int32ul, "flags" / Int32ul, "proto_mask" / Int16ul,
                       Padding(2), "hashrnd" / Int32ul, "hmodulus" / Int32ul,
                       "hoffset" / Int32ul)


def _reread_mark(self, target, asm) -> None:
    skb_mark = Btf.vmlinux().member("sk_buff", "mark")[0]
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_W, R1, R1, skb_mark),
             BPF_STX_MEM(BPF_W, R6, R1, facts.MARK))


plain_kernel_extension("target", "HMARK", xt_hmark_info, BOTH_FAMILIES,
                       facts=frozenset({"skb", "nf_state", "xt_match", "mark"}),
                       refresh=_reread_mark,
                       describe=lambda f: f"HMARK mod {f['hmodulus']} + 0x{f['hoffset']:x}")
