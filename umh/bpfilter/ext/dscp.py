"""-m dscp, -m tos (xt_dscp.c), pure BPF, and -j DSCP, -j TOS (xt_DSCP.c), the
kernel's own run by bpfilter.ko (ext/xtmatch.py; mangle table only: they rewrite the
DS field with the checksum update the kernel makes).

The matches read the DS field from the packet as each rule meets it, not from a fact
read once: a DSCP or TOS target of an earlier rule has rewritten it by then, and the
kernel's match sees what it wrote. IPv4's is the tos byte; IPv6's is the traffic
class, ipv6_get_dsfield(): the 4 bits after the version and the 4 before the flow
label."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_B, BPF_ENDIAN, BPF_H, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_STX_MEM, R1, R6, R7)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet.primitives import emit_masked_equal
from . import BOTH_FAMILIES, MatchExtension, register_match
from .exthdr import BUF, READS, emit_read
from .xtmatch import plain_kernel_extension

XT_DSCP_SHIFT, XT_DSCP_MAX = 2, 0x3F
DSFIELD = BUF + 2      # where emit_dsfield() leaves the DS field, a byte

xt_dscp_info = Struct("dscp" / Int8un, "invert" / Int8un)
xt_tos_match_info = Struct("tos_mask" / Int8un, "tos_value" / Int8un, "invert" / Int8un)
xt_DSCP_info = Struct("dscp" / Int8un)
xt_tos_target_info = Struct("tos_value" / Int8un, "tos_mask" / Int8un)


def _ipv4_dsfield(asm) -> None:
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, BUF + 1))


def _ipv6_dsfield(asm) -> None:
    asm.emit(BPF_LDX_MEM(BPF_H, R1, R6, BUF), BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
             BPF_ALU64_IMM(I.BPF_RSH, R1, 4), BPF_ALU64_IMM(I.BPF_AND, R1, 0xFF))


_DSFIELD = {Family.IPV4: _ipv4_dsfield, Family.IPV6: _ipv6_dsfield}


def emit_dsfield(asm, family: Family, out) -> None:
    """DSFIELD = the packet's DS field as it is now (the network header's first two
    bytes, which every packet at a netfilter hook has)."""
    asm.emit(BPF_MOV64_IMM(R7, 0))
    emit_read(asm, 0, 2, out)
    _DSFIELD[family](asm)
    asm.emit(BPF_STX_MEM(BPF_B, R6, R1, DSFIELD))


@dataclass(frozen=True)
class DsMatch(Match):
    """(DS field & mask) == value, inverted by any nonzero invert byte (`^ !!invert`)."""
    mask: int
    value: int
    invert: int
    name = "dscp"
    revision = 0


@dataclass(frozen=True)
class TosMatch(DsMatch):
    name = "tos"
    revision = 1


class _DsFieldMatch(MatchExtension):
    families = BOTH_FAMILIES
    facts = READS

    def emit(self, m: DsMatch, asm, out) -> None:
        emit_dsfield(asm, self.family, out)
        emit_masked_equal(asm, DSFIELD, 1, m.mask, m.value, bool(m.invert), out)


@register_match
class Dscp(_DsFieldMatch):
    name = "dscp"
    struct = xt_dscp_info

    def decode(self, payload: bytes, where: str) -> DsMatch:
        dscp, invert = self.packed.unpack_from(payload)
        if dscp > XT_DSCP_MAX:      # dscp_mt_check()
            raise BpfilterError(errno.EDOM, f"{where}: dscp: {dscp:#x} out of range")
        return DsMatch(XT_DSCP_MAX << XT_DSCP_SHIFT, dscp << XT_DSCP_SHIFT, invert)

    def describe(self, m: DsMatch) -> str:
        return f"DSCP match {'!' if m.invert else ''}0x{m.value >> XT_DSCP_SHIFT:02x}"


@register_match
class Tos(_DsFieldMatch):
    name = "tos"
    revision = 1
    struct = xt_tos_match_info

    def decode(self, payload: bytes, where: str) -> TosMatch:
        # no checkentry: a value with bits outside the mask never matches
        mask, value, invert = self.packed.unpack_from(payload)
        return TosMatch(mask, value, invert)

    def describe(self, m: TosMatch) -> str:
        return f"tos match{'!' if m.invert else ''}0x{m.value:02x}/0x{m.mask:02x}"


plain_kernel_extension("target", "DSCP", xt_DSCP_info, BOTH_FAMILIES, table="mangle",
                       describe=lambda f: f"DSCP set 0x{f['dscp']:02x}")
plain_kernel_extension("target", "TOS", xt_tos_target_info, BOTH_FAMILIES, revisions=(1,),
                       table="mangle", describe=lambda f: f"TOS set "
                       f"0x{f['tos_value']:02x}/0x{f['tos_mask']:02x}")
