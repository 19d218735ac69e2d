"""-p dccp -m dccp: --sport, --dport, --dccp-types, --dccp-option (struct xt_dccp_info,
net/netfilter/xt_dccp.c, both families, xt_match.proto = IPPROTO_DCCP).

dccp_mt(): a fragment other than the first never matches; the 12 bytes of struct
dccp_hdr at par->thoff read (else hotdrop); then, each only if its flag is set and
in this order, stopping at the first that fails (DCCHECK): the source port range, the
destination port range, the type (typemask & 1 << type), and whether the option walk
steps on an option of the given kind. The walk (dccp_find_option()) starts after the
header's fixed part (__dccp_hdr_len(): 12 bytes, 4 more with the X bit, and the
type's own part) and ends at the data offset (dccph_doff words); a data offset short
of the fixed part, or options the packet does not hold, make the match drop the packet
(hotdrop).

The walk depends on the packet alone, not on the kind a rule asks for, so the
prologue (fact group "dccp") walks once and notes every kind it steps on in a 256-bit
set; each rule tests its kind's bit. An option kind below 2 is one byte long, any
other as long as its length byte says (0 counting as 1).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int16un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL,
                        BPF_EXIT_INSN, BPF_H, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_FUNC,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, R0, R1, R2, R3, R4, R5, R6, R7, R8)
from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from ..packet.primitives import emit_masked_equal
from . import BOTH_FAMILIES, MatchExtension, register_match
from .exthdr import BUF, READS
from .ports import (PortRange, describe_flagged, emit_header_ports, flagged_ports,
                    holds_and_drops)

IPPROTO_DCCP = 33
DCCP_HEADER = 12                # sizeof(struct dccp_hdr)
XT_DCCP_SRC_PORTS, XT_DCCP_DEST_PORTS, XT_DCCP_TYPE, XT_DCCP_OPTION = 0x01, 0x02, 0x04, 0x08
XT_DCCP_VALID_FLAGS = 0x0F

xt_dccp_info = Struct(
    "dpts" / Int16un[2],
    "spts" / Int16un[2],
    "flags" / Int16un,
    "invflags" / Int16un,
    "typemask" / Int16un,
    "option" / Int8un,
    Padding(1),
)

# dccp_packet_hdr_len(): what follows the basic header, by type (DATA: nothing;
# DATAACK, ACK, SYNC, SYNCACK, CLOSE, CLOSEREQ: the ack bits; REQUEST: the service
# code; RESPONSE: both; RESET and every other type: struct dccp_hdr_reset)
_TYPE_PART = {2: 0, 3: 8, 4: 8, 5: 8, 6: 8, 8: 8, 9: 8, 0: 4, 1: 12}
_OTHER_TYPES_PART = 12

# The prologue's walk (fact group "dccp")
_REGION = facts.reserve("dccp", 48)
SEEN = _REGION              # 32 bytes: bit k set when the walk stepped on an option of kind k
DROP = _REGION + 32         # u8: 1 when --dccp-option hotdrops
_KIND = _REGION + 33        # u8: the byte just read
_AT = _REGION + 36          # u32: where the next option starts, from the options' start
_END = _REGION + 40         # u32: the options' length
_BASE = _REGION + 44        # u32: where they start in the packet
FACTS = frozenset({"dccp"}) | READS


@dataclass(frozen=True)
class DccpMatch(Match):
    sport: "PortRange | None"       # None: not tested
    dport: "PortRange | None"
    typemask: int
    invert_types: bool
    tests_types: bool
    option: "int | None"
    name = "dccp"
    revision = 0


@register_match
class Dccp(MatchExtension):
    name = "dccp"
    families = BOTH_FAMILIES
    struct = xt_dccp_info
    proto = IPPROTO_DCCP
    reads_transport = True

    def decode(self, payload: bytes, where: str) -> DccpMatch:
        dlo, dhi, slo, shi, flags, invflags, typemask, option = self.packed.unpack_from(payload)
        dpts, spts = (dlo, dhi), (slo, shi)
        # dccp_mt_check()
        if flags & ~XT_DCCP_VALID_FLAGS or invflags & ~XT_DCCP_VALID_FLAGS or \
                invflags & ~flags:
            raise BpfilterError(errno.EINVAL, f"{where}: dccp: invalid flags {flags:#x} or "
                                              f"inversion flags {invflags:#x}")
        if flags & invflags & XT_DCCP_OPTION:
            raise holds_and_drops(where, "dccp", "--dccp-option")
        return DccpMatch(flagged_ports(spts, XT_DCCP_SRC_PORTS, flags, invflags),
                         flagged_ports(dpts, XT_DCCP_DEST_PORTS, flags, invflags),
                         typemask, bool(invflags & XT_DCCP_TYPE), bool(flags & XT_DCCP_TYPE),
                         option if flags & XT_DCCP_OPTION else None)

    def facts_of(self, m: DccpMatch) -> frozenset:
        return FACTS if m.option is not None else READS

    def emit(self, m: DccpMatch, asm, out) -> None:
        emit_header_ports(asm, DCCP_HEADER, m.sport, m.dport, out)
        if m.tests_types:
            # typemask >> type & 1, the type being bits 1-4 of byte 8
            asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, BUF + 8), BPF_ALU64_IMM(I.BPF_RSH, R2, 1),
                     BPF_ALU64_IMM(I.BPF_AND, R2, 0x0F),
                     BPF_MOV64_IMM(R1, m.typemask), BPF_ALU64_REG(I.BPF_RSH, R1, R2),
                     BPF_ALU64_IMM(I.BPF_AND, R1, 1))
            if not m.invert_types:
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
            out.mismatch(R1)
        if m.option is not None:
            # the walk's hotdrop comes with the test failing: first
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, DROP))
            out.hotdrop(R1)
            bit = 1 << (m.option & 7)
            emit_masked_equal(asm, SEEN + (m.option >> 3), 1, bit, bit, False, out)

    def describe(self, m: DccpMatch) -> str:
        # dccp_print() with -n
        parts = ["dccp"]
        parts += describe_flagged(m.sport, m.dport)
        if m.tests_types:
            types = ",".join(str(t) for t in range(16) if m.typemask >> t & 1)
            parts.append(f"{'! ' if m.invert_types else ''}{types}")
        if m.option is not None:
            parts.append(f"option={m.option}")
        return " ".join(parts)


def _emit_walk(asm, k: facts.KernelOffsets) -> None:
    """SEEN and DROP for a first dccp fragment whose header is there (else the match
    fails or hotdrops on its own read). R6 = &facts; R8 and R9 kept."""
    done, drop = asm.label("dccp_done"), asm.label("dccp_drop")
    callback = asm.subprogram("dccp_option_step", lambda: _emit_step(asm))
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.PROTO),
             BPF_JMP_IMM(I.BPF_JNE, R1, IPPROTO_DCCP, done),
             BPF_LDX_MEM(BPF_H, R1, R6, facts.FRAGOFF),
             BPF_JMP_IMM(I.BPF_JNE, R1, 0, done))
    # bytes 4 (data offset) to 11 of the header, into SEEN's first 8 (zeroed after)
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, SEEN), BPF_MOV64_IMM(R2, 8),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_LDX_MEM(BPF_W, R4, R6, facts.THOFF), BPF_ALU64_IMM(I.BPF_ADD, R4, 4),
             BPF_MOV64_IMM(R5, 0), BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, done),
             BPF_LDX_MEM(BPF_B, R7, R6, SEEN),              # R7: the data offset in bytes
             BPF_ALU64_IMM(I.BPF_LSH, R7, 2),
             BPF_LDX_MEM(BPF_B, R2, R6, SEEN + 4),          # res:3 type:4 x:1
             BPF_ST_MEM(BPF_DW, R6, SEEN, 0),
             # R3: __dccp_hdr_len(): 12, 16 with X, and the type's part
             BPF_MOV64_REG(R3, R2), BPF_ALU64_IMM(I.BPF_AND, R3, 1),
             BPF_ALU64_IMM(I.BPF_LSH, R3, 2), BPF_ALU64_IMM(I.BPF_ADD, R3, DCCP_HEADER),
             BPF_ALU64_IMM(I.BPF_RSH, R2, 1), BPF_ALU64_IMM(I.BPF_AND, R2, 0x0F))
    sized = asm.label("dccp_sized")
    for type_, part in _TYPE_PART.items():
        other = asm.label("dccp_other_type")
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R2, type_, other),
                 BPF_ALU64_IMM(I.BPF_ADD, R3, part), BPF_JMP_A(sized))
        asm.place(other)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, _OTHER_TYPES_PART))
    asm.place(sized)
    asm.emit(BPF_JMP_REG(I.BPF_JLT, R7, R3, drop),
             # the options must all be in the packet: thoff + doff * 4 <= skb->len
             BPF_LDX_MEM(BPF_W, R1, R6, facts.THOFF), BPF_ALU64_REG(I.BPF_ADD, R1, R7),
             BPF_LDX_MEM(BPF_W, R2, R6, facts.LEN),
             BPF_JMP_REG(I.BPF_JGT, R1, R2, drop),
             BPF_ALU64_REG(I.BPF_SUB, R7, R3),              # R7: the options' length
             BPF_JMP_IMM(I.BPF_JEQ, R7, 0, done),
             BPF_LDX_MEM(BPF_W, R1, R6, facts.THOFF), BPF_ALU64_REG(I.BPF_ADD, R1, R3),
             BPF_STX_MEM(BPF_W, R6, R1, _BASE), BPF_STX_MEM(BPF_W, R6, R7, _END),
             BPF_ST_MEM(BPF_W, R6, _AT, 0),
             # every step moves at least one byte on
             BPF_MOV64_REG(R1, R7), *BPF_LD_FUNC(R2, callback), BPF_MOV64_REG(R3, R6),
             BPF_MOV64_IMM(R4, 0), BPF_EMIT_CALL(I.BPF_FUNC_loop),
             BPF_JMP_A(done))
    asm.place(drop)
    asm.emit(BPF_ST_MEM(BPF_B, R6, DROP, 1))
    asm.place(done)


def _read_byte(asm, at_reg) -> None:
    """_KIND = the packet's byte at _BASE + at_reg; R0 = 0, or an error."""
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _KIND), BPF_MOV64_IMM(R2, 1),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_LDX_MEM(BPF_W, R4, R6, _BASE), BPF_ALU64_REG(I.BPF_ADD, R4, at_reg),
             BPF_MOV64_IMM(R5, 0), BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read))


def _emit_step(asm) -> None:
    """One turn of dccp_find_option()'s loop, R2 = &facts: 0 to go on, 1 at the end."""
    stop, noted, advance = asm.label("stop"), asm.label("noted"), asm.label("advance")
    asm.emit(BPF_MOV64_REG(R6, R2),
             BPF_LDX_MEM(BPF_W, R7, R6, _AT), BPF_LDX_MEM(BPF_W, R8, R6, _END),
             BPF_JMP_REG(I.BPF_JGE, R7, R8, stop))
    _read_byte(asm, R7)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, stop),
             BPF_LDX_MEM(BPF_B, R1, R6, _KIND),
             # SEEN[kind >> 3] |= 1 << (kind & 7), the byte chosen among 32 by branches
             # (a stack offset the verifier must bound otherwise)
             BPF_MOV64_REG(R2, R1), BPF_ALU64_IMM(I.BPF_AND, R2, 7),
             BPF_MOV64_IMM(R3, 1), BPF_ALU64_REG(I.BPF_LSH, R3, R2),
             BPF_MOV64_REG(R2, R1), BPF_ALU64_IMM(I.BPF_RSH, R2, 3))
    for byte in range(32):
        other = asm.label("other_byte")
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R2, byte, other),
                 BPF_LDX_MEM(BPF_B, R4, R6, SEEN + byte), BPF_ALU64_REG(I.BPF_OR, R4, R3),
                 BPF_STX_MEM(BPF_B, R6, R4, SEEN + byte), BPF_JMP_A(noted))
        asm.place(other)
    asm.place(noted)
    asm.emit(BPF_MOV64_IMM(R3, 1),
             BPF_JMP_IMM(I.BPF_JLT, R1, 2, advance),
             # the length byte, which the last byte has not (the walk ends there)
             BPF_MOV64_REG(R2, R7), BPF_ALU64_IMM(I.BPF_ADD, R2, 1),
             BPF_JMP_REG(I.BPF_JGE, R2, R8, stop))
    _read_byte(asm, R2)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, stop),
             BPF_LDX_MEM(BPF_B, R3, R6, _KIND),
             BPF_JMP_IMM(I.BPF_JNE, R3, 0, advance), BPF_MOV64_IMM(R3, 1))
    asm.place(advance)
    asm.emit(BPF_ALU64_REG(I.BPF_ADD, R7, R3), BPF_STX_MEM(BPF_W, R6, R7, _AT),
             BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    asm.place(stop)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())


facts.OPTIONAL["dccp"] = _emit_walk
