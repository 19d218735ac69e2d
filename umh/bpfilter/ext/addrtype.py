"""-m addrtype: --src-type/--dst-type TYPES, --limit-iface-in/out (struct
xt_addrtype_info_v1, revision 1; struct xt_addrtype_info, revision 0, IPv4 only).

The kernel's match_type() holds when (1 << inet_dev_addr_type(net, dev, addr))
& mask: the address's type (RTN_LOCAL, RTN_BROADCAST, ...) comes from a route lookup
in the hook's namespace, which a netfilter BPF program cannot make. bpfilter.ko's
kfunc bpfilter_addr_type(state, addr, flags) makes that lookup on the device
addrtype_mt_v1() picks; without the module the table is refused (a type guessed from
the address alone would be another match: LOCAL means "configured on this host").

The types are packet facts: the prologue asks the kfunc once per packet for each
(address, device) pair the table's rules test, since a kfunc call clobbers the
registers that carry a rule's outcome. The lookup has no side effect, so asking
before the rule is reached answers what the kernel asks when it reaches it.

IPv6 (revision 1 only, as the kernel registers it) has no single route type: the
kernel's match_type6() tests the address's kind (ipv6_addr_type()) and, for LOCAL,
ANYCAST and UNREACHABLE, a route lookup whose answer depends on the mask.
bpfilter.ko's bpfilter_addr_type6() answers for every mask at once with a set of
XT_ADDRTYPE_* bits v, from which the rule computes match_type6() for its own mask
(see Addrtype6.emit).
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from construct import Int16un, Int32un, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_CALL_KFUNC, BPF_DW,
                        BPF_EMIT_CALL, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_MAP_FD, BPF_LDX_MEM,
                        BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W, R0, R1,
                        R2, R3, R4, R6, R8, Kfunc, MapRef)
from ..packet import facts
from ..errors import BpfilterError
from ..model import Family, Hook, Match
from ..packet.primitives import emit_nonzero_bit
from . import MODULE, MatchExtension, environment_maps, missing_kfunc, register_match

ADDR_TYPE_KFUNC = Kfunc("bpfilter_addr_type", MODULE)
ADDR_TYPE6_KFUNC = Kfunc("bpfilter_addr_type6", MODULE)

# enum xt_addrtype_t bit i is route type i (RTN_*); iptables prints these names
RTN_NAMES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE",
             "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")

XT_ADDRTYPE_INVERT_SOURCE = 0x0001
XT_ADDRTYPE_INVERT_DEST = 0x0002
XT_ADDRTYPE_LIMIT_IFACE_IN = 0x0004
XT_ADDRTYPE_LIMIT_IFACE_OUT = 0x0008

# enum xt_addrtype_t bits IPv6 tells apart: by the address's kind alone ...
XT_ADDRTYPE_UNSPEC, XT_ADDRTYPE_UNICAST, XT_ADDRTYPE_MULTICAST = 1 << 0, 1 << 1, 1 << 5
KIND6 = XT_ADDRTYPE_UNSPEC | XT_ADDRTYPE_UNICAST | XT_ADDRTYPE_MULTICAST
# ... and by a route lookup
XT_ADDRTYPE_LOCAL, XT_ADDRTYPE_ANYCAST, XT_ADDRTYPE_UNREACHABLE = 1 << 2, 1 << 4, 1 << 7
ROUTE6 = XT_ADDRTYPE_LOCAL | XT_ADDRTYPE_ANYCAST | XT_ADDRTYPE_UNREACHABLE
XT_ADDRTYPE_BROADCAST, XT_ADDRTYPE_BLACKHOLE, XT_ADDRTYPE_PROHIBIT = 1 << 3, 1 << 6, 1 << 8

xt_addrtype_info = Struct(
    "source" / Int16un,
    "dest" / Int16un,
    "invert_source" / Int32un,
    "invert_dest" / Int32un,
)
xt_addrtype_info_v1 = Struct(
    "source" / Int16un,
    "dest" / Int16un,
    "flags" / Int32un,
)

# One byte per (address, device) pair a rule can ask about: the type the kfunc
# answered, read by the prologue only for the pairs the table's rules test.
_ADDRESSES = (("src", facts.SADDR), ("dst", facts.DADDR))
_LIMITS = ((0, ""), (XT_ADDRTYPE_LIMIT_IFACE_IN, "_in"), (XT_ADDRTYPE_LIMIT_IFACE_OUT, "_out"))
_TYPES = facts.reserve("addrtype", len(_ADDRESSES) * len(_LIMITS))
_GROUPS = {}   # (address, limit) -> (fact group, offset of its byte)


def _reader(addr_off: int, limit: int, slot: int):
    def read(asm, k: facts.KernelOffsets) -> None:
        if missing_kfunc(ADDR_TYPE_KFUNC):
            _emit_local_lookup(asm, addr_off, limit, slot)
            return
        asm.emit(BPF_MOV64_REG(R1, R8),
                 BPF_LDX_MEM(BPF_W, R2, R6, addr_off),
                 BPF_MOV64_IMM(R3, limit),
                 BPF_CALL_KFUNC(ADDR_TYPE_KFUNC),
                 BPF_STX_MEM(BPF_B, R6, R0, slot))
    return read


# Without bpfilter.ko: __inet_dev_addr_type() on the service's mirror of every
# namespace's local routing table (localroutes.py), an LPM trie keyed by
# (ROUTE_KEY_PREFIX + the route's prefix length, netns inum, address) whose values
# are the route's (type, first nexthop's device). The key is built in the facts.
LOCAL_ROUTES = MapRef("local_routes", "addrtype rules without bpfilter.ko need the service's "
                                      "mirror of the local routing table (bpfilter serve has one)")
ROUTE_KEY = struct.Struct("<II4s")     # prefixlen, netns inum, the address (network order)
ROUTE_VALUE = struct.Struct("<II")     # RTN_* type, device ifindex
ROUTE_KEY_PREFIX = 32                  # the inum's bits, always all matched
_KEY = facts.reserve("addrtype_key", 16)
RTN_UNICAST, RTN_BROADCAST, RTN_MULTICAST = 1, 3, 5


def _emit_local_lookup(asm, addr_off: int, limit: int, slot: int) -> None:
    o = _offsets()
    store = asm.label("addrtype_store")
    asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, addr_off),    # the address's first byte lowest
             # ipv4_is_zeronet() || ipv4_is_lbcast()
             BPF_MOV64_IMM(R1, RTN_BROADCAST),
             BPF_MOV64_REG(R3, R2), BPF_ALU64_IMM(I.BPF_AND, R3, 0xFF),
             BPF_JMP_IMM(I.BPF_JEQ, R3, 0, store),
             BPF_MOV64_REG(R3, R2), BPF_ALU64_IMM(I.BPF_ADD, R3, 1),
             BPF_ALU64_IMM(I.BPF_RSH, R3, 32),
             BPF_JMP_IMM(I.BPF_JNE, R3, 0, store),
             # ipv4_is_multicast()
             BPF_MOV64_IMM(R1, RTN_MULTICAST),
             BPF_MOV64_REG(R3, R2), BPF_ALU64_IMM(I.BPF_AND, R3, 0xF0),
             BPF_JMP_IMM(I.BPF_JEQ, R3, 0xE0, store),
             BPF_ST_MEM(BPF_W, R6, _KEY, ROUTE_KEY_PREFIX + 32),
             BPF_LDX_MEM(BPF_DW, R3, R8, o.state_net),
             BPF_LDX_MEM(BPF_W, R3, R3, o.net_inum),
             BPF_STX_MEM(BPF_W, R6, R3, _KEY + 4),
             BPF_STX_MEM(BPF_W, R6, R2, _KEY + 8),
             *BPF_LD_MAP_FD(R1, LOCAL_ROUTES),
             BPF_MOV64_REG(R2, R6), BPF_ALU64_IMM(I.BPF_ADD, R2, _KEY),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             # no route in the local table: unicast
             BPF_MOV64_IMM(R1, RTN_UNICAST),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, store),
             BPF_LDX_MEM(BPF_W, R1, R0, 0))
    if limit:
        # the route's type only if its device is the hook's (none: any device)
        device = o.state_in if limit == XT_ADDRTYPE_LIMIT_IFACE_IN else o.state_out
        asm.emit(BPF_LDX_MEM(BPF_DW, R3, R8, device),
                 BPF_JMP_IMM(I.BPF_JEQ, R3, 0, store),
                 BPF_LDX_MEM(BPF_W, R3, R3, o.dev_ifindex),
                 BPF_LDX_MEM(BPF_W, R2, R0, 4),
                 BPF_JMP_REG(I.BPF_JEQ, R2, R3, store),
                 BPF_MOV64_IMM(R1, RTN_UNICAST))
    asm.place(store)
    asm.emit(BPF_STX_MEM(BPF_B, R6, R1, slot))


@dataclass(frozen=True)
class _Offsets:
    state_net: int
    state_in: int
    state_out: int
    net_inum: int
    dev_ifindex: int


@lru_cache(maxsize=1)
def _offsets() -> _Offsets:
    btf = Btf.vmlinux()
    return _Offsets(state_net=btf.member("nf_hook_state", "net")[0],
                    state_in=btf.member("nf_hook_state", "in")[0],
                    state_out=btf.member("nf_hook_state", "out")[0],
                    net_inum=btf.member("net", "ns.inum")[0],
                    dev_ifindex=btf.member("net_device", "ifindex")[0])


for _a, (_addr, _addr_off) in enumerate(_ADDRESSES):
    for _l, (_limit, _suffix) in enumerate(_LIMITS):
        _group, _slot = f"addrtype_{_addr}{_suffix}", _TYPES + _a * len(_LIMITS) + _l
        _GROUPS[(_addr, _limit)] = _group, _slot
        facts.OPTIONAL[_group] = _reader(_addr_off, _limit, _slot)
        facts.REGIONS_OF[_group] = ("addrtype", "addrtype_key")

# IPv6: a u32 answer of bpfilter_addr_type6() per (address, device) pair, in a region
# of its own (IPv4 tables keep their six bytes).
_TYPES6 = facts.reserve("addrtype6", 4 * len(_ADDRESSES) * len(_LIMITS))
_GROUPS6 = {}


def _reader6(addr_off: int, limit: int, slot):
    def read(asm, k: facts.KernelOffsets) -> None:
        # the address as two little-endian halves, as the kfunc takes it
        asm.emit(BPF_MOV64_REG(R1, R8),
                 BPF_LDX_MEM(BPF_DW, R2, R6, addr_off),
                 BPF_LDX_MEM(BPF_DW, R3, R6, addr_off + 8),
                 BPF_MOV64_IMM(R4, limit),
                 BPF_CALL_KFUNC(ADDR_TYPE6_KFUNC),
                 BPF_STX_MEM(BPF_W, R6, R0, slot))
    return read


for _a, (_addr, _addr_off) in enumerate(_ADDRESSES):
    for _l, (_limit, _suffix) in enumerate(_LIMITS):
        _group, _slot = f"addrtype6_{_addr}{_suffix}", _TYPES6 + 4 * (_a * len(_LIMITS) + _l)
        _GROUPS6[(_addr, _limit)] = _group, _slot
        facts.OPTIONAL[_group] = _reader6(_addr_off, _limit, _slot)
        facts.REGIONS_OF[_group] = ("addrtype6",)


@dataclass(frozen=True)
class AddrtypeMatch(Match):
    source: int           # masks of types (bit i: RTN type i); 0 tests nothing
    dest: int
    invert_source: bool
    invert_dest: bool
    limit: int            # 0, XT_ADDRTYPE_LIMIT_IFACE_IN or _OUT: the device of the lookup
    name = "addrtype"
    groups = _GROUPS      # (address, limit) -> (fact group, offset of its answer)

    def tests(self):
        """(group, answer's offset, mask, invert) of each address the match tests."""
        return [(*self.groups[(addr, self.limit)], mask, invert)
                for addr, mask, invert in (("src", self.source, self.invert_source),
                                           ("dst", self.dest, self.invert_dest)) if mask]


@dataclass(frozen=True)
class AddrtypeMatchV0(AddrtypeMatch):
    revision = 0


@dataclass(frozen=True)
class AddrtypeMatchV1(AddrtypeMatch):
    revision = 1


@dataclass(frozen=True)
class Addrtype6Match(AddrtypeMatchV1):
    groups = _GROUPS6


def _types(mask: int) -> str:
    return ",".join(n for i, n in enumerate(RTN_NAMES) if mask & (1 << i))


class _Addrtype(MatchExtension):
    name = "addrtype"

    kfunc = ADDR_TYPE_KFUNC
    environment = (LOCAL_ROUTES,)

    def unsupported(self, match: AddrtypeMatch) -> Optional[str]:
        if not match.tests():
            return None     # no lookup: the match always holds
        missing = missing_kfunc(self.kfunc)
        if missing and self.family == Family.IPV6:
            return ("needs bpfilter.ko (kernel module mode) for the kernel's address type "
                    "lookup, which a netfilter BPF program cannot make: IPv6's asks the "
                    "whole routing (policy rules, every table), which the service does not "
                    f"mirror as it does IPv4's local table ({missing})")
        return None

    def facts_of(self, match: AddrtypeMatch) -> frozenset[str]:
        return frozenset(group for group, *_ in match.tests())

    def emit(self, match: AddrtypeMatch, asm, out) -> None:
        # fails unless ((mask >> type) & 1) != invert: the kernel's
        # !!(mask & (1 << type)) ^ invert, without a branch
        for _, slot, mask, invert in match.tests():
            asm.emit(BPF_MOV64_IMM(R1, mask),
                     BPF_LDX_MEM(BPF_B, R2, R6, slot),
                     BPF_ALU64_REG(I.BPF_RSH, R1, R2),
                     BPF_ALU64_IMM(I.BPF_AND, R1, 1))
            if not invert:
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
            out.mismatch(R1)

    def describe(self, match: AddrtypeMatch) -> str:
        # libxt_addrtype's print
        parts = ["ADDRTYPE match"]
        for what, mask, invert in (("src-type", match.source, match.invert_source),
                                   ("dst-type", match.dest, match.invert_dest)):
            if mask:
                parts.append(f"{what} {'!' if invert else ''}{_types(mask)}")
        parts += {XT_ADDRTYPE_LIMIT_IFACE_IN: ["limit-in"],
                  XT_ADDRTYPE_LIMIT_IFACE_OUT: ["limit-out"]}.get(match.limit, [])
        return " ".join(parts)


@register_match
class Addrtype(_Addrtype):
    revision = 0
    struct = xt_addrtype_info

    def decode(self, payload: bytes, where: str) -> AddrtypeMatchV0:
        # no checkentry. `ret &= match_type(...) ^ info->invert_source` keeps bit 0 of
        # the u32 invert: ret is a bool, 0 or 1.
        source, dest, invert_source, invert_dest = self.packed.unpack_from(payload)
        return AddrtypeMatchV0(source, dest, bool(invert_source & 1), bool(invert_dest & 1), 0)


_HOOKS_IN = (1 << Hook.PRE_ROUTING.value) | (1 << Hook.LOCAL_IN.value)
_HOOKS_OUT = (1 << Hook.POST_ROUTING.value) | (1 << Hook.LOCAL_OUT.value)


@register_match
class AddrtypeV1(_Addrtype):
    # registered per family since Linux 6.12 (no longer NFPROTO_UNSPEC): an unknown
    # revision is ENOENT, as for revision 0's IPv4-only registration
    revision = 1
    struct = xt_addrtype_info_v1

    def decode(self, payload: bytes, where: str) -> AddrtypeMatchV1:
        source, dest, flags = self.packed.unpack_from(payload)
        limit = flags & (XT_ADDRTYPE_LIMIT_IFACE_IN | XT_ADDRTYPE_LIMIT_IFACE_OUT)
        if limit == XT_ADDRTYPE_LIMIT_IFACE_IN | XT_ADDRTYPE_LIMIT_IFACE_OUT:
            raise BpfilterError(errno.EINVAL, f"{where}: addrtype: both incoming and outgoing "
                                              "interface limitation cannot be selected")
        return AddrtypeMatchV1(source, dest, bool(flags & XT_ADDRTYPE_INVERT_SOURCE),
                               bool(flags & XT_ADDRTYPE_INVERT_DEST), limit)

    def check_hooks(self, match: AddrtypeMatchV1, hook_mask: int, where: str) -> None:
        # addrtype_mt_checkentry_v1(): a device the hook does not have
        if hook_mask & _HOOKS_IN and match.limit == XT_ADDRTYPE_LIMIT_IFACE_OUT:
            raise BpfilterError(errno.EINVAL, f"{where}: addrtype: output interface limitation "
                                              "not valid in PREROUTING and INPUT")
        if hook_mask & _HOOKS_OUT and match.limit == XT_ADDRTYPE_LIMIT_IFACE_IN:
            raise BpfilterError(errno.EINVAL, f"{where}: addrtype: input interface limitation "
                                              "not valid in POSTROUTING and OUTPUT")


@register_match
class Addrtype6(AddrtypeV1):
    families = (Family.IPV6,)
    kfunc = ADDR_TYPE6_KFUNC
    environment = ()

    def decode(self, payload: bytes, where: str) -> Addrtype6Match:
        v1 = super().decode(payload, where)
        # addrtype_mt_checkentry_v1() for NFPROTO_IPV6: types match_type6() cannot tell
        types = v1.source | v1.dest
        if types & XT_ADDRTYPE_BLACKHOLE:
            raise BpfilterError(errno.EINVAL, f"{where}: addrtype: ipv6 BLACKHOLE matching "
                                              "not supported")
        if types >= XT_ADDRTYPE_PROHIBIT:
            raise BpfilterError(errno.EINVAL, f"{where}: addrtype: ipv6 PROHIBIT (THROW, NAT ..) "
                                              "matching not supported")
        if types & XT_ADDRTYPE_BROADCAST:
            raise BpfilterError(errno.EINVAL, f"{where}: addrtype: ipv6 does not support "
                                              "BROADCAST matching")
        return Addrtype6Match(v1.source, v1.dest, v1.invert_source, v1.invert_dest, v1.limit)

    def emit(self, match: Addrtype6Match, asm, out) -> None:
        """addrtype_mt6(): match_type6(mask) ^ invert for each address tested, from the
        kfunc's answer v, without a branch:

            match_type6(mask) == !(mask & KIND6 & ~v) && (!(mask & ROUTE6) || (mask & ROUTE6 & v))

        (the kind bits the mask asks for must all be the address's; of the route
        types, one must be). `^ (flags & XT_ADDRTYPE_INVERT_SOURCE)` and `^
        !!(flags & XT_ADDRTYPE_INVERT_DEST)` both read as a 0 or 1 invert: the
        source's flag is bit 0."""
        for _, slot, mask, invert in match.tests():
            kind, route = mask & KIND6, mask & ROUTE6   # checkentry left no other bit
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, slot))
            if kind:
                # R2 = 1 if a kind bit of the mask is not the address's
                asm.emit(BPF_MOV64_REG(R2, R1), BPF_ALU64_IMM(I.BPF_AND, R2, kind),
                         BPF_ALU64_IMM(I.BPF_XOR, R2, kind))
                emit_nonzero_bit(asm, R2, R3)
            if route:
                # R1 = 1 if none of the mask's route types is the address's
                asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, route))
                emit_nonzero_bit(asm, R1, R3)
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
                if kind:
                    asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2))
            else:
                asm.emit(BPF_MOV64_REG(R1, R2))
            # R1 is now !match_type6(): the test fails when it differs from invert
            if invert:
                asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R1, 1))
            out.mismatch(R1)


def needs_local_routes(table) -> bool:
    """Whether the table's programs read the service's mirror of the local table."""
    return LOCAL_ROUTES in environment_maps(table) and bool(missing_kfunc(ADDR_TYPE_KFUNC))
