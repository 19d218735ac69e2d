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

The walk is unrolled, one step per option of the rule (whose type and length are
then constants), and branch-free: a step that breaks the kernel's loop or fails the
match sets a flag the later steps keep, so their reads at whatever offsets follow
change nothing. Its state lives in the facts, where the match read its header.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int8un, Int16un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_EMIT_CALL,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import HOTDROP, MISMATCH, emit_masked_equal, emit_nonzero_bit
from . import MatchExtension, register_match
from .exthdr import BUF, HDRLEN, SEARCHES, emit_find, emit_fits, emit_length, emit_read

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

# The options walk's state, where the header's own two bytes were read (no longer
# needed once its length is known): where the next option starts, how many header
# bytes are left (the kernel's unsigned ints), whether the loop broke or failed, and
# the option bytes read.
_AT = BUF                  # u32: ptr
_LEFT = BUF + 4            # u32: hdrlen
_FAILED = BUF + 8          # u8
_TYPE = BUF + 9            # u8: the option's type
_LENGTH = BUF + 10         # u8: and its data length


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
        # ptr += 2; hdrlen -= 2: past the next-header and length bytes
        asm.emit(BPF_MOV64_REG(R1, R7), BPF_ALU64_IMM(I.BPF_ADD, R1, 2),
                 BPF_STX_MEM(BPF_W, R6, R1, _AT),
                 BPF_LDX_MEM(BPF_W, R1, R6, HDRLEN), BPF_ALU64_IMM(I.BPF_SUB, R1, 2),
                 BPF_STX_MEM(BPF_W, R6, R1, _LEFT),
                 BPF_ST_MEM(BPF_B, R6, _FAILED, 0),
                 BPF_MOV64_REG(R8, MISMATCH), BPF_MOV64_REG(R9, HOTDROP))
        for temp, option in enumerate(m.opts):
            _emit_step(asm, option, last=temp == len(m.opts) - 1)
        asm.emit(BPF_MOV64_REG(MISMATCH, R8), BPF_MOV64_REG(HOTDROP, R9),
                 BPF_LDX_MEM(BPF_B, R1, R6, _FAILED))
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
    """R7 = 0 if bpf_dynptr_read(dst, 1, &skb, ptr + at, 0) read the byte, else 1."""
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, dst), BPF_MOV64_IMM(R2, 1),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_LDX_MEM(BPF_W, R4, R6, _AT), BPF_ALU64_IMM(I.BPF_ADD, R4, at),
             BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_MOV64_REG(R7, R0))
    emit_nonzero_bit(asm, R7, R3)


def _emit_below(asm, dst: int, reg: int, bound) -> None:
    """dst |= 1 if reg < bound (a register or a constant), both u32 values."""
    asm.emit(BPF_MOV64_REG(R2, reg))
    if isinstance(bound, int):
        asm.emit(BPF_ALU64_IMM(I.BPF_SUB, R2, bound))
    else:
        asm.emit(BPF_ALU64_REG(I.BPF_SUB, R2, bound))
    asm.emit(BPF_ALU64_IMM(I.BPF_RSH, R2, 63), BPF_ALU64_REG(I.BPF_OR, dst, R2))


def _emit_step(asm, option: int, last: bool) -> None:
    """One turn of hbh_mt6()'s loop for the rule's option (type << 8 | length):

        if (hdrlen < 1) break;                  read the type, or break;
        if (type != option's) return false;
        if (type) { if (hdrlen < 2) break;      read the length, or break;
                    if (its length is not 0xFF and != the length) return false;
                    optlen = length + 2; } else optlen = 1;
        if ((ptr > skb->len - optlen || hdrlen < optlen) && not the last) break;
        ptr += optlen; hdrlen -= optlen;

    Breaking and failing both fail the match: either sets _FAILED. The packet's type
    equals the rule's whenever it matters, so whether it is Pad1 is known here."""
    kind, length = option >> 8, option & 0xFF
    # R7: this turn fails; R9 keeps HOTDROP, R8 MISMATCH
    _emit_read_byte(asm, 0, _TYPE)
    asm.emit(BPF_MOV64_REG(R1, R7), BPF_LDX_MEM(BPF_W, R3, R6, _LEFT))
    _emit_below(asm, R1, R3, 1)
    asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, _TYPE), BPF_ALU64_IMM(I.BPF_XOR, R2, kind))
    emit_nonzero_bit(asm, R2, R3)
    asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2), BPF_STX_MEM(BPF_B, R6, R1, _TYPE))
    # _TYPE now holds this turn's failure so far (the type itself is no longer needed)
    if kind:
        _emit_read_byte(asm, 1, _LENGTH)
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _TYPE), BPF_ALU64_REG(I.BPF_OR, R1, R7),
                 BPF_LDX_MEM(BPF_W, R3, R6, _LEFT))
        _emit_below(asm, R1, R3, 2)
        if length != ANY_LENGTH:
            asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, _LENGTH), BPF_ALU64_IMM(I.BPF_XOR, R2, length))
            emit_nonzero_bit(asm, R2, R3)
            asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2))
        # R4 = optlen
        asm.emit(BPF_LDX_MEM(BPF_B, R4, R6, _LENGTH), BPF_ALU64_IMM(I.BPF_ADD, R4, 2))
    else:
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _TYPE), BPF_MOV64_IMM(R4, 1))
    asm.emit(BPF_LDX_MEM(BPF_W, R5, R6, _AT), BPF_LDX_MEM(BPF_W, R3, R6, _LEFT))
    if not last:
        # ptr > skb->len - optlen, in u32 (skb->len - optlen wraps as the kernel's)
        asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, facts.LEN), BPF_ALU32_REG(I.BPF_SUB, R2, R4),
                 BPF_ALU64_REG(I.BPF_SUB, R2, R5), BPF_ALU64_IMM(I.BPF_RSH, R2, 63),
                 BPF_ALU64_REG(I.BPF_OR, R1, R2))
        _emit_below(asm, R1, R3, R4)
    asm.emit(BPF_ALU32_REG(I.BPF_ADD, R5, R4), BPF_STX_MEM(BPF_W, R6, R5, _AT),
             BPF_ALU32_REG(I.BPF_SUB, R3, R4), BPF_STX_MEM(BPF_W, R6, R3, _LEFT),
             BPF_LDX_MEM(BPF_B, R2, R6, _FAILED), BPF_ALU64_REG(I.BPF_OR, R2, R1),
             BPF_STX_MEM(BPF_B, R6, R2, _FAILED))
