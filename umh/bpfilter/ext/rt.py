"""-m rt: --rt-type, --rt-segsleft, --rt-len, --rt-0-res, --rt-0-addrs,
--rt-0-not-strict (struct ip6t_rt, revision 0; net/ipv6/netfilter/ip6t_rt.c).

rt_mt6(): the first routing header (exthdr.py says how it is found), its first four
bytes read (else hotdrop), its length ipv6_optlen() checked against the packet (else
hotdrop); then, in order, segments left within the range (always tested: the
default range is everything), the length and the type if asked, the four reserved
bytes of a type 0 header being zero if asked, and the address list if asked:
strict, the header's addresses are exactly the rule's, in order; not strict, the
rule's addresses appear among the header's in order (a subsequence, matched
greedily as the kernel's loop does). The length check makes every later read
succeed (the addresses lie inside the header), so their hotdrops never happen; the
code keeps them anyway, as the kernel's.
"""
from __future__ import annotations

import errno
import hashlib
import socket
from dataclasses import dataclass

from construct import Bytes, Int8un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_DW,
                        BPF_EMIT_CALL, BPF_EXIT_INSN, BPF_JMP_A, BPF_JMP_IMM, BPF_LD_FUNC,
                        BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM,
                        BPF_STX_MEM, BPF_W, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import (HOTDROP, MISMATCH, emit_masked_equal, emit_nonzero_bit,
                                 emit_range)
from . import MatchExtension, register_match
from .exthdr import BUF, HDRLEN, PTR, SEARCHES, emit_find, emit_fits, emit_length, emit_read

NEXTHDR_ROUTING = 43
IP6T_RT_HOPS = 16
IP6T_RT_TYP, IP6T_RT_SGS, IP6T_RT_LEN, IP6T_RT_RES = 0x01, 0x02, 0x04, 0x08
IP6T_RT_FST_MASK, IP6T_RT_FST, IP6T_RT_FST_NSTRICT = 0x30, 0x10, 0x20
IP6T_RT_INV_TYP, IP6T_RT_INV_SGS, IP6T_RT_INV_LEN = 0x01, 0x02, 0x04
IP6T_RT_INV_MASK = 0x07
RT0_HEADER = 8        # struct rt0_hdr: the routing header's 4 bytes, then 4 reserved

ip6t_rt = Struct(
    "rt_type" / Int32un,
    "segsleft" / Int32un[2],
    "hdrlen" / Int32un,
    "flags" / Int8un,
    "invflags" / Int8un,
    Padding(2),                         # struct in6_addr is 4-byte aligned
    "addrs" / Bytes(16 * IP6T_RT_HOPS),
    "addrnr" / Int8un,
    Padding(3),
)

# The not-strict walk counts the addresses matched where the header's length was
# (no longer needed by then); a read that failed leaves _READ_FAILED there.
_MATCHED = HDRLEN
_READ_FAILED = 0x100


@dataclass(frozen=True)
class RtMatch(Match):
    rt_type: int
    segsleft: tuple[int, int]
    hdrlen: int
    flags: int
    invflags: int
    addrs: tuple[bytes, ...]     # the first addrnr of the struct's
    name = "rt"
    revision = 0

    def inverts(self, flag: int) -> bool:
        return bool(self.invflags & flag)


@register_match
class Rt(MatchExtension):
    name = "rt"
    families = (Family.IPV6,)
    struct = ip6t_rt
    facts = SEARCHES

    def decode(self, payload: bytes, where: str) -> RtMatch:
        rt_type, seg_lo, seg_hi, hdrlen, flags, invflags, addrs, addrnr = \
            self.packed.unpack_from(payload)
        # rt_mt6_check(), in its order
        if invflags & ~IP6T_RT_INV_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: rt: unknown inversion flags "
                                              f"{invflags:#x}")
        if addrnr > IP6T_RT_HOPS:
            raise BpfilterError(errno.EINVAL, f"{where}: rt: {addrnr} addresses, at most "
                                              f"{IP6T_RT_HOPS}")
        if flags & IP6T_RT_FST_MASK and not addrnr:
            raise BpfilterError(errno.EINVAL, f"{where}: rt: address list match requested "
                                              "but addrnr is 0")
        if flags & (IP6T_RT_RES | IP6T_RT_FST_MASK) and (
                not flags & IP6T_RT_TYP or rt_type != 0 or invflags & IP6T_RT_INV_TYP):
            raise BpfilterError(errno.EINVAL, f"{where}: rt: `--rt-type 0' required before "
                                              "`--rt-0-*'")
        return RtMatch(rt_type, (seg_lo, seg_hi), hdrlen, flags, invflags,
                       tuple(addrs[16 * i:16 * i + 16] for i in range(addrnr)))

    def frames(self, match: RtMatch) -> int:
        return 1 if _not_strict(match) else 0

    def emit(self, m: RtMatch, asm, out) -> None:
        emit_find(asm, NEXTHDR_ROUTING, out)
        emit_read(asm, 0, 4, out)              # struct ipv6_rt_hdr
        emit_length(asm, 8, 1)
        emit_fits(asm, out)
        emit_range(asm, BUF + 3, 1, *m.segsleft, m.inverts(IP6T_RT_INV_SGS), out)
        if m.flags & IP6T_RT_LEN:
            emit_masked_equal(asm, HDRLEN, 4, 0xFFFFFFFF, m.hdrlen, m.inverts(IP6T_RT_INV_LEN),
                              out)
        if m.flags & IP6T_RT_TYP:
            # a u32 type above 255 equals no u8 type
            emit_masked_equal(asm, BUF + 2, 1, 0xFF, m.rt_type, m.inverts(IP6T_RT_INV_TYP), out)
        if m.flags & IP6T_RT_RES:
            emit_read(asm, 4, 4, out)          # rt0_hdr's reserved
            emit_masked_equal(asm, BUF, 4, 0xFFFFFFFF, 0, False, out)
        if not m.flags & IP6T_RT_FST:
            return
        # the header's address count, (hdrlen - 8) / 16, against the rule's
        addrnr = len(m.addrs)
        asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, HDRLEN), BPF_ALU64_IMM(I.BPF_SUB, R1, RT0_HEADER),
                 BPF_ALU64_IMM(I.BPF_RSH, R1, 4))
        if _not_strict(m):
            # addrnr > n: false
            asm.emit(BPF_MOV64_IMM(R2, addrnr), BPF_ALU64_REG(I.BPF_SUB, R1, R2),
                     BPF_ALU64_IMM(I.BPF_RSH, R1, 63))
            out.mismatch(R1)
            self._emit_subsequence(m, asm, out)
            return
        # strict: exactly the rule's addresses
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, addrnr))
        out.mismatch(R1)
        for k, addr in enumerate(m.addrs):
            emit_read(asm, RT0_HEADER + 16 * k, 16, out)
            _emit_address_differs(asm, R1, addr)
            out.mismatch(R1)

    @staticmethod
    def _emit_subsequence(m: RtMatch, asm, out) -> None:
        """The not-strict loop over the header's addresses, a bpf_loop() callback of
        this address list's own (a header holds up to 127 addresses)."""
        digest = hashlib.sha1(b"".join(m.addrs)).hexdigest()[:12]
        callback = asm.subprogram(f"rt_addrs_{len(m.addrs)}_{digest}",
                                  lambda: _emit_subsequence_step(asm, m.addrs))
        asm.emit(BPF_MOV64_REG(R8, MISMATCH), BPF_MOV64_REG(R9, HOTDROP),
                 BPF_STX_MEM(BPF_W, R6, R7, PTR),
                 BPF_LDX_MEM(BPF_W, R1, R6, HDRLEN), BPF_ALU64_IMM(I.BPF_SUB, R1, RT0_HEADER),
                 BPF_ALU64_IMM(I.BPF_RSH, R1, 4),
                 BPF_ST_MEM(BPF_W, R6, _MATCHED, 0),
                 *BPF_LD_FUNC(R2, callback), BPF_MOV64_REG(R3, R6), BPF_MOV64_IMM(R4, 0),
                 BPF_EMIT_CALL(I.BPF_FUNC_loop),
                 BPF_MOV64_REG(MISMATCH, R8), BPF_MOV64_REG(HOTDROP, R9),
                 BPF_LDX_MEM(BPF_W, R2, R6, _MATCHED),
                 BPF_MOV64_REG(R1, R2), BPF_ALU64_IMM(I.BPF_XOR, R1, _READ_FAILED))
        emit_nonzero_bit(asm, R1, R3)
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
        out.hotdrop(R1)
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R2, len(m.addrs)))
        out.mismatch(R2)

    def describe(self, m: RtMatch) -> str:
        # rt_print(); the type with %d
        parts = ["rt"]
        if m.flags & IP6T_RT_TYP:
            signed = m.rt_type - (1 << 32) if m.rt_type >= 1 << 31 else m.rt_type
            parts.append(f"type:{'!' if m.inverts(IP6T_RT_INV_TYP) else ''}{signed}")
        lo, hi = m.segsleft
        inv = m.inverts(IP6T_RT_INV_SGS)
        if lo != 0 or hi != 0xFFFFFFFF or inv:
            bang = "!" if inv else ""
            parts.append(f"segsleft:{bang}{lo}" if lo == hi else f"segslefts:{bang}{lo}:{hi}")
        if m.flags & IP6T_RT_LEN:
            parts.append(f"length:{'!' if m.inverts(IP6T_RT_INV_LEN) else ''}{m.hdrlen}")
        if m.flags & IP6T_RT_RES:
            parts.append("reserved")
        if m.flags & IP6T_RT_FST:
            parts.append("0-addrs")
        if m.addrs:
            parts.append(",".join(socket.inet_ntop(socket.AF_INET6, a) for a in m.addrs))
        if m.flags & IP6T_RT_FST_NSTRICT:
            parts.append("0-not-strict")
        return " ".join(parts)


def _not_strict(m: RtMatch) -> bool:
    return bool(m.flags & IP6T_RT_FST and m.flags & IP6T_RT_FST_NSTRICT)


def _emit_address_differs(asm, dst: int, addr: bytes) -> None:
    """dst = non-zero unless the 16 bytes at BUF are `addr`."""
    lo, hi = (int.from_bytes(addr[at:at + 8], "little") for at in (0, 8))
    asm.emit(BPF_LDX_MEM(BPF_DW, dst, R6, BUF), *BPF_LD_IMM64(R3, lo),
             BPF_ALU64_REG(I.BPF_XOR, dst, R3),
             BPF_LDX_MEM(BPF_DW, R2, R6, BUF + 8), *BPF_LD_IMM64(R3, hi),
             BPF_ALU64_REG(I.BPF_XOR, R2, R3), BPF_ALU64_REG(I.BPF_OR, dst, R2))


def _emit_subsequence_step(asm, addrs: tuple[bytes, ...]) -> None:
    """One turn of rt_mt6()'s not-strict loop, R1 = temp, R2 = &facts: the header's
    address `temp` read (else hotdrop), compared with the rule's address i, which
    it advances on a match; the loop stops once i reaches the rule's count."""
    stop, next_turn, compared = asm.label("stop"), asm.label("next_turn"), asm.label("compared")
    asm.emit(BPF_MOV64_REG(R6, R2),
             BPF_MOV64_REG(R4, R1), BPF_ALU64_IMM(I.BPF_LSH, R4, 4),
             BPF_ALU64_IMM(I.BPF_ADD, R4, RT0_HEADER),
             BPF_LDX_MEM(BPF_W, R1, R6, PTR), BPF_ALU64_REG(I.BPF_ADD, R4, R1),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, BUF),
             BPF_MOV64_IMM(R2, 16),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, next_turn),
             BPF_ST_MEM(BPF_W, R6, _MATCHED, _READ_FAILED))
    asm.place(stop)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    asm.place(next_turn)
    asm.emit(BPF_LDX_MEM(BPF_W, R7, R6, _MATCHED))
    for k, addr in enumerate(addrs):
        other = asm.label("other")
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R7, k, other))
        _emit_address_differs(asm, R1, addr)
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R1, 0, compared),
                 BPF_ALU32_IMM(I.BPF_ADD, R7, 1),
                 BPF_STX_MEM(BPF_W, R6, R7, _MATCHED),
                 BPF_JMP_A(compared))
        asm.place(other)
    asm.place(compared)
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R7, len(addrs), stop),
             BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())

