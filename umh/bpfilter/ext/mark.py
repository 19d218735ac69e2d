"""-m mark: --mark VALUE[/MASK] (struct xt_mark_mtinfo1, revision 1)."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Int8un, Int32ul, Struct

from ..bpf.insn import BPF_LDX_MEM, BPF_STX_MEM, BPF_W, R1, R6, R7
from ..packet import facts
from ..packet.primitives import emit_masked_equal
from ..model import Match
from . import BOTH_FAMILIES, MatchExtension, register_match, xt_invert

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
