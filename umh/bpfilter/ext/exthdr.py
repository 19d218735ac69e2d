"""What the matches reading one header share: finding an IPv6 extension header as
ipv6_find_hdr(skb, &ptr, TYPE, NULL, NULL) does (rt, frag, hbh and dst, ah), and
reading bytes of a header, found so or at par->thoff (esp, mh, IPv4's ah), as the
kernel's skb_header_pointer() does.

The search is answered from the prologue's walk (packet/ipv6.py, fact group
"exthdr"): it meets the same headers in the same order as the search does, records
where the first of each type starts, and ends where the search would fail. Read
against net/ipv6/exthdrs_core.c, a search for TYPE:

  - meets every header before the first TYPE with exactly the walk's reads and
    length checks, so it fails -EBADMSG where the walk does, and stops -ENOENT at
    the protocol, at "no next header" or at a later fragment, where the walk stops;
  - on the header it is looking for, reads its first two bytes (a routing header's
    first four, a fragment header's offset: the walk's reads, made before it
    records the header) and stops there: that header's own length is not checked
    (the walk checks it after recording, and may fail -EBADMSG there, too late to
    change the answer); whether the length check exists at all depends on the
    kernel (ipv6_probe.py), and the walk makes it exactly when the kernel does;
  - a later fragment ends it at the fragment header: found if TYPE is the fragment
    header, -ENOENT otherwise, whatever comes next; the walk records the fragment
    header before it stops there.

So: found = EXTHDR_OFFSET[TYPE] != 0; else -EBADMSG (the match hotdrops) when the
walk failed so, -ENOENT (it just fails) otherwise.

Each match's code runs branch-free into the rule's outcome: a header not found fails
the match, so reading at offset 0 then and testing what was read changes nothing;
a read past the packet's end sets the hotdrop, which a test failing before it in the
kernel's order outranks (RuleOutcome). Register use: R7 holds where the header
starts, R8 and R9 carry the outcome (R4, R5) through helper calls.
"""
from __future__ import annotations

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_EMIT_CALL, BPF_LDX_MEM,
                        BPF_MOV64_IMM, BPF_MOV64_REG, BPF_STX_MEM, BPF_W, R0, R1, R2, R3, R4,
                        R5, R6, R7, R8, R9)
from ..packet import facts, ipv6
from ..packet.primitives import HOTDROP, MISMATCH, RuleOutcome, emit_nonzero_bit

# The bytes a match read, and what it derived from them for later tests.
_REGION = facts.reserve("exthdr_read", 24)
BUF = _REGION              # 16 bytes: the last read (an address is the longest)
HDRLEN = _REGION + 16      # u32: the header's length in bytes
PTR = _REGION + 20         # u32: where the header starts, for loops over its contents

READS = frozenset({"exthdr_read"})
SEARCHES = frozenset({"exthdr"}) | READS


def emit_find(asm, nexthdr: int, out: RuleOutcome) -> None:
    """R7 = ipv6_find_hdr(skb, &ptr, nexthdr, NULL, NULL)'s ptr, or 0 when it failed:
    -EBADMSG hotdrops, -ENOENT fails the match (`if (err != -ENOENT) par->hotdrop`)."""
    asm.emit(BPF_LDX_MEM(BPF_W, R7, R6, ipv6.EXTHDR_OFFSET[nexthdr]),
             BPF_MOV64_REG(R1, R7))
    emit_nonzero_bit(asm, R1, R3)
    asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1),                       # R1: not found
             BPF_LDX_MEM(BPF_B, R2, R6, ipv6.WALK),
             BPF_ALU64_IMM(I.BPF_XOR, R2, ipv6.WALK_EBADMSG))
    emit_nonzero_bit(asm, R2, R3)
    asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R2, 1), BPF_ALU64_REG(I.BPF_AND, R2, R1))
    out.hotdrop(R2)
    out.mismatch(R1)


def emit_thoff(asm) -> None:
    """R7 = par->thoff: where ip(6)_packet_match() found the transport header."""
    asm.emit(BPF_LDX_MEM(BPF_W, R7, R6, facts.THOFF))


def emit_read(asm, at: int, size: int, out: RuleOutcome, dst=BUF, short_fails=False) -> None:
    """`size` bytes from R7 + `at` into `dst` (a facts Slot); skb_header_pointer()
    returning NULL, the packet being shorter, makes the kernel's match hotdrop, or
    with `short_fails` just fail."""
    assert size <= 16 or dst is not BUF
    asm.emit(BPF_MOV64_REG(R8, MISMATCH), BPF_MOV64_REG(R9, HOTDROP),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, dst),
             BPF_MOV64_IMM(R2, size),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_REG(R4, R7), BPF_ALU64_IMM(I.BPF_ADD, R4, at),
             BPF_MOV64_IMM(R5, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_MOV64_REG(MISMATCH, R8), BPF_MOV64_REG(HOTDROP, R9),
             BPF_MOV64_REG(R1, R0))
    emit_nonzero_bit(asm, R1, R3)
    if short_fails:
        out.mismatch(R1)
    else:
        out.hotdrop(R1)


def emit_length(asm, unit: int, extra: int) -> None:
    """HDRLEN = (BUF[1] + extra) * unit: ipv6_optlen() (8, 1), ipv6_authlen() (4, 2);
    leaves it in R2."""
    asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, BUF + 1), BPF_ALU64_IMM(I.BPF_ADD, R2, extra),
             BPF_ALU64_IMM(I.BPF_MUL, R2, unit),
             BPF_STX_MEM(BPF_W, R6, R2, HDRLEN))


def emit_fits(asm, out: RuleOutcome) -> None:
    """`if (skb->len - ptr < hdrlen)`, HDRLEN from the header at R7: a header
    claiming more than the packet holds hotdrops ("Packet smaller than its length
    field"). When the header was read, ptr < skb->len: no unsigned wrap to mimic."""
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_ALU64_REG(I.BPF_SUB, R1, R7),
             BPF_LDX_MEM(BPF_W, R2, R6, HDRLEN), BPF_ALU64_REG(I.BPF_SUB, R1, R2),
             BPF_ALU64_IMM(I.BPF_RSH, R1, 63))
    out.hotdrop(R1)
