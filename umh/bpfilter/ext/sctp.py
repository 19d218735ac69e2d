"""-p sctp -m sctp: --sport, --dport, --chunk-types (struct xt_sctp_info,
net/netfilter/xt_sctp.c, both families, xt_match.proto = IPPROTO_SCTP).

sctp_mt(): a fragment other than the first never matches; the 12-byte common header
at par->thoff read (else hotdrop); then, each only if its flag is set and stopping at
the first that fails (SCCHECK): the source ports, the destination ports, and
match_packet()'s walk over the chunks. The walk reads each chunk's 4-byte header (a
header it cannot read, or a length of 0, hotdrops), moves on by the length rounded up
to 4 bytes, and goes on while it is inside skb->len:
  - any:  true at the first chunk whose type is in the map and whose flags match;
  - all:  every type of the map must be met with matching flags;
  - only: false at the first chunk whose type is not in the map or whose flags do
          not match; true at the end.
A chunk's flags match unless the first of the rule's flag_info entries for its type
says otherwise ((flags & mask) == flag).

The map is 64 words (256 / sizeof(u32)), of which types use the first 8; `all` asks
that a copy of the whole map be cleared, so a map with bits in the other 56 (iptables'
--chunk-types all ALL sets them all) never matches: so here.

The walk is a bpf_loop() per rule, its callback written for the rule's own map, flags
and mode.
"""
from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass

from construct import Int8un, Int16un, Int32sn, Int32un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_ENDIAN,
                        BPF_EXIT_INSN, BPF_H, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_FUNC,
                        BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM,
                        BPF_STX_MEM, BPF_W, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from ..packet.primitives import HOTDROP, MISMATCH
from . import BOTH_FAMILIES, MatchExtension, register_match
from .exthdr import READS
from .ports import (PortRange, describe_flagged, emit_header_ports, flagged_ports,
                    holds_and_drops)

IPPROTO_SCTP = 132
SCTP_HEADER = 12
XT_SCTP_SRC_PORTS, XT_SCTP_DEST_PORTS, XT_SCTP_CHUNK_TYPES = 0x01, 0x02, 0x04
XT_SCTP_VALID_FLAGS = 0x07
SCTP_CHUNK_MATCH_ANY, SCTP_CHUNK_MATCH_ALL, SCTP_CHUNK_MATCH_ONLY = 0x01, 0x02, 0x04
XT_NUM_SCTP_FLAGS = 4
MAP_WORDS = 64
_MODES = {SCTP_CHUNK_MATCH_ANY: "any", SCTP_CHUNK_MATCH_ALL: "all", SCTP_CHUNK_MATCH_ONLY: "only"}

xt_sctp_info = Struct(
    "dpts" / Int16un[2],
    "spts" / Int16un[2],
    "chunkmap" / Int32un[MAP_WORDS],
    "chunk_match_type" / Int32un,
    "flag_info" / Int8un[3 * XT_NUM_SCTP_FLAGS],     # (chunktype, flag, flag_mask) each
    "flag_count" / Int32sn,
    "flags" / Int32un,
    "invflags" / Int32un,
)

# libxt_sctp.c's letters for a chunk's flags, by its table's index (which its listing
# indexes by chunk type): DATA and I_DATA have I, U, B, E; ABORT and SHUTDOWN_COMPLETE T
_FLAG_LETTERS = {0: "----IUBE", 6: "-------T", 14: "-------T", 15: "----IUBE"}
_NAMED_TYPES = 22

# The walk's state (fact region "sctp_walk")
_REGION = facts.reserve("sctp_walk", 48)
_AT = _REGION                   # u32: the next chunk's offset in the packet
_STATE = _REGION + 4            # u8: _WALKING, then how the walk ends
_CHUNK = _REGION + 8            # 4 bytes: the chunk header just read
_PENDING = _REGION + 16         # 32 bytes: `all`'s types not met yet
_WALKING, _TRUE, _FALSE, _HOTDROP = 0, 1, 2, 3


@dataclass(frozen=True)
class SctpMatch(Match):
    sport: "PortRange | None"       # None: not tested
    dport: "PortRange | None"
    mode: "int | None"              # None: no chunk test
    chunkmap: tuple                 # the 64 words
    flag_info: tuple                # ((chunktype, flag, mask), ...) as many as flag_count
    invert_chunks: bool = False
    name = "sctp"
    revision = 0

    @property
    def type_words(self) -> tuple[int, int, int, int]:
        """The map's types 0-255 as four u64 words."""
        w = self.chunkmap
        return tuple(w[2 * k] | w[2 * k + 1] << 32 for k in range(4))


@register_match
class Sctp(MatchExtension):
    name = "sctp"
    families = BOTH_FAMILIES
    struct = xt_sctp_info
    proto = IPPROTO_SCTP
    reads_transport = True
    facts = READS | frozenset({"sctp_walk"})

    def decode(self, payload: bytes, where: str) -> SctpMatch:
        v = self.packed.unpack_from(payload)
        dpts, spts, chunkmap = v[0:2], v[2:4], tuple(v[4:4 + MAP_WORDS])
        mode = v[4 + MAP_WORDS]
        raw_flags = v[5 + MAP_WORDS:5 + MAP_WORDS + 3 * XT_NUM_SCTP_FLAGS]
        flag_count, flags, invflags = v[-3:]
        # sctp_mt_check()
        if not 0 <= flag_count <= XT_NUM_SCTP_FLAGS or flags & ~XT_SCTP_VALID_FLAGS or \
                invflags & ~XT_SCTP_VALID_FLAGS or invflags & ~flags or \
                (flags & XT_SCTP_CHUNK_TYPES and not mode & 0x07):
            raise BpfilterError(errno.EINVAL, f"{where}: sctp: invalid flags {flags:#x}, "
                                              f"inversion flags {invflags:#x}, chunk match "
                                              f"type {mode:#x} or flag count {flag_count}")
        if flags & invflags & XT_SCTP_CHUNK_TYPES:
            raise holds_and_drops(where, "sctp", "--chunk-types")
        return SctpMatch(flagged_ports(spts, XT_SCTP_SRC_PORTS, flags, invflags),
                         flagged_ports(dpts, XT_SCTP_DEST_PORTS, flags, invflags),
                         mode if flags & XT_SCTP_CHUNK_TYPES else None, chunkmap,
                         tuple(tuple(raw_flags[3 * i:3 * i + 3]) for i in range(flag_count)))

    def frames(self, m: SctpMatch) -> int:
        return 1 if m.mode is not None else 0

    def emit(self, m: SctpMatch, asm, out) -> None:
        emit_header_ports(asm, SCTP_HEADER, m.sport, m.dport, out)
        if m.mode is None:
            return
        # the walk runs only when every test before it held, as SCCHECK's && does
        skip = asm.label("sctp_skip")
        asm.emit(BPF_ST_MEM(BPF_B, R6, _STATE, _FALSE),
                 BPF_MOV64_REG(R1, MISMATCH), BPF_ALU64_REG(I.BPF_OR, R1, HOTDROP),
                 BPF_JMP_IMM(I.BPF_JNE, R1, 0, skip),
                 BPF_ST_MEM(BPF_B, R6, _STATE, _WALKING),
                 BPF_LDX_MEM(BPF_W, R1, R6, facts.THOFF),
                 BPF_ALU64_IMM(I.BPF_ADD, R1, SCTP_HEADER), BPF_STX_MEM(BPF_W, R6, R1, _AT))
        if m.mode == SCTP_CHUNK_MATCH_ALL:
            for k, word in enumerate(m.type_words):
                asm.emit(*BPF_LD_IMM64(R1, word), BPF_STX_MEM(BPF_DW, R6, R1, _PENDING + 8 * k))
        digest = hashlib.sha1(repr((m.mode, m.chunkmap, m.flag_info)).encode()).hexdigest()[:16]
        callback = asm.subprogram(f"sctp_chunk_{digest}", lambda: _emit_step(asm, m))
        # every turn moves at least 4 bytes on; one more for the first chunk
        asm.emit(BPF_MOV64_REG(R8, MISMATCH), BPF_MOV64_REG(R9, HOTDROP),
                 BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_ALU64_IMM(I.BPF_RSH, R1, 2),
                 BPF_ALU64_IMM(I.BPF_ADD, R1, 2),
                 *BPF_LD_FUNC(R2, callback), BPF_MOV64_REG(R3, R6), BPF_MOV64_IMM(R4, 0),
                 BPF_EMIT_CALL(I.BPF_FUNC_loop),
                 BPF_MOV64_REG(MISMATCH, R8), BPF_MOV64_REG(HOTDROP, R9))
        asm.place(skip)
        # a hotdrop comes with the walk failing, so first; a walk that never ended
        # cannot be the kernel's: fail closed
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _STATE), BPF_MOV64_REG(R2, R1),
                 BPF_ALU64_IMM(I.BPF_XOR, R2, _HOTDROP), BPF_ALU64_IMM(I.BPF_SUB, R2, 1),
                 BPF_ALU64_IMM(I.BPF_RSH, R2, 63),
                 BPF_MOV64_REG(R3, R1), BPF_ALU64_IMM(I.BPF_SUB, R3, 1),
                 BPF_ALU64_IMM(I.BPF_RSH, R3, 63), BPF_ALU64_REG(I.BPF_OR, R2, R3))
        out.hotdrop(R2)
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _STATE), BPF_ALU64_IMM(I.BPF_XOR, R1, _TRUE))
        out.mismatch(R1)

    def describe(self, m: SctpMatch) -> str:
        # sctp_print() with -n
        parts = ["sctp"]
        parts += describe_flagged(m.sport, m.dport)
        if m.mode is not None:
            parts.append(_MODES.get(m.mode, "Never reach here\n"))
            if not any(m.chunkmap):
                parts.append("NONE")
            elif all(w == 0xFFFFFFFF for w in m.chunkmap):
                parts.append("ALL")
            else:
                parts.append(",".join(_describe_chunk(t, m.flag_info) for t in range(256)
                                      if m.chunkmap[t // 32] >> (t % 32) & 1))
        return " ".join(parts)


def _describe_chunk(chunk_type: int, flag_info: tuple) -> str:
    text = f"0x{chunk_type:04X}"
    for ct, flag, mask in flag_info:
        if ct == chunk_type and mask:
            letters = _FLAG_LETTERS.get(chunk_type, "--------") if chunk_type < _NAMED_TYPES \
                else "????????"
            text += ":" + "".join(letters[7 - i] if flag >> i & 1 else letters[7 - i].lower()
                                  for i in range(7, -1, -1) if mask >> i & 1)
    return text


def _emit_step(asm, m: SctpMatch) -> None:
    """One turn of match_packet()'s loop for `m`, R2 = &facts: 0 to go on, 1 once
    _STATE says how the walk ends."""
    def end(state: int) -> list:
        return [BPF_ST_MEM(BPF_B, R6, _STATE, state), BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN()]

    read, nonzero = asm.label("chunk_read"), asm.label("chunk_nonzero")
    asm.emit(BPF_MOV64_REG(R6, R2), BPF_LDX_MEM(BPF_W, R7, R6, _AT),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _CHUNK), BPF_MOV64_IMM(R2, 4),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_REG(R4, R7), BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, read), *end(_HOTDROP))
    asm.place(read)
    asm.emit(BPF_LDX_MEM(BPF_H, R1, R6, _CHUNK + 2), BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
             BPF_JMP_IMM(I.BPF_JNE, R1, 0, nonzero), *end(_HOTDROP))
    asm.place(nonzero)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R1, 3), BPF_ALU64_IMM(I.BPF_AND, R1, ~3),
             BPF_ALU64_REG(I.BPF_ADD, R7, R1),
             BPF_STX_MEM(BPF_W, R6, R7, _AT),
             BPF_LDX_MEM(BPF_B, R2, R6, _CHUNK), BPF_LDX_MEM(BPF_B, R3, R6, _CHUNK + 1))
    # R4 = whether the type is in the map
    in_map, listed, flags_done, go_on = (asm.label(n) for n in
                                         ("in_map", "listed", "flags_done", "go_on"))
    words = m.type_words
    asm.emit(BPF_MOV64_REG(R5, R2), BPF_ALU64_IMM(I.BPF_RSH, R5, 6), BPF_MOV64_IMM(R4, 0))
    for k, word in enumerate(words):
        if word:
            other = asm.label("other_word")
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, R5, k, other), *BPF_LD_IMM64(R4, word),
                     BPF_JMP_A(in_map))
            asm.place(other)
    asm.place(in_map)
    asm.emit(BPF_MOV64_REG(R5, R2), BPF_ALU64_IMM(I.BPF_AND, R5, 63),
             BPF_ALU64_REG(I.BPF_RSH, R4, R5), BPF_ALU64_IMM(I.BPF_AND, R4, 1),
             BPF_JMP_IMM(I.BPF_JNE, R4, 0, listed))
    if m.mode == SCTP_CHUNK_MATCH_ONLY:
        asm.emit(*end(_FALSE))
    else:
        asm.emit(BPF_JMP_A(go_on))
    asm.place(listed)
    # R4 = match_flags(): the first entry for the type decides, none says yes
    for chunktype, flag, mask in m.flag_info:
        other = asm.label("other_entry")
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R2, chunktype, other),
                 BPF_MOV64_REG(R4, R3), BPF_ALU64_IMM(I.BPF_AND, R4, mask),
                 BPF_ALU64_IMM(I.BPF_XOR, R4, flag), BPF_ALU64_IMM(I.BPF_SUB, R4, 1),
                 BPF_ALU64_IMM(I.BPF_RSH, R4, 63), BPF_JMP_A(flags_done))
        asm.place(other)
    asm.emit(BPF_MOV64_IMM(R4, 1))
    asm.place(flags_done)
    if m.mode == SCTP_CHUNK_MATCH_ANY:
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R4, 0, go_on), *end(_TRUE))
    elif m.mode == SCTP_CHUNK_MATCH_ONLY:
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R4, 0, go_on), *end(_FALSE))
    else:
        # the type is met: its bit cleared from _PENDING
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R4, 0, go_on),
                 BPF_MOV64_REG(R5, R2), BPF_ALU64_IMM(I.BPF_AND, R5, 63),
                 BPF_MOV64_IMM(R4, 1), BPF_ALU64_REG(I.BPF_LSH, R4, R5),
                 BPF_ALU64_IMM(I.BPF_XOR, R4, -1),
                 BPF_MOV64_REG(R5, R2), BPF_ALU64_IMM(I.BPF_RSH, R5, 6))
        for k in range(4):
            other = asm.label("other_word")
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, R5, k, other),
                     BPF_LDX_MEM(BPF_DW, R1, R6, _PENDING + 8 * k),
                     BPF_ALU64_REG(I.BPF_AND, R1, R4),
                     BPF_STX_MEM(BPF_DW, R6, R1, _PENDING + 8 * k), BPF_JMP_A(go_on))
            asm.place(other)
    asm.place(go_on)
    last = asm.label("last_chunk")
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_JMP_REG(I.BPF_JGE, R7, R1, last),
             BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    asm.place(last)
    if m.mode == SCTP_CHUNK_MATCH_ANY:
        asm.emit(*end(_FALSE))
    elif m.mode == SCTP_CHUNK_MATCH_ONLY:
        asm.emit(*end(_TRUE))
    elif any(m.chunkmap[8:]):
        asm.emit(*end(_FALSE))
    else:
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, _PENDING))
        for k in range(1, 4):
            asm.emit(BPF_LDX_MEM(BPF_DW, R2, R6, _PENDING + 8 * k),
                     BPF_ALU64_REG(I.BPF_OR, R1, R2))
        cleared = asm.label("all_met")
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R1, 0, cleared), *end(_FALSE))
        asm.place(cleared)
        asm.emit(*end(_TRUE))
