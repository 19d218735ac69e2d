"""-m mac: --mac-source ADDR (struct xt_mac_info, revision 0)."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Int32sl, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_H,
                        BPF_JMP_IMM, BPF_JMP_REG, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG,
                        BPF_ST_MEM, R0, R1, R2, R3, R4, R6, R7)
from ..packet import facts
from ..packet.primitives import emit_masked_equal, emit_name_equal
from ..model import Hook, Match
from . import BOTH_FAMILIES, MatchExtension, register_match, xt_invert

ETH_ALEN, ETH_HLEN = 6, 14
ARPHRD_ETHER = 1

xt_mac_info = Struct(
    "srcaddr" / Bytes(ETH_ALEN),
    Padding(2),
    "invert" / Int32sl,
)


@dataclass(frozen=True)
class MacMatch(Match):
    srcaddr: bytes
    invert: int    # raw, see xt_invert
    name = "mac"
    revision = 0


def _read_mac(asm, k: facts.KernelOffsets) -> None:
    """MAC_OK and MAC_SRC as mac_mt() sees them: only for an Ethernet skb->dev, and
    only when the whole Ethernet header lies between skb->head and skb->data. The
    header is before the data the skb dynptr covers, hence the kernel read."""
    done = asm.label("mac_done")
    asm.emit(
        BPF_LDX_MEM(BPF_DW, R1, R7, k.skb_dev),
        BPF_JMP_IMM(I.BPF_JEQ, R1, 0, done),
        BPF_LDX_MEM(BPF_H, R1, R1, k.dev_type),
        BPF_JMP_IMM(I.BPF_JNE, R1, ARPHRD_ETHER, done),
        # head + mac_header + ETH_HLEN <= data; mac_header is a u16 offset from head,
        # so the kernel's other test (head + mac_header >= head) always holds
        BPF_LDX_MEM(BPF_H, R2, R7, k.skb_mac_header),
        BPF_LDX_MEM(BPF_DW, R3, R7, k.skb_head),
        BPF_LDX_MEM(BPF_DW, R4, R7, k.skb_data),
        BPF_ALU64_REG(I.BPF_SUB, R4, R3),
        BPF_MOV64_REG(R1, R2), BPF_ALU64_IMM(I.BPF_ADD, R1, ETH_HLEN),
        BPF_JMP_REG(I.BPF_JGT, R1, R4, done),
        BPF_ALU64_REG(I.BPF_ADD, R3, R2),
        BPF_ALU64_IMM(I.BPF_ADD, R3, ETH_ALEN),          # h_source follows h_dest
        BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, facts.MAC_SRC),
        BPF_MOV64_IMM(R2, ETH_ALEN),
        BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
        BPF_JMP_IMM(I.BPF_JNE, R0, 0, done),
        BPF_ST_MEM(BPF_B, R6, facts.MAC_OK, 1),
    )
    asm.place(done)


facts.OPTIONAL["mac"] = _read_mac


@register_match
class Mac(MatchExtension):
    name = "mac"
    families = BOTH_FAMILIES
    struct = xt_mac_info
    hooks = (1 << Hook.PRE_ROUTING) | (1 << Hook.LOCAL_IN) | (1 << Hook.FORWARD)
    facts = frozenset({"mac"})

    def decode(self, payload: bytes, where: str) -> MacMatch:
        srcaddr, invert = self.packed.unpack_from(payload)
        return MacMatch(srcaddr, invert)

    def emit(self, match: MacMatch, asm, out) -> None:
        # Without a readable Ethernet header the match fails, whatever the inversion.
        emit_masked_equal(asm, facts.MAC_OK, 1, 0xFF, 1, False, out)
        invert = xt_invert(match.invert)
        if invert is not None:
            emit_name_equal(asm, facts.MAC_SRC, match.srcaddr + bytes(2),
                            b"\xff" * ETH_ALEN + bytes(2), invert, out)

    def describe(self, match: MacMatch) -> str:
        bang = " !" if match.invert else ""
        return f"MAC{bang} " + ":".join(f"{b:02x}" for b in match.srcaddr)
