"""-m hbh: --hbh-len, --hbh-opts and -m dst: --dst-len, --dst-opts (struct ip6t_opts,
revision 0; net/ipv6/netfilter/ip6t_hbh.c registers both, one for hop-by-hop
options, one for destination options).

hbh_mt6(): the first header of its type (exthdr.py says how it is found), its two
bytes read (else hotdrop), its length ipv6_optlen() checked against the packet
(else hotdrop); the length compared if asked; then, if options are asked, a walk of
the header's options, one per option of the rule (up to 16), each of which must be
the next option in the header: same type, and unless the rule says any length
(0xFF) or the option is Pad1 (type 0, a single byte), same data length. The walk
fails the match when the header has no room for the option's type (or length), and,
before the last of the rule's options, when the option runs past the header or the
packet. Since the header was checked to lie inside the packet, its reads never fail.

The walk is a bpf_loop() callback shared by every rule: the rule's options are
copied into the facts (fact group "ipv6_opts") before the call.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int16un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B,
                        BPF_DW, BPF_EMIT_CALL, BPF_EXIT_INSN, BPF_H, BPF_JMP_IMM,
                        BPF_JMP_REG, BPF_LD_FUNC, BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W, R0, R1,
                        R2, R3, R4, R5, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import HOTDROP, MISMATCH, emit_masked_equal
from . import MatchExtension, register_match
from .exthdr import HDRLEN, SEARCHES, emit_find, emit_fits, emit_length, emit_read

NEXTHDR_HOP, NEXTHDR_DEST = 0, 60
IP6T_OPTS_OPTSNR = 16
IP6T_OPTS_LEN, IP6T_OPTS_OPTS, IP6T_OPTS_NSTRICT = 0x01, 0x02, 0x04
IP6T_OPTS_INV_LEN = 0x01
IP6T_OPTS_INV_MASK = 0x01
ANY_LENGTH = 0xFF

ip6t_opts = Struct(
    "hdrlen" / Int32un,
    "flags" / Int8un,
    "invflags" / Int8un,
    "opts" / Int16un[IP6T_OPTS_OPTSNR],
    "optsnr" / Int8un,
    Padding(1),
)

# The options walk (fact group "ipv6_opts"): the rule's options as the struct holds
# them (type << 8 | length), how many, where the next option starts, how many header
# bytes are left, and how many options matched.
_WALK = facts.reserve("ipv6_opts", 2 * IP6T_OPTS_OPTSNR + 24)
_OPTS = _WALK
_OPTSNR = _WALK + 32       # u32
_AT = _WALK + 36           # u32: ptr
_LEFT = _WALK + 40         # u32: hdrlen, as the kernel's unsigned int
_DONE = _WALK + 44         # u32: options matched
_SPEC = _WALK + 48         # u16: the rule's option of this turn
_TYPE = _WALK + 50         # u8: the packet option's type
_LENGTH = _WALK + 51       # u8: and its data length


@dataclass(frozen=True)
class OptsMatch(Match):
    hdrlen: int
    flags: int
    invflags: int
    opts: tuple[int, ...]        # the first optsnr of the struct's
    name = "hbh"
    revision = 0


@dataclass(frozen=True)
class DstMatch(OptsMatch):
    name = "dst"


@register_match
class Hbh(MatchExtension):
    name = "hbh"
    families = (Family.IPV6,)
    struct = ip6t_opts
    facts = SEARCHES
    model = OptsMatch
    nexthdr = NEXTHDR_HOP

    def decode(self, payload: bytes, where: str) -> OptsMatch:
        hdrlen, flags, invflags, *opts, optsnr = self.packed.unpack_from(payload)
        # hbh_mt6_check(), in its order
        if invflags & ~IP6T_OPTS_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.name}: unknown inversion "
                                              f"flags {invflags:#x}")
        if optsnr > IP6T_OPTS_OPTSNR:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.name}: {optsnr} options, at "
                                              f"most {IP6T_OPTS_OPTSNR}")
        if flags & IP6T_OPTS_NSTRICT:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.name}: the not-strict option "
                                              "match is not implemented by Linux")
        return self.model(hdrlen, flags, invflags, tuple(opts[:optsnr]))

    def facts_of(self, match: OptsMatch) -> frozenset[str]:
        return self.facts | ({"ipv6_opts"} if _walks(match) else set())

    def emit(self, m: OptsMatch, asm, out) -> None:
        emit_find(asm, self.nexthdr, out)
        emit_read(asm, 0, 2, out)          # struct ipv6_opt_hdr
        emit_length(asm, 8, 1)
        emit_fits(asm, out)
        if m.flags & IP6T_OPTS_LEN:
            emit_masked_equal(asm, HDRLEN, 4, 0xFFFFFFFF, m.hdrlen,
                              bool(m.invflags & IP6T_OPTS_INV_LEN), out)
        if not _walks(m):
            return
        opts = list(m.opts) + [0] * (IP6T_OPTS_OPTSNR - len(m.opts))
        for at in range(0, IP6T_OPTS_OPTSNR, 4):
            word = sum(o << (16 * i) for i, o in enumerate(opts[at:at + 4]))
            asm.emit(*BPF_LD_IMM64(R1, word), BPF_STX_MEM(BPF_DW, R6, R1, _OPTS + 2 * at))
        callback = asm.subprogram("ipv6_opts_step", lambda: _emit_step(asm))
        asm.emit(BPF_ST_MEM(BPF_W, R6, _OPTSNR, len(m.opts)),
                 # past the next-header and length bytes
                 BPF_MOV64_REG(R1, R7), BPF_ALU64_IMM(I.BPF_ADD, R1, 2),
                 BPF_STX_MEM(BPF_W, R6, R1, _AT),
                 BPF_LDX_MEM(BPF_W, R1, R6, HDRLEN), BPF_ALU64_IMM(I.BPF_SUB, R1, 2),
                 BPF_STX_MEM(BPF_W, R6, R1, _LEFT),
                 BPF_ST_MEM(BPF_W, R6, _DONE, 0),
                 BPF_MOV64_REG(R8, MISMATCH), BPF_MOV64_REG(R9, HOTDROP),
                 BPF_MOV64_IMM(R1, len(m.opts)), *BPF_LD_FUNC(R2, callback),
                 BPF_MOV64_REG(R3, R6), BPF_MOV64_IMM(R4, 0),
                 BPF_EMIT_CALL(I.BPF_FUNC_loop),
                 BPF_MOV64_REG(MISMATCH, R8), BPF_MOV64_REG(HOTDROP, R9),
                 BPF_LDX_MEM(BPF_W, R1, R6, _DONE), BPF_ALU64_IMM(I.BPF_XOR, R1, len(m.opts)))
        out.mismatch(R1)

    def describe(self, m: OptsMatch) -> str:
        # hbh_print() (the dst match prints "dst" where hbh_print() says "hbh")
        text = self.name
        if m.flags & IP6T_OPTS_LEN:
            text += f" length:{'!' if m.invflags & IP6T_OPTS_INV_LEN else ''}{m.hdrlen}"
        if m.flags & IP6T_OPTS_OPTS:
            text += " opts"
        for i, o in enumerate(m.opts):
            text += (" " if i == 0 else ",") + str(o >> 8) + \
                ("" if o & 0xFF == ANY_LENGTH else f":{o & 0xFF}")
        return text


@register_match
class Dst(Hbh):
    name = "dst"
    model = DstMatch
    nexthdr = NEXTHDR_DEST


def _walks(m: OptsMatch) -> bool:
    """Whether hbh_mt6() walks the options: asked, and for at least one option (with
    none the walk's loop does not run and the match holds)."""
    return bool(m.flags & IP6T_OPTS_OPTS and m.opts)


def _emit_read_byte(asm, at: int, dst) -> None:
    """R0 = bpf_dynptr_read(dst, 1, &skb, R8 + at, 0): 0, or an error past the end."""
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, dst), BPF_MOV64_IMM(R2, 1),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_REG(R4, R8), BPF_ALU64_IMM(I.BPF_ADD, R4, at), BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read))


def _emit_step(asm) -> None:
    """One turn of hbh_mt6()'s loop, R1 = temp, R2 = &facts: 0 after an option that
    matched, 1 to leave the loop (the match then fails: fewer options matched than
    the rule has). R7 = temp, R8 = ptr, R9 = hdrlen, the option's length in R3;
    ptr and hdrlen are the kernel's unsigned ints, hence the 32-bit arithmetic."""
    stop, length_ok, sized, advance = (asm.label(n) for n in
                                       ("stop", "length_ok", "sized", "advance"))
    asm.emit(BPF_MOV64_REG(R6, R2), BPF_MOV64_REG(R7, R1),
             BPF_ALU64_IMM(I.BPF_AND, R7, IP6T_OPTS_OPTSNR - 1),
             BPF_LDX_MEM(BPF_W, R8, R6, _AT), BPF_LDX_MEM(BPF_W, R9, R6, _LEFT),
             # type field exists?
             BPF_JMP_IMM(I.BPF_JEQ, R9, 0, stop))
    _emit_read_byte(asm, 0, _TYPE)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, stop),
             # the rule's option opts[temp]: its type must be the packet's
             BPF_MOV64_REG(R1, R7), BPF_ALU64_IMM(I.BPF_LSH, R1, 1),
             BPF_ALU64_REG(I.BPF_ADD, R1, R6), BPF_LDX_MEM(BPF_H, R2, R1, _OPTS),
             BPF_STX_MEM(BPF_H, R6, R2, _SPEC),
             BPF_ALU64_IMM(I.BPF_RSH, R2, 8),
             BPF_LDX_MEM(BPF_B, R3, R6, _TYPE),
             BPF_JMP_REG(I.BPF_JNE, R3, R2, stop),
             # Pad1 is one byte, without a length
             BPF_MOV64_IMM(R3, 1),
             BPF_JMP_IMM(I.BPF_JEQ, R2, 0, sized),
             # length field exists?
             BPF_JMP_IMM(I.BPF_JLT, R9, 2, stop))
    _emit_read_byte(asm, 1, _LENGTH)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, stop),
             BPF_LDX_MEM(BPF_H, R2, R6, _SPEC), BPF_ALU64_IMM(I.BPF_AND, R2, 0xFF),
             BPF_LDX_MEM(BPF_B, R3, R6, _LENGTH),
             BPF_JMP_IMM(I.BPF_JEQ, R2, ANY_LENGTH, length_ok),
             BPF_JMP_REG(I.BPF_JNE, R2, R3, stop))
    asm.place(length_ok)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, 2))
    asm.place(sized)
    # (ptr > skb->len - optlen || hdrlen < optlen) && temp < optsnr - 1: break
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, _OPTSNR), BPF_ALU64_IMM(I.BPF_SUB, R1, 1),
             BPF_JMP_REG(I.BPF_JGE, R7, R1, advance),
             BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_ALU32_REG(I.BPF_SUB, R1, R3),
             BPF_JMP_REG(I.BPF_JGT, R8, R1, stop),
             BPF_JMP_REG(I.BPF_JLT, R9, R3, stop))
    asm.place(advance)
    asm.emit(BPF_ALU32_REG(I.BPF_ADD, R8, R3), BPF_ALU32_REG(I.BPF_SUB, R9, R3),
             BPF_STX_MEM(BPF_W, R6, R8, _AT), BPF_STX_MEM(BPF_W, R6, R9, _LEFT),
             BPF_MOV64_REG(R1, R7), BPF_ALU64_IMM(I.BPF_ADD, R1, 1),
             BPF_STX_MEM(BPF_W, R6, R1, _DONE),
             BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    asm.place(stop)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
