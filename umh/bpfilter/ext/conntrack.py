"""-m conntrack (struct xt_conntrack_mtinfo1/2/3) and -m state (struct xt_state_info).

Connection tracking is the kernel's: at the filter hooks nf_conntrack has already
attached its entry to the skb (skb->_nfct: the nf_conn pointer with the ctinfo in its
low 3 bits), exactly what xt_conntrack/xt_state read. The "ct" fact group copies the
parts the matches look at out of that entry once per packet, at offsets taken from
BTF. Conntrack only runs in a namespace that asked for it: the service keeps it on
while a table uses these matches (see bpfilter.conntrack), as checkentry's
nf_ct_netns_get() does for the kernel's iptables.

iptables-legacy sends `-m state` as conntrack revision 3 with the STATE_ALIAS flag;
xt_state itself (revision 0) is kept for other senders.

Both are one registration for every family in the kernel (NFPROTO_UNSPEC); what
differs per family is only the tuples' addresses (union nf_inet_addr: IPv4 compares
its first 4 bytes, IPv6 all 16), so each family has its own fact group, "ct" or
"ct6", which read the same entry into the same "ct" region and the addresses into
a region of the family's own (CtFamily).
"""
from __future__ import annotations

import errno
import functools
import socket
from dataclasses import dataclass

from construct import Bytes, Int8un, Int16un, Int32un, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW,
                        BPF_EMIT_CALL, BPF_ENDIAN, BPF_H, BPF_JMP32_IMM, BPF_JMP_A, BPF_JMP_IMM,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, FP, R0, R1, R2, R3, R6, R7)
from ..packet import facts
from ..packet.primitives import (MISMATCH, emit_masked_equal, emit_name_equal,
                                 emit_nonzero_bit, emit_range)
from ..errors import BpfilterError
from ..model import Family, Match
from . import BOTH_FAMILIES, MatchExtension, register_match
from .limit import kernel_hz

# enum ip_conntrack_info / ip_conntrack_status (include/uapi/linux/netfilter/nf_conntrack_common.h)
IP_CT_IS_REPLY = 3
IP_CT_UNTRACKED = 7
NFCT_INFOMASK = 7
IPS_SRC_NAT, IPS_DST_NAT = 1 << 4, 1 << 5

# xt_state.h / xt_conntrack.h state bits: INVALID, then one per ctinfo, then extras.
STATE_INVALID = 1 << 0
XT_STATE_UNTRACKED = 1 << 6
CT_STATE_SNAT, CT_STATE_DNAT, CT_STATE_UNTRACKED = 1 << 6, 1 << 7, 1 << 8
STATE_NAMES = ((STATE_INVALID, "INVALID"), (1 << 1, "ESTABLISHED"), (1 << 2, "RELATED"),
               (1 << 3, "NEW"))

(XT_CONNTRACK_STATE, XT_CONNTRACK_PROTO, XT_CONNTRACK_ORIGSRC, XT_CONNTRACK_ORIGDST,
 XT_CONNTRACK_REPLSRC, XT_CONNTRACK_REPLDST, XT_CONNTRACK_STATUS, XT_CONNTRACK_EXPIRES,
 XT_CONNTRACK_ORIGSRC_PORT, XT_CONNTRACK_ORIGDST_PORT, XT_CONNTRACK_REPLSRC_PORT,
 XT_CONNTRACK_REPLDST_PORT, XT_CONNTRACK_DIRECTION, XT_CONNTRACK_STATE_ALIAS) = (
    1 << n for n in range(14))

# The "ct" region, filled by the "ct" (IPv4) or "ct6" (IPv6) fact group.
CT_SIZE = 88
CT = facts.reserve("ct", CT_SIZE)
CT_PRESENT = CT          # u8: the skb has a conntrack entry (nf_ct_get() != NULL)
CT_REPLY = CT + 1        # u8: CTINFO2DIR(ctinfo) == IP_CT_DIR_REPLY
CT_STATE_BIT = CT + 2    # u16: xt_state's statebit
CT_CT_BIT = CT + 4       # u16: xt_conntrack's statebit, SNAT/DNAT bits included
CT_PROTO = CT + 6        # u8: nf_ct_protonum()
CT_STATUS = CT + 8       # u32: ct->status (its bits all fit)
CT_EXPIRES = CT + 12     # u32: ct->timeout (jiffies); seconds left with "ct_expires"
CT_PORTS = CT + 16       # u16 x 4 host order: orig src, orig dst, reply src, reply dst
CT_ADDRS = CT + 24       # IPv4: u32 x 4 as on the wire: orig src, orig dst, reply src, reply dst
CT_TUPLE_BUF = CT + 40   # one struct nf_conntrack_tuple, read from the kernel
TUPLE_BUF_SIZE = 48
# IPv6: 16 bytes x 4 as on the wire, the same order
CT6_ADDRS = facts.reserve("ct6", 64)


@dataclass(frozen=True)
class CtOffsets:
    nfct: int
    status: int
    tuple: tuple[int, int]   # &ct->tuplehash[dir].tuple
    tuple_size: int
    src_ip: int
    src_port: int
    dst_ip: int
    dst_port: int
    protonum: int
    timeout: int

    @classmethod
    def from_btf(cls, btf: Btf) -> "CtOffsets":
        hash_off, hash_size = btf.member("nf_conn", "tuplehash")
        entry_size = btf.struct_size("nf_conntrack_tuple_hash")
        tuple_off = btf.member("nf_conntrack_tuple_hash", "tuple")[0]
        return cls(
            nfct=btf.member("sk_buff", "_nfct")[0],
            status=btf.member("nf_conn", "status")[0],
            tuple=(hash_off + tuple_off, hash_off + entry_size + tuple_off),
            tuple_size=btf.struct_size("nf_conntrack_tuple"),
            src_ip=btf.member("nf_conntrack_tuple", "src.u3")[0],
            src_port=btf.member("nf_conntrack_tuple", "src.u.all")[0],
            dst_ip=btf.member("nf_conntrack_tuple", "dst.u3")[0],
            dst_port=btf.member("nf_conntrack_tuple", "dst.u.all")[0],
            protonum=btf.member("nf_conntrack_tuple", "dst.protonum")[0],
            timeout=btf.member("nf_conn", "timeout")[0],
        )


@functools.lru_cache(maxsize=1)
def ct_offsets() -> CtOffsets:
    # struct nf_conn is in vmlinux's BTF when built-in code uses it, else only in the
    # nf_conntrack module's (split on vmlinux's, so sk_buff is found there too).
    try:
        offsets = CtOffsets.from_btf(Btf.vmlinux())
    except BtfError as in_vmlinux:
        try:
            offsets = CtOffsets.from_btf(Btf.module("nf_conntrack"))
        except BtfError as in_module:
            raise BpfilterError(errno.EOPNOTSUPP, f"conntrack matches need struct nf_conn in "
                                                  f"the kernel's BTF ({in_vmlinux}; {in_module}); "
                                                  "the whole table is refused") from None
    if offsets.tuple_size > TUPLE_BUF_SIZE:
        raise BpfilterError(errno.EOPNOTSUPP, f"struct nf_conntrack_tuple is {offsets.tuple_size} "
                                              f"bytes, bpfilter reads at most {TUPLE_BUF_SIZE}")
    return offsets


_CT_SLOT = facts.SLICE_FP   # the slice scratch is free while the prologue reads conntrack


def _probe_read(asm, dst_off: int, size: int, src_off: int) -> None:
    """bpf_probe_read_kernel(facts + dst_off, size, ct + src_off): nf_conn is not a
    type the verifier lets netfilter programs dereference."""
    asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, dst_off),
             BPF_MOV64_IMM(R2, size),
             BPF_LDX_MEM(BPF_DW, R3, FP, _CT_SLOT), BPF_ALU64_IMM(I.BPF_ADD, R3, src_off),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel))


def emit_ct_facts(asm, k, copy_addresses) -> None:
    """nf_ct_get(skb, &ctinfo), then the entry's state bits, status and both tuples,
    whose addresses `copy_addresses(asm, offsets, direction)` takes from CT_TUPLE_BUF.
    Runs in the prologue with R7 = skb; keeps R8 and R9."""
    o = ct_offsets()
    no_ct, original, done = asm.label("no_ct"), asm.label("ct_original"), asm.label("ct_done")
    asm.emit(
        BPF_LDX_MEM(BPF_DW, R1, R7, o.nfct),
        BPF_MOV64_REG(R2, R1), BPF_ALU64_IMM(I.BPF_AND, R2, NFCT_INFOMASK),
        BPF_ALU64_IMM(I.BPF_AND, R1, ~NFCT_INFOMASK),
        BPF_JMP_IMM(I.BPF_JEQ, R1, 0, no_ct),
        BPF_STX_MEM(BPF_DW, FP, R1, _CT_SLOT),
        BPF_ST_MEM(BPF_B, R6, CT_PRESENT, 1),
        # statebit = 1 << (ctinfo % IP_CT_IS_REPLY + 1)
        BPF_JMP_IMM(I.BPF_JLT, R2, IP_CT_IS_REPLY, original),
        BPF_ST_MEM(BPF_B, R6, CT_REPLY, 1),
        BPF_ALU64_IMM(I.BPF_SUB, R2, IP_CT_IS_REPLY),
    )
    asm.place(original)
    asm.emit(
        BPF_ALU64_IMM(I.BPF_ADD, R2, 1),
        BPF_MOV64_IMM(R3, 1), BPF_ALU64_REG(I.BPF_LSH, R3, R2),
        BPF_STX_MEM(BPF_H, R6, R3, CT_STATE_BIT),
        BPF_STX_MEM(BPF_H, R6, R3, CT_CT_BIT),
    )
    _probe_read(asm, CT_STATUS, 4, o.status)
    _probe_read(asm, CT_EXPIRES, 4, o.timeout)
    # xt_conntrack adds SNAT/DNAT from the status: bits 4 and 5 become state bits 6 and 7
    asm.emit(
        BPF_LDX_MEM(BPF_W, R1, R6, CT_STATUS),
        BPF_ALU64_IMM(I.BPF_AND, R1, IPS_SRC_NAT | IPS_DST_NAT),
        BPF_ALU64_IMM(I.BPF_LSH, R1, 2),
        BPF_LDX_MEM(BPF_H, R2, R6, CT_CT_BIT), BPF_ALU64_REG(I.BPF_OR, R2, R1),
        BPF_STX_MEM(BPF_H, R6, R2, CT_CT_BIT),
    )
    for direction, tuple_off in enumerate(o.tuple):
        _probe_read(asm, CT_TUPLE_BUF, o.tuple_size, tuple_off)
        copy_addresses(asm, o, direction)
        for i, field in enumerate((o.src_port, o.dst_port)):
            asm.emit(BPF_LDX_MEM(BPF_H, R1, R6, CT_TUPLE_BUF + field),
                     BPF_ENDIAN(I.BPF_TO_BE, R1, 16),
                     BPF_STX_MEM(BPF_H, R6, R1, CT_PORTS + 4 * direction + 2 * i))
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, CT_TUPLE_BUF + o.protonum),  # reply's = original's
             BPF_STX_MEM(BPF_B, R6, R1, CT_PROTO),
             BPF_JMP_A(done))
    asm.place(no_ct)
    untracked = asm.label("ct_untracked")
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R2, IP_CT_UNTRACKED, untracked),
             BPF_ST_MEM(BPF_H, R6, CT_STATE_BIT, STATE_INVALID),
             BPF_ST_MEM(BPF_H, R6, CT_CT_BIT, STATE_INVALID),
             BPF_JMP_A(done))
    asm.place(untracked)
    asm.emit(BPF_ST_MEM(BPF_H, R6, CT_STATE_BIT, XT_STATE_UNTRACKED),
             BPF_ST_MEM(BPF_H, R6, CT_CT_BIT, CT_STATE_UNTRACKED))
    asm.place(done)


def _copy_addresses(asm, o: CtOffsets, direction: int) -> None:
    """IPv4: the first 4 bytes of each union nf_inet_addr."""
    for i, field in enumerate((o.src_ip, o.dst_ip)):
        asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, CT_TUPLE_BUF + field),
                 BPF_STX_MEM(BPF_W, R6, R1, CT_ADDRS + 8 * direction + 4 * i))


def _copy_addresses6(asm, o: CtOffsets, direction: int) -> None:
    """IPv6: all 16 bytes, 4 at a time (the tuple's dst.u3 is only 4-aligned, and
    stack accesses must be aligned)."""
    for i, field in enumerate((o.src_ip, o.dst_ip)):
        for word in range(0, 16, 4):
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, CT_TUPLE_BUF + field + word),
                     BPF_STX_MEM(BPF_W, R6, R1, CT6_ADDRS + 32 * direction + 16 * i + word))


facts.OPTIONAL["ct"] = lambda asm, k: emit_ct_facts(asm, k, _copy_addresses)
facts.OPTIONAL["ct6"] = lambda asm, k: emit_ct_facts(asm, k, _copy_addresses6)
facts.REGIONS_OF["ct6"] = ("ct", "ct6")
facts.READ_CONNTRACK.update({"ct", "ct6"})


def emit_ct_expires(asm, k) -> None:
    """nf_ct_expires(ct) / HZ, what --ctexpire compares: the timeout's distance from
    the u32 jiffies as an s32, never below 0. Runs after the "ct" group."""
    done, expired = asm.label("expires_done"), asm.label("expired")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, CT_PRESENT),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, done),
             BPF_EMIT_CALL(I.BPF_FUNC_jiffies64),
             BPF_LDX_MEM(BPF_W, R1, R6, CT_EXPIRES),
             BPF_ALU32_REG(I.BPF_SUB, R1, R0),
             BPF_JMP32_IMM(I.BPF_JSLT, R1, 0, expired),
             BPF_ALU32_IMM(I.BPF_DIV, R1, kernel_hz()),
             BPF_STX_MEM(BPF_W, R6, R1, CT_EXPIRES),
             BPF_JMP_A(done))
    asm.place(expired)
    asm.emit(BPF_ST_MEM(BPF_W, R6, CT_EXPIRES, 0))
    asm.place(done)


facts.OPTIONAL["ct_expires"] = emit_ct_expires


def _emit_any_bit(asm, off: int, size, mask: int, invert: bool, out) -> None:
    """Holds iff ((field & mask) != 0) != invert: how both matches test state and status."""
    asm.emit(BPF_LDX_MEM(size, R1, R6, off),
             BPF_ALU64_IMM(I.BPF_AND, R1, mask))
    emit_nonzero_bit(asm, R1, R3)
    if not invert:
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
    out.mismatch(R1)


def _state_names(mask: int, untracked_bit: int) -> str:
    names = [n for bit, n in ((STATE_INVALID, "INVALID"), (1 << 3, "NEW"), (1 << 2, "RELATED"),
                              (1 << 1, "ESTABLISHED"), (untracked_bit, "UNTRACKED")) if mask & bit]
    if untracked_bit == CT_STATE_UNTRACKED:
        names += [n for bit, n in ((CT_STATE_SNAT, "SNAT"), (CT_STATE_DNAT, "DNAT")) if mask & bit]
    return ",".join(names)


@dataclass(frozen=True)
class StateMatch(Match):
    mask: int
    name = "state"
    revision = 0


@dataclass(frozen=True)
class Address:
    addr: bytes   # union nf_inet_addr as on the wire (16 bytes; IPv4 uses the first 4)
    mask: bytes
    invert: bool


class CtFamily:
    """What conntrack matches do differently per family: the fact group that reads
    the tuples' addresses, their compare (conntrack_addrcmp()) and their text
    (libxt_conntrack's conntrack_dump_addr())."""

    group = "ct"
    family, size = socket.AF_INET, 4

    def emit_address(self, asm, i: int, address: Address, out) -> None:
        # ((kaddr->ip ^ uaddr->ip) & umask->ip) == 0
        addr, mask = (int.from_bytes(b[:4], "little") for b in (address.addr, address.mask))
        emit_masked_equal(asm, CT_ADDRS + 4 * i, 4, mask, addr & mask, address.invert, out)

    def text(self, address: Address) -> str:
        # xtables_ipaddr_to_numeric() / xtables_ip6addr_to_numeric() are inet_ntop():
        # glibc's spells ::102:304 as ::1.2.3.4, which Python's ipaddress does not
        addr, mask = address.addr[:self.size], address.mask[:self.size]
        return socket.inet_ntop(self.family, addr) + self._mask_text(mask)

    def _mask_text(self, mask: bytes) -> str:
        """xtables_ipmask_to_numeric() / xtables_ip6mask_to_numeric(): nothing for a
        host mask, /N for a prefix, the mask itself otherwise."""
        bits, width = int.from_bytes(mask, "big"), 8 * len(mask)
        length = bin(bits).count("1")
        if bits != ((1 << length) - 1) << (width - length):
            return "/" + socket.inet_ntop(self.family, mask)
        return "" if length == width else f"/{length}"


class CtFamily6(CtFamily):
    group = "ct6"
    family, size = socket.AF_INET6, 16

    def emit_address(self, asm, i: int, address: Address, out) -> None:
        # ipv6_masked_addr_cmp(kaddr, umask, uaddr) == 0: ((k ^ u) & m) over 16 bytes
        emit_name_equal(asm, CT6_ADDRS + 16 * i, address.addr, address.mask, address.invert,
                        out)


CT_FAMILIES = {Family.IPV4: CtFamily(), Family.IPV6: CtFamily6()}


@register_match
class State(MatchExtension):
    name = "state"
    families = BOTH_FAMILIES
    family_independent = True
    struct = Struct("statemask" / Int32un)

    def facts_of(self, match) -> frozenset[str]:
        return frozenset({CT_FAMILIES[self.family].group})

    def decode(self, payload: bytes, where: str) -> StateMatch:
        ct_offsets()
        return StateMatch(self.packed.unpack_from(payload)[0])

    def emit(self, match: StateMatch, asm, out) -> None:
        # state_mt() returns statemask & statebit; the bit fits in 16 bits
        if match.mask & 0xFFFF == 0:
            out.never()
            return
        _emit_any_bit(asm, CT_STATE_BIT, BPF_H, match.mask & 0xFFFF, False, out)

    def describe(self, match: StateMatch) -> str:
        return "state " + _state_names(match.mask, XT_STATE_UNTRACKED)


@dataclass(frozen=True)
class ConntrackMatch(Match):
    flags: int
    invert: int
    state_mask: int
    status_mask: int
    l4proto: int
    addrs: tuple[Address, ...]                  # orig src, orig dst, reply src, reply dst
    ports: tuple[tuple[int, int], ...]          # (lo, hi) host order, same order
    expires: tuple[int, int] = (0, 0)           # seconds, min and max
    revision: int = 3
    name = "conntrack"

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def inverts(self, flag: int) -> bool:
        return bool(self.invert & flag)


_ADDR_FLAGS = (XT_CONNTRACK_ORIGSRC, XT_CONNTRACK_ORIGDST, XT_CONNTRACK_REPLSRC,
               XT_CONNTRACK_REPLDST)
_PORT_FLAGS = (XT_CONNTRACK_ORIGSRC_PORT, XT_CONNTRACK_ORIGDST_PORT, XT_CONNTRACK_REPLSRC_PORT,
               XT_CONNTRACK_REPLDST_PORT)
_DIRECTIONS = ("origsrc", "origdst", "replsrc", "repldst")
_ADDR_NAMES = ("ctorigsrc", "ctorigdst", "ctreplsrc", "ctrepldst")
_PORT_NAMES = ("ctorigsrcport", "ctorigdstport", "ctreplsrcport", "ctrepldstport")
_STATUS_NAMES = ((1 << 0, "EXPECTED"), (1 << 1, "SEEN_REPLY"), (1 << 2, "ASSURED"),
                 (1 << 3, "CONFIRMED"))


def _mtinfo(revision: int) -> Struct:
    """xt_conntrack_mtinfo1/2/3: addresses and masks as union nf_inet_addr (16 bytes)."""
    fields = [f / Bytes(16) for f in ("origsrc_addr", "origsrc_mask", "origdst_addr",
                                      "origdst_mask", "replsrc_addr", "replsrc_mask",
                                      "repldst_addr", "repldst_mask")]
    mask = Int8un if revision == 1 else Int16un
    fields += ["expires_min" / Int32un, "expires_max" / Int32un, "l4proto" / Int16un]
    fields += [f / Int16un for f in ("origsrc_port", "origdst_port", "replsrc_port", "repldst_port")]
    fields += ["match_flags" / Int16un, "invert_flags" / Int16un, "state_mask" / mask,
               "status_mask" / mask]
    if revision == 3:
        fields += [f / Int16un for f in ("origsrc_port_high", "origdst_port_high",
                                         "replsrc_port_high", "repldst_port_high")]
    return Struct(*fields)


class _Conntrack(MatchExtension):
    name = "conntrack"
    families = BOTH_FAMILIES
    family_independent = True

    def __init__(self, family: Family):
        super().__init__(family)
        self.ct_family = CT_FAMILIES[family]

    def decode(self, payload: bytes, where: str) -> ConntrackMatch:
        ct_offsets()
        p = self.struct.parse(payload)
        if p.match_flags & XT_CONNTRACK_EXPIRES:
            kernel_hz()   # refuses the table if the seconds cannot be counted as the kernel does
        addrs = tuple(Address(p[f"{d}_addr"], p[f"{d}_mask"], bool(p.invert_flags & flag))
                      for d, flag in zip(_DIRECTIONS, _ADDR_FLAGS))
        if self.revision == 3:
            ports = tuple((p[f"{d}_port"], p[f"{d}_port_high"]) for d in _DIRECTIONS)
        else:   # one __be16 port, compared as such with the tuple's
            ports = tuple((_ntohs(p[f"{d}_port"]),) * 2 for d in _DIRECTIONS)
        return ConntrackMatch(revision=self.revision, flags=p.match_flags,
                              invert=p.invert_flags, state_mask=p.state_mask,
                              status_mask=p.status_mask, l4proto=p.l4proto, addrs=addrs,
                              ports=ports, expires=(p.expires_min, p.expires_max))

    def facts_of(self, match: ConntrackMatch) -> frozenset[str]:
        return frozenset({self.ct_family.group}
                         | ({"ct_expires"} if match.has(XT_CONNTRACK_EXPIRES) else set()))

    def emit(self, match: ConntrackMatch, asm, out) -> None:
        """conntrack_mt(): the state test holds for every packet; the others need an
        entry, and without one the match holds only if it tests the state."""
        saved = R7
        asm.emit(BPF_MOV64_REG(saved, MISMATCH), BPF_MOV64_IMM(MISMATCH, 0))
        if match.has(XT_CONNTRACK_STATE):
            _emit_any_bit(asm, CT_CT_BIT, BPF_H, match.state_mask, match.inverts(XT_CONNTRACK_STATE), out)
            asm.emit(BPF_ALU64_REG(I.BPF_OR, saved, MISMATCH), BPF_MOV64_IMM(MISMATCH, 0))
        others = self._emit_entry_tests(match, asm, out)
        if match.has(XT_CONNTRACK_STATE):
            if others:
                emit_nonzero_bit(asm, MISMATCH, R3)
                asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, CT_PRESENT),
                         BPF_ALU64_REG(I.BPF_AND, MISMATCH, R1))
        else:
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, CT_PRESENT), BPF_ALU64_IMM(I.BPF_XOR, R1, 1),
                     BPF_ALU64_REG(I.BPF_OR, MISMATCH, R1))
        asm.emit(BPF_ALU64_REG(I.BPF_OR, MISMATCH, saved))

    def _emit_entry_tests(self, match: ConntrackMatch, asm, out) -> bool:
        """The tests that read the entry, in conntrack_mt()'s order; False if none."""
        emitted = False
        if match.has(XT_CONNTRACK_DIRECTION):
            # (CTINFO2DIR(ctinfo) == IP_CT_DIR_ORIGINAL) ^ !invert fails the match
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, CT_REPLY))
            if match.inverts(XT_CONNTRACK_DIRECTION):
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
            out.mismatch(R1)
            emitted = True
        for i, (flag, addr) in enumerate(zip(_ADDR_FLAGS, match.addrs)):
            if match.has(flag):
                self.ct_family.emit_address(asm, i, addr, out)
                emitted = True
        if match.has(XT_CONNTRACK_PROTO):
            invert = match.inverts(XT_CONNTRACK_PROTO)
            if match.l4proto > 0xFF:   # a u16 that no u8 protonum equals
                if not invert:
                    out.never()
            else:
                emit_masked_equal(asm, CT_PROTO, 1, 0xFF, match.l4proto, invert, out)
            emitted = True
        for i, (flag, (lo, hi)) in enumerate(zip(_PORT_FLAGS, match.ports)):
            if match.has(flag):
                emit_range(asm, CT_PORTS + 2 * i, 2, lo, hi, match.inverts(flag), out)
                emitted = True
        if match.has(XT_CONNTRACK_STATUS):
            _emit_any_bit(asm, CT_STATUS, BPF_W, match.status_mask, match.inverts(XT_CONNTRACK_STATUS), out)
            emitted = True
        if match.has(XT_CONNTRACK_EXPIRES):
            emit_range(asm, CT_EXPIRES, 4, *match.expires, match.inverts(XT_CONNTRACK_EXPIRES), out)
            emitted = True
        return emitted

    def describe(self, match: ConntrackMatch) -> str:
        parts = []
        if match.has(XT_CONNTRACK_STATE):
            bang = "! " if match.inverts(XT_CONNTRACK_STATE) else ""
            word = "state" if match.has(XT_CONNTRACK_STATE_ALIAS) else "ctstate"
            parts.append(f"{bang}{word} {_state_names(match.state_mask, CT_STATE_UNTRACKED)}")
        if match.has(XT_CONNTRACK_PROTO):
            bang = "! " if match.inverts(XT_CONNTRACK_PROTO) else ""
            parts.append(f"{bang}ctproto {match.l4proto}")
        for flag, name, addr in zip(_ADDR_FLAGS, _ADDR_NAMES, match.addrs):
            if match.has(flag):
                bang = "! " if addr.invert else ""
                parts.append(f"{bang}{name} {self.ct_family.text(addr)}")
        for flag, name, (lo, hi) in zip(_PORT_FLAGS, _PORT_NAMES, match.ports):
            if match.has(flag):
                bang = "! " if match.inverts(flag) else ""
                parts.append(f"{bang}{name} {lo}" + (f":{hi}" if hi != lo else ""))
        if match.has(XT_CONNTRACK_STATUS):
            bang = "! " if match.inverts(XT_CONNTRACK_STATUS) else ""
            names = [n for bit, n in _STATUS_NAMES if match.status_mask & bit] or ["NONE"]
            parts.append(f"{bang}ctstatus {','.join(names)}")
        if match.has(XT_CONNTRACK_EXPIRES):
            bang = "! " if match.inverts(XT_CONNTRACK_EXPIRES) else ""
            lo, hi = match.expires
            parts.append(f"{bang}ctexpire {lo}" + (f":{hi}" if hi != lo else ""))
        if match.has(XT_CONNTRACK_DIRECTION):
            parts.append("ctdir " + ("REPLY" if match.inverts(XT_CONNTRACK_DIRECTION)
                                     else "ORIGINAL"))
        return " ".join(parts)


def _ntohs(le: int) -> int:
    return int.from_bytes(le.to_bytes(2, "little"), "big")


for _revision in (1, 2, 3):
    register_match(type(f"ConntrackV{_revision}", (_Conntrack,),
                        {"revision": _revision, "struct": _mtinfo(_revision)}))
