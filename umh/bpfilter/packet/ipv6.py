"""IPv6's flavour of the prologue and of a rule's ip part (ip6_tables.c's
ip6t_do_table() and ip6_packet_match()).

A rule that names a protocol (-p, `all` included) makes the kernel walk the
packet's extension headers to the upper-layer header, ipv6_find_hdr(skb, &thoff, -1,
&fragoff, NULL), and compare what it finds; when the walk fails the packet is
dropped ("hotdrop": the failing walk leaves fragoff 0). The walk depends on the
packet alone, so the prologue makes it once, with the kernel's steps:

  - hop-by-hop (0), routing (43), fragment (44), AH (51) and destination options
    (60) are extension headers; anything else, and "no next header" (59), ends the
    walk there: that is the protocol, its header at thoff;
  - each extension header's first two bytes must be readable (a routing header's
    first four, a fragment header's offset field), else -EBADMSG;
  - a fragment header with a non-zero offset ends the walk: its next header is the
    protocol, with fragoff = that offset in bytes (thoff stays 0), unless the next
    header is itself an extension header: -ENOENT;
  - a header longer than what is left of the packet is -EBADMSG on kernels with the
    stable fix "do not let ipv6_find_hdr() return an offset past the packet end";
    older ones step past the end (ipv6_probe.py asks the running kernel which).

The walk is a bpf_loop() callback: a packet may chain as many extension headers as
its length allows, and a loop unrolled for a few would not be the kernel's walk.
Packets without extension headers skip it.

The same walk records, for the matches that look for one extension header
(rt, frag, hbh, dst, ah: ipv6_find_hdr(skb, &ptr, type, NULL, NULL)), where the first
header of each type starts (fact group "exthdr"): such a search meets the headers
this walk meets, in order, and fails where it fails -EBADMSG or stops, -ENOENT.
"""
from __future__ import annotations

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_EMIT_CALL,
                        BPF_ENDIAN, BPF_EXIT_INSN, BPF_H, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG,
                        BPF_LD_FUNC, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM,
                        BPF_STX_MEM, BPF_W, FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..model import Ip6Header
from . import facts
from .facts import (DADDR, FRAGOFF, LEN, PROTO, SADDR, THOFF, TTL, Flavour,
                    KernelOffsets, emit_slice)
from .ipv6_probe import walk_bounded_by_packet
from .primitives import RuleOutcome, emit_name_equal

IPV6_HEADER = 40
NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT, NEXTHDR_AUTH = 0, 43, 44, 51
NEXTHDR_NONE, NEXTHDR_DEST = 59, 60
EXTENSION_HEADERS = (NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT, NEXTHDR_AUTH, NEXTHDR_DEST)
BPF_MAX_LOOPS = 1 << 23

# facts.FOUND holds the walk's outcome
WALK = facts.FOUND
WALKING, WALK_FOUND, WALK_ENOENT, WALK_EBADMSG = 0, 1, 2, 3

# Where the first header of each extension type starts (u32; 0: none met), and
# whether the walk ended in -EBADMSG (WALK) rather than -ENOENT.
EXTHDR = facts.reserve("exthdr", 4 * len(EXTENSION_HEADERS))
EXTHDR_OFFSET = {nexthdr: EXTHDR + 4 * i for i, nexthdr in enumerate(EXTENSION_HEADERS)}
facts.OPTIONAL["exthdr"] = lambda asm, k: None   # the walk fills it

_SCRATCH_FP = -8   # the callback's own stack: the header bytes it reads


class Ipv6(Flavour):
    def emit_network_header(self, asm, k: KernelOffsets, drop, needs: frozenset) -> None:
        walked = asm.label("walked")
        # the addresses straight into the facts (SADDR and DADDR are adjacent), the
        # rest of the header through a slice
        assert DADDR == SADDR + 16
        asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, SADDR),
                 BPF_MOV64_IMM(R2, 32),
                 BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
                 BPF_MOV64_IMM(R4, 8), BPF_MOV64_IMM(R5, 0),
                 BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
                 BPF_JMP_IMM(I.BPF_JNE, R0, 0, drop))
        emit_slice(asm, offset_reg=None, size=8)
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, 0, drop))
        asm.emit(
            BPF_LDX_MEM(BPF_B, R1, R0, 7), BPF_STX_MEM(BPF_B, R6, R1, TTL),
            BPF_LDX_MEM(BPF_B, R1, R0, 6), BPF_STX_MEM(BPF_B, R6, R1, PROTO),
            BPF_ST_MEM(BPF_W, R6, THOFF, IPV6_HEADER),
            BPF_ST_MEM(BPF_B, R6, WALK, WALK_FOUND),
        )
        walk = asm.label("walk")
        for nexthdr in EXTENSION_HEADERS:
            asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R1, nexthdr, walk))
        asm.emit(BPF_JMP_A(walked))
        asm.place(walk)
        record, bounded = "exthdr" in needs, walk_bounded_by_packet()
        callback = asm.subprogram(f"ipv6_walk{'_record' if record else ''}",
                                  lambda: _emit_walk_step(asm, record, bounded))
        clamped = asm.label("clamped")
        asm.emit(BPF_ST_MEM(BPF_B, R6, WALK, WALKING),
                 # every step moves 8 bytes on or ends the walk
                 BPF_LDX_MEM(BPF_W, R1, R6, LEN), BPF_ALU64_IMM(I.BPF_RSH, R1, 3),
                 BPF_ALU64_IMM(I.BPF_ADD, R1, 1),
                 BPF_JMP_IMM(I.BPF_JLE, R1, BPF_MAX_LOOPS, clamped),
                 BPF_MOV64_IMM(R1, BPF_MAX_LOOPS))
        asm.place(clamped)
        asm.emit(*BPF_LD_FUNC(R2, callback), BPF_MOV64_REG(R3, R6), BPF_MOV64_IMM(R4, 0),
                 BPF_EMIT_CALL(I.BPF_FUNC_loop),
                 # a walk that never ended cannot be the kernel's: fail closed
                 BPF_LDX_MEM(BPF_B, R1, R6, WALK),
                 BPF_JMP_IMM(I.BPF_JNE, R1, WALKING, walked),
                 BPF_ST_MEM(BPF_B, R6, WALK, WALK_EBADMSG))
        asm.place(walked)
        asm.emit(BPF_LDX_MEM(BPF_W, R9, R6, THOFF))

    def transport_readable(self, asm, skip) -> None:
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, WALK), BPF_JMP_IMM(I.BPF_JNE, R1, WALK_FOUND, skip),
                 BPF_LDX_MEM(BPF_H, R1, R6, FRAGOFF), BPF_JMP_IMM(I.BPF_JNE, R1, 0, skip))

    def unsupported_ip(self, ip: Ip6Header, reads_transport: bool) -> "str | None":
        # Without -p (IP6T_F_PROTO) no walk finds the transport header: the kernel's
        # match reads it at offset 0, with whatever fragment offset an earlier rule's
        # walk left. ip6tables sets IP6T_F_PROTO with every -p.
        if reads_transport and not ip.proto_given:
            return ("a match reads the transport header but the rule lacks IP6T_F_PROTO "
                    "(ip6tables sets it with every -p); the kernel would read the IPv6 "
                    "header in its place")
        return None

    def emit_ip_match(self, asm, ip: Ip6Header, out: RuleOutcome) -> None:
        # ipv6_masked_addr_cmp(): ((packet ^ addr) & mask) != 0, address bits outside
        # the mask ignored
        for prefix, off in ((ip.src, SADDR), (ip.dst, DADDR)):
            if not prefix.is_any:
                emit_name_equal(asm, off, prefix.addr, prefix.mask, prefix.invert, out)
        for iface, off in ((ip.in_iface, facts.IN_NAME), (ip.out_iface, facts.OUT_NAME)):
            if not iface.is_any:
                emit_name_equal(asm, off, iface.name, iface.mask, iface.invert, out)
        if not ip.proto_given:
            return
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, WALK), BPF_ALU64_IMM(I.BPF_XOR, R1, WALK_FOUND))
        _nonzero_bit(asm, R1)
        out.hotdrop(R1)
        # the protocol found can only be one byte: a larger one is never it
        if ip.proto == 0 or (ip.proto > 0xFF and ip.invert_proto):
            return
        if ip.proto > 0xFF:
            out.never()
            return
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, PROTO), BPF_ALU64_IMM(I.BPF_XOR, R1, ip.proto))
        if ip.invert_proto:
            _nonzero_bit(asm, R1)
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
        out.mismatch(R1)


def _nonzero_bit(asm, reg: int) -> None:
    asm.emit(BPF_MOV64_REG(R3, reg), BPF_ALU64_IMM(I.BPF_NEG, R3, 0),
             BPF_ALU64_REG(I.BPF_OR, reg, R3), BPF_ALU64_IMM(I.BPF_RSH, reg, 63))


def _emit_read(asm, size: int, failed) -> None:
    """The header bytes at the walk's offset (R8) into the callback's scratch, or on
    to `failed` when the packet has fewer."""
    asm.emit(BPF_MOV64_REG(R1, FP), BPF_ALU64_IMM(I.BPF_ADD, R1, _SCRATCH_FP),
             BPF_MOV64_IMM(R2, size),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_REG(R4, R8), BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, failed))


def _emit_walk_step(asm, record: bool, bounded: bool) -> None:
    """One step of ipv6_find_hdr(skb, &thoff, -1, &fragoff, NULL), a bpf_loop()
    callback: R2 = &facts; PROTO holds the header to look at, THOFF where it starts.
    Returns 1 once WALK says how the walk ended, 0 to go on. `bounded`: a header
    longer than the rest of the packet ends the walk (-EBADMSG)."""
    found, enoent, badmsg = asm.label("found"), asm.label("enoent"), asm.label("badmsg")
    extension, sized = asm.label("extension"), asm.label("sized")
    asm.emit(BPF_MOV64_REG(R6, R2),
             BPF_LDX_MEM(BPF_B, R7, R6, PROTO),
             BPF_LDX_MEM(BPF_W, R8, R6, THOFF))
    for nexthdr in EXTENSION_HEADERS:
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R7, nexthdr, extension))
    asm.emit(BPF_JMP_A(found))
    asm.place(extension)
    _emit_read(asm, 2, badmsg)
    long_read, read = asm.label("long_read"), asm.label("read")
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R7, NEXTHDR_ROUTING, long_read),
             BPF_JMP_IMM(I.BPF_JNE, R7, NEXTHDR_FRAGMENT, read))
    asm.place(long_read)
    # struct ipv6_rt_hdr, and frag_hdr up to frag_off
    _emit_read(asm, 4, badmsg)
    asm.place(read)
    if record:
        # the first header of its type keeps its offset, in every slot at every turn
        # without a branch: slot |= R8 if the slot is empty and R7 is its type. A
        # branch would leave the verifier a state per set of types met so far, and
        # bpf_loop()'s turns converge only once the states repeat.
        for nexthdr, slot in EXTHDR_OFFSET.items():
            asm.emit(BPF_MOV64_REG(R2, R7), BPF_ALU64_IMM(I.BPF_XOR, R2, nexthdr),
                     BPF_LDX_MEM(BPF_W, R1, R6, slot), BPF_ALU64_REG(I.BPF_OR, R2, R1))
            _nonzero_bit(asm, R2)
            # R2: 0 to record, 1 not to; then all ones or nothing
            asm.emit(BPF_ALU64_IMM(I.BPF_SUB, R2, 1), BPF_ALU64_REG(I.BPF_AND, R2, R8),
                     BPF_ALU64_REG(I.BPF_OR, R1, R2), BPF_STX_MEM(BPF_W, R6, R1, slot))
    not_fragment, not_auth = asm.label("not_fragment"), asm.label("not_auth")
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R7, NEXTHDR_FRAGMENT, not_fragment),
             BPF_LDX_MEM(BPF_H, R1, FP, _SCRATCH_FP + 2), BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
             BPF_ALU64_IMM(I.BPF_AND, R1, 0xFFF8),
             BPF_MOV64_IMM(R3, 8),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, sized),
             # a later fragment: its next header is the protocol, unless it is an
             # extension header again
             BPF_LDX_MEM(BPF_B, R2, FP, _SCRATCH_FP))
    for nexthdr in EXTENSION_HEADERS:
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R2, nexthdr, enoent))
    asm.emit(BPF_STX_MEM(BPF_B, R6, R2, PROTO),
             BPF_STX_MEM(BPF_H, R6, R1, FRAGOFF),
             BPF_ST_MEM(BPF_W, R6, THOFF, 0),
             BPF_JMP_A(found))
    asm.place(not_fragment)
    # ipv6_authlen() counts 4-byte words plus 2, ipv6_optlen() 8-byte ones plus 1
    asm.emit(BPF_LDX_MEM(BPF_B, R3, FP, _SCRATCH_FP + 1),
             BPF_JMP_IMM(I.BPF_JNE, R7, NEXTHDR_AUTH, not_auth),
             BPF_ALU64_IMM(I.BPF_ADD, R3, 2), BPF_ALU64_IMM(I.BPF_LSH, R3, 2),
             BPF_JMP_A(sized))
    asm.place(not_auth)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, 1), BPF_ALU64_IMM(I.BPF_LSH, R3, 3))
    asm.place(sized)
    # R3 = the header's length: the packet must hold it (skb->len - start < hdrlen)
    if bounded:
        asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, LEN), BPF_ALU64_REG(I.BPF_SUB, R1, R8),
                 BPF_JMP_REG(I.BPF_JLT, R1, R3, badmsg))
    asm.emit(BPF_LDX_MEM(BPF_B, R1, FP, _SCRATCH_FP), BPF_STX_MEM(BPF_B, R6, R1, PROTO),
             # THOFF in two halves: the verifier keeps no range for a word written in
             # parts, so bpf_loop()'s turns converge at once rather than as the
             # offset's range widens turn by turn
             BPF_ALU64_REG(I.BPF_ADD, R8, R3), BPF_STX_MEM(BPF_H, R6, R8, THOFF),
             BPF_ALU64_IMM(I.BPF_RSH, R8, 16), BPF_STX_MEM(BPF_H, R6, R8, THOFF + 2),
             BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    for label, outcome in ((found, WALK_FOUND), (enoent, WALK_ENOENT), (badmsg, WALK_EBADMSG)):
        asm.place(label)
        asm.emit(BPF_ST_MEM(BPF_B, R6, WALK, outcome), BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())


IPV6 = Ipv6()
