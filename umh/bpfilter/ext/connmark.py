"""-m connmark (struct xt_connmark_mtinfo1, revision 1) and -j CONNMARK (struct
xt_connmark_tginfo1 and tginfo2: revisions 1 and 2), as net/netfilter/xt_connmark.c
has them.

The match reads the conntrack entry's mark, which the prologue copies into the
"ctmark" fact region (no entry: the match fails, whatever its `!`, as connmark_mt()
returns false). The target is bpfilter.ko's bpfilter_connmark(), which does what
connmark_tg_shift() does (--set-xmark, --save-mark, --restore-mark, with masks and
shifts) and returns what it wrote, so that later tests of the same traversal see it:
the entry's mark in the "ctmark" region, or, for --restore-mark, the packet's in MARK.
Both make the kernel turn conntrack on (their checkentry's nf_ct_netns_get()).
"""
from __future__ import annotations

import errno
import functools
from dataclasses import dataclass
from typing import Optional

from construct import Int8un, Int32ul, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_B, BPF_CALL_KFUNC, BPF_DW, BPF_EMIT_CALL, BPF_JMP_IMM,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, R0, R1, R2, R3, R4, R5, R6, R7, Kfunc)
from ..errors import BpfilterError
from ..model import ExtensionTarget, Match
from ..packet import facts
from ..packet.primitives import emit_masked_equal
from . import (BOTH_FAMILIES, MODULE, MatchExtension, TargetExtension, missing_kfunc,
               register_match, register_target, xt_invert)

CONNMARK_KFUNC = Kfunc("bpfilter_connmark", MODULE)
XT_CONNMARK_SET, XT_CONNMARK_SAVE, XT_CONNMARK_RESTORE = 0, 1, 2
D_SHIFT_RIGHT = 1
NFCT_PTRMASK = ~7

# The entry's mark as the prologue found it, and whether there is an entry.
CTMARK_REGION = facts.reserve("ctmark", 8)
CTMARK_PRESENT = CTMARK_REGION       # u8
CTMARK = CTMARK_REGION + 4           # u32
facts.READ_CONNTRACK.add("ctmark")


@functools.lru_cache(maxsize=1)
def _offsets() -> tuple[int, int]:
    """(skb->_nfct, nf_conn->mark), from vmlinux's BTF or nf_conntrack's."""
    for btf in (Btf.vmlinux, lambda: Btf.module("nf_conntrack")):
        try:
            b = btf()
            return b.member("sk_buff", "_nfct")[0], b.member("nf_conn", "mark")[0]
        except BtfError:
            continue
    raise BpfilterError(errno.EOPNOTSUPP, "connmark needs struct nf_conn's mark in the kernel's "
                                          "BTF (CONFIG_NF_CONNTRACK_MARK); the whole table is "
                                          "refused")


def _read_ctmark(asm, k: facts.KernelOffsets) -> None:
    """The prologue's part (R7 = skb): nf_ct_get(), then the entry's mark, read with
    bpf_probe_read_kernel() (nf_conn is not a type netfilter programs dereference)."""
    nfct, mark = _offsets()
    done = asm.label("ctmark_done")
    asm.emit(BPF_ST_MEM(BPF_B, R6, CTMARK_PRESENT, 0),
             BPF_LDX_MEM(BPF_DW, R3, R7, nfct), BPF_ALU64_IMM(I.BPF_AND, R3, NFCT_PTRMASK),
             BPF_JMP_IMM(I.BPF_JEQ, R3, 0, done),
             BPF_ALU64_IMM(I.BPF_ADD, R3, mark),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, CTMARK), BPF_MOV64_IMM(R2, 4),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, done),
             BPF_ST_MEM(BPF_B, R6, CTMARK_PRESENT, 1))
    asm.place(done)


facts.OPTIONAL["ctmark"] = _read_ctmark

xt_connmark_mtinfo1 = Struct("mark" / Int32ul, "mask" / Int32ul, "invert" / Int8un)


@dataclass(frozen=True)
class ConnmarkMatch(Match):
    mark: int
    mask: int
    invert: int
    name = "connmark"
    revision = 1


@register_match
class Connmark(MatchExtension):
    name = "connmark"
    revision = 1
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_connmark_mtinfo1
    facts = frozenset({"ctmark"})

    def decode(self, payload: bytes, where: str) -> ConnmarkMatch:
        mark, mask, invert = self.packed.unpack_from(payload)   # checkentry: conntrack only
        return ConnmarkMatch(mark, mask, invert)

    def unsupported(self, m: ConnmarkMatch) -> Optional[str]:
        _offsets()
        return None

    def describe(self, m: ConnmarkMatch) -> str:
        value = f"0x{m.mark:x}" if m.mask == 0xFFFFFFFF else f"0x{m.mark:x}/0x{m.mask:x}"
        return f"connmark match {'! ' if m.invert else ' '}{value}"

    def emit(self, m: ConnmarkMatch, asm, out) -> None:
        # no entry: no match, whatever the `!`
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, CTMARK_PRESENT), BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
        out.mismatch(R1)
        invert = xt_invert(m.invert)
        if invert is not None:
            emit_masked_equal(asm, CTMARK, 4, m.mask, m.mark, invert, out)


xt_connmark_tginfo1 = Struct("ctmark" / Int32ul, "ctmask" / Int32ul, "nfmask" / Int32ul,
                             "mode" / Int8un, Padding(3))
xt_connmark_tginfo2 = Struct("ctmark" / Int32ul, "ctmask" / Int32ul, "nfmask" / Int32ul,
                             "shift_dir" / Int8un, "shift_bits" / Int8un, "mode" / Int8un,
                             Padding(1))


@dataclass(frozen=True, kw_only=True)
class ConnmarkTarget(ExtensionTarget):
    name: str = "CONNMARK"
    revision: int
    ctmark: int
    ctmask: int
    nfmask: int
    mode: int
    shift_dir: int = 0
    shift_bits: int = 0


class _Connmark(TargetExtension):
    name = "CONNMARK"
    families = BOTH_FAMILIES
    family_independent = True
    # what later tests read: the entry's mark, the packet's
    facts = frozenset({"skb", "ctmark", "mark"})

    def unsupported(self, target: ConnmarkTarget) -> Optional[str]:
        missing = missing_kfunc(CONNMARK_KFUNC)
        if missing:
            return (f"needs bpfilter.ko (kernel module mode) to write the connection's or the "
                    f"packet's mark: a netfilter BPF program cannot ({missing})")
        _offsets()
        return None

    def describe(self, t: ConnmarkTarget) -> str:
        """As libxt_CONNMARK's connmark_tg_print_v2() prints it."""
        full = 0xFFFFFFFF
        if t.mode == XT_CONNMARK_SET:
            if t.ctmark == 0:
                words = f"CONNMARK and 0x{~t.ctmask & full:x}"
            elif t.ctmark == t.ctmask:
                words = f"CONNMARK or 0x{t.ctmark:x}"
            elif t.ctmask == 0:
                words = f"CONNMARK xor 0x{t.ctmark:x}"
            elif t.ctmask == full:
                words = f"CONNMARK set 0x{t.ctmark:x}"
            else:
                words = f"CONNMARK xset 0x{t.ctmark:x}/0x{t.ctmask:x}"
        elif t.mode in (XT_CONNMARK_SAVE, XT_CONNMARK_RESTORE):
            # each names first the mask it reads from
            (verb, first, first_mask, second, second_mask) = \
                ("save", "nfmask", t.nfmask, "ctmask", t.ctmask) if t.mode == XT_CONNMARK_SAVE \
                else ("restore", "ctmask", t.ctmask, "nfmask", t.nfmask)
            if t.nfmask == full and t.ctmask == full:
                words = f"CONNMARK {verb}"
            elif t.nfmask == t.ctmask:
                words = f"CONNMARK {verb} mask 0x{first_mask:x}"
            else:
                words = f"CONNMARK {verb} {first} 0x{first_mask:x} {second} ~0x{second_mask:x}"
        else:
            return "ERROR: UNKNOWN CONNMARK MODE"
        if t.shift_bits:
            side = "right" if t.shift_dir == D_SHIFT_RIGHT else "left"
            words += f" {side}-shift-mark {t.shift_bits}"
        return words

    def emit(self, t: ConnmarkTarget, asm, next_rule) -> None:
        done = asm.label("connmark_done")
        how = t.mode | t.shift_dir << 8 | t.shift_bits << 16
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB),
                 BPF_MOV64_IMM(R2, t.ctmark), BPF_MOV64_IMM(R3, t.ctmask),
                 BPF_MOV64_IMM(R4, t.nfmask), BPF_MOV64_IMM(R5, how),
                 BPF_CALL_KFUNC(CONNMARK_KFUNC),
                 BPF_MOV64_REG(R1, R0), BPF_ALU64_IMM(I.BPF_RSH, R1, 32),
                 BPF_JMP_IMM(I.BPF_JEQ, R1, 0, done),
                 BPF_STX_MEM(BPF_W, R6, R0,
                             facts.MARK if t.mode == XT_CONNMARK_RESTORE else CTMARK))
        asm.place(done)


@register_target
class Connmark1(_Connmark):
    revision = 1
    struct = xt_connmark_tginfo1

    def decode(self, payload: bytes, ip, where: str) -> ConnmarkTarget:
        ctmark, ctmask, nfmask, mode = self.packed.unpack_from(payload)
        return ConnmarkTarget(revision=1, ctmark=ctmark, ctmask=ctmask, nfmask=nfmask, mode=mode)


@register_target
class Connmark2(_Connmark):
    revision = 2
    struct = xt_connmark_tginfo2

    def decode(self, payload: bytes, ip, where: str) -> ConnmarkTarget:
        ctmark, ctmask, nfmask, shift_dir, shift_bits, mode = self.packed.unpack_from(payload)
        # connmark_tg_check_v2()
        if shift_dir > D_SHIFT_RIGHT or shift_bits >= 32:
            raise BpfilterError(errno.EINVAL, f"{where}: CONNMARK: shift {shift_dir}/"
                                              f"{shift_bits} out of range")
        return ConnmarkTarget(revision=2, ctmark=ctmark, ctmask=ctmask, nfmask=nfmask,
                              mode=mode, shift_dir=shift_dir, shift_bits=shift_bits)
