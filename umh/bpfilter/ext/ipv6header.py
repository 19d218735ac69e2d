"""-m ipv6header: [!] --header NAMES [--soft] (struct ip6t_ipv6header_info, revision 0;
net/ipv6/netfilter/ip6t_ipv6header.c).

ipv6header_mt6() walks the extension headers with a loop of its own, not
ipv6_find_hdr()'s, and the differences matter:
  - its headers are nf_ip6_ext_hdr()'s: hop-by-hop, routing, fragment, AH,
    destination options, and ESP and "no next header" (59), which end it, each
    setting its bit; whatever else ends it as the protocol (bit MASK_PROTO);
  - before any header but "no next header", fewer than 2 bytes left in the packet
    make the match fail (not hotdrop), ESP included;
  - a fragment header is 8 bytes and nothing more: a later fragment's next header
    is followed like any other, into the fragment's data;
  - a header's length is not checked against the packet: the walk adds it and
    stops once past the end, and the next header named by the last one read still
    counts (as the protocol, unless it is ESP or 59);
  - reading a header's two bytes cannot fail once 2 bytes are left; the kernel's
    hotdrop there is kept all the same.
Then, with --soft the packet must have every header named (or, inverted, none of
them); without, exactly the headers named (inverted: anything else).

The walk depends on the packet alone: the prologue makes it once per packet for
tables with an ipv6header match (fact group "ipv6header"), as a bpf_loop()
callback, every step moving 8 bytes on or ending it.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_EMIT_CALL, BPF_EXIT_INSN,
                        BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_FUNC, BPF_LDX_MEM,
                        BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W, R0, R1,
                        R2, R3, R4, R5, R6, R7, R8)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import emit_equal_hotdrop, emit_masked_equal
from . import MatchExtension, register_match

MASK_HOPOPTS, MASK_DSTOPTS, MASK_ROUTING, MASK_FRAGMENT = 128, 64, 32, 16
MASK_AH, MASK_ESP, MASK_NONE, MASK_PROTO = 8, 4, 2, 1
HOP, ROUTING, FRAGMENT, ESP, AUTH, NONE, DEST = 0, 43, 44, 50, 51, 59, 60
_BIT = {HOP: MASK_HOPOPTS, ROUTING: MASK_ROUTING, FRAGMENT: MASK_FRAGMENT, AUTH: MASK_AH,
        DEST: MASK_DSTOPTS}
IPV6_HEADER = 40
_WALKING, _EVALUATE, _FALSE, _HOTDROP = 0, 1, 2, 3

ip6t_ipv6header_info = Struct(
    "matchflags" / Int8un,
    "invflags" / Int8un,
    "modeflag" / Int8un,
)

_WALK = facts.reserve("ipv6header", 8)
_AT = _WALK                # u32: ptr
_SEEN = _WALK + 4          # u8: the headers met (temp)
_STATE = _WALK + 5         # u8: _WALKING until the walk says how the match goes
_NEXT = _WALK + 6          # u8: nexthdr; a header's two bytes are read here, so that
_HDR = _NEXT               # its nexthdr becomes the walk's (the step keeps the current
#                            one in a register)


@dataclass(frozen=True)
class Ipv6HeaderMatch(Match):
    matchflags: int
    invflags: int
    modeflag: int
    name = "ipv6header"
    revision = 0


@register_match
class Ipv6Header(MatchExtension):
    name = "ipv6header"
    families = (Family.IPV6,)
    struct = ip6t_ipv6header_info
    facts = frozenset({"ipv6header"})

    def decode(self, payload: bytes, where: str) -> Ipv6HeaderMatch:
        matchflags, invflags, modeflag = self.packed.unpack_from(payload)
        # ipv6header_mt6_check(): "invflags is 0 or 0xff in hard mode"
        if not modeflag and invflags not in (0x00, 0xFF):
            raise BpfilterError(errno.EINVAL, f"{where}: ipv6header: inversion {invflags:#x} "
                                              "without --soft (0 or 0xff)")
        return Ipv6HeaderMatch(matchflags, invflags, modeflag)

    def emit(self, m: Ipv6HeaderMatch, asm, out) -> None:
        emit_equal_hotdrop(asm, _STATE, 1, _HOTDROP, out)
        emit_masked_equal(asm, _STATE, 1, 0xFF, _FALSE, True, out)
        if m.modeflag:
            # !((temp ^ matchflags ^ invflags) & matchflags)
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _SEEN),
                     BPF_ALU64_IMM(I.BPF_XOR, R1, m.matchflags ^ m.invflags),
                     BPF_ALU64_IMM(I.BPF_AND, R1, m.matchflags))
            out.mismatch(R1)
        else:
            emit_masked_equal(asm, _SEEN, 1, 0xFF, m.matchflags, bool(m.invflags), out)

    def describe(self, m: Ipv6HeaderMatch) -> str:
        # ipv6header_print() with -n
        text = "ipv6header"
        if m.matchflags or m.invflags:
            text += f" flags:{'!' if m.invflags else ''}0x{m.matchflags:02X}"
        if m.modeflag:
            text += " soft"
        return text


def _read_headers(asm, k: facts.KernelOffsets) -> None:
    """The walk, in the prologue (R6 = &facts; R8, R9 kept)."""
    callback = asm.subprogram("ipv6header_step", lambda: _emit_step(asm))
    walked = asm.label("ipv6header_walked")
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _NEXT),
             BPF_MOV64_IMM(R2, 1),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_IMM(R4, 6), BPF_MOV64_IMM(R5, 0),     # the IPv6 header's nexthdr
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_ST_MEM(BPF_W, R6, _AT, IPV6_HEADER),
             # every step but the last moves at least 8 bytes on, and stops past the end
             BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_ALU64_IMM(I.BPF_RSH, R1, 3),
             BPF_ALU64_IMM(I.BPF_ADD, R1, 2),
             *BPF_LD_FUNC(R2, callback), BPF_MOV64_REG(R3, R6), BPF_MOV64_IMM(R4, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_loop),
             # a walk that never ended cannot be the kernel's: fail closed
             BPF_LDX_MEM(BPF_B, R1, R6, _STATE),
             BPF_JMP_IMM(I.BPF_JNE, R1, _WALKING, walked),
             BPF_ST_MEM(BPF_B, R6, _STATE, _HOTDROP))
    asm.place(walked)


def _emit_step(asm) -> None:
    """One turn of ipv6header_mt6()'s loop, R2 = &facts: 0 to go on, 1 once _STATE
    says how the match goes. R7 = nexthdr, R8 = ptr."""
    evaluate, read, sized, flagged = (asm.label(n) for n in
                                      ("evaluate", "read", "sized", "flagged"))
    asm.emit(BPF_MOV64_REG(R6, R2),
             BPF_LDX_MEM(BPF_B, R7, R6, _NEXT), BPF_LDX_MEM(BPF_W, R8, R6, _AT))
    _emit_seen(asm, MASK_NONE, only_if=(R7, NONE), then=evaluate)
    extension = asm.label("extension")
    for nexthdr in (HOP, ROUTING, FRAGMENT, ESP, AUTH, DEST):
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R7, nexthdr, extension))
    asm.emit(BPF_JMP_A(evaluate))
    asm.place(extension)
    # "Is there enough space for the next ext header?" (len is an int)
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_ALU64_REG(I.BPF_SUB, R1, R8),
             BPF_JMP_IMM(I.BPF_JSGE, R1, 2, read),
             BPF_ST_MEM(BPF_B, R6, _STATE, _FALSE), BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    asm.place(read)
    _emit_seen(asm, MASK_ESP, only_if=(R7, ESP), then=evaluate)
    done = asm.label("read_done")
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _HDR),
             BPF_MOV64_IMM(R2, 2),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_REG(R4, R8), BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, done),
             BPF_ST_MEM(BPF_B, R6, _STATE, _HOTDROP), BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    asm.place(done)
    # the header's length: 8 for a fragment header, ipv6_authlen(), ipv6_optlen()
    not_auth = asm.label("not_auth")
    asm.emit(BPF_MOV64_IMM(R3, 8),
             BPF_JMP_IMM(I.BPF_JEQ, R7, FRAGMENT, sized),
             BPF_LDX_MEM(BPF_B, R3, R6, _HDR + 1),
             BPF_JMP_IMM(I.BPF_JNE, R7, AUTH, not_auth),
             BPF_ALU64_IMM(I.BPF_ADD, R3, 2), BPF_ALU64_IMM(I.BPF_LSH, R3, 2),
             BPF_JMP_A(sized))
    asm.place(not_auth)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, 1), BPF_ALU64_IMM(I.BPF_LSH, R3, 3))
    asm.place(sized)
    for nexthdr, bit in _BIT.items():
        other = asm.label("other")
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R7, nexthdr, other), BPF_MOV64_IMM(R2, bit),
                 BPF_JMP_A(flagged))
        asm.place(other)
    asm.emit(BPF_MOV64_IMM(R2, 0))
    asm.place(flagged)
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _SEEN), BPF_ALU64_REG(I.BPF_OR, R1, R2),
             BPF_STX_MEM(BPF_B, R6, R1, _SEEN),
             # (nexthdr = hp->nexthdr: read into place)
             BPF_ALU64_REG(I.BPF_ADD, R8, R3), BPF_STX_MEM(BPF_W, R6, R8, _AT),
             # "if (ptr > skb->len) break;"
             BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN),
             BPF_JMP_REG(I.BPF_JGT, R8, R1, evaluate),
             BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    asm.place(evaluate)
    # a walk ending anywhere but at ESP or "no next header" found a protocol
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _NEXT))
    no_proto = asm.label("no_proto")
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R1, NONE, no_proto),
             BPF_JMP_IMM(I.BPF_JEQ, R1, ESP, no_proto))
    _emit_seen(asm, MASK_PROTO)
    asm.place(no_proto)
    asm.emit(BPF_ST_MEM(BPF_B, R6, _STATE, _EVALUATE), BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())


def _emit_seen(asm, bit: int, only_if=None, then=None) -> None:
    """temp |= bit; with `only_if` (register, value), only when they are equal, and
    then on to `then`."""
    other = asm.label("not_seen")
    if only_if is not None:
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, only_if[0], only_if[1], other))
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _SEEN), BPF_ALU64_IMM(I.BPF_OR, R1, bit),
             BPF_STX_MEM(BPF_B, R6, R1, _SEEN))
    if then is not None:
        asm.emit(BPF_JMP_A(then))
    asm.place(other)


facts.OPTIONAL["ipv6header"] = _read_headers
