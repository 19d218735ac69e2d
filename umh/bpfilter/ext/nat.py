"""The nat table's targets: SNAT and DNAT (xt_nat, revisions 0 to 2), MASQUERADE
(xt_MASQUERADE), REDIRECT (xt_REDIRECT) and NETMAP (xt_NETMAP).

Each sets up the connection's binding in its conntrack entry, which the kernel's NAT
core then applies to this packet and every later one of the connection, replies
included. The nat table's chains run only where the core asks for a binding (the
first packet of a connection, per manip type; tables.NAT, kmod/nat.c), and the
program calls bpfilter.ko's bpfilter_nat() with the rule's range as struct
nf_nat_range2: the module calls the very functions the targets call. The older
payloads are converted to it as the kernel's targets convert them. Without the module
the nat table does not exist (the service refuses it).

What the kernel reads beyond a payload, or leaves uninitialised, is refused rather
than guessed: a NF_NAT_RANGE_PROTO_OFFSET flag on MASQUERADE, REDIRECT or NETMAP
(their kernel targets hand nf_nat a base port they never set). iptables never sets it.
"""
from __future__ import annotations

import errno
import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional

from construct import Bytes, Int32un, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_CALL_KFUNC, BPF_DW, BPF_EXIT_INSN, BPF_JMP_IMM,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, R0, R1, R2, R3, R4, R5, R6,
                        Kfunc)
from ..errors import BpfilterError
from ..model import ExtensionTarget, Family, Hook, IpHeader
from ..netfilter import NF_ACCEPT, NF_DROP
from ..packet import facts
from ..packet.primitives import emit_store_words
from ..proto import NatHow
from . import MODULE, TargetExtension, missing_kfunc, register_target
from .reject import NF_STATE

NAT_KFUNC = Kfunc("bpfilter_nat", MODULE)

# include/uapi/linux/netfilter/nf_nat.h
NF_NAT_RANGE_MAP_IPS = 1 << 0
NF_NAT_RANGE_PROTO_SPECIFIED = 1 << 1
NF_NAT_RANGE_PROTO_RANDOM = 1 << 2
NF_NAT_RANGE_PERSISTENT = 1 << 3
NF_NAT_RANGE_PROTO_RANDOM_FULLY = 1 << 4
NF_NAT_RANGE_PROTO_OFFSET = 1 << 5

# struct nf_nat_ipv4_multi_range_compat, struct nf_nat_range, struct nf_nat_range2
ipv4_multi_range_compat = Struct("rangesize" / Int32un, "flags" / Int32un,
                                 "min_ip" / Bytes(4), "max_ip" / Bytes(4),
                                 "min" / Bytes(2), "max" / Bytes(2))
nat_range = Struct("flags" / Int32un, "min_addr" / Bytes(16), "max_addr" / Bytes(16),
                   "min_proto" / Bytes(2), "max_proto" / Bytes(2))
nat_range2 = Struct("flags" / Int32un, "min_addr" / Bytes(16), "max_addr" / Bytes(16),
                    "min_proto" / Bytes(2), "max_proto" / Bytes(2), "base_proto" / Bytes(2),
                    "pad" / Bytes(2))
RANGE2_SIZE = 44   # sizeof(struct nf_nat_range2), which bpfilter_nat() takes
_RANGE2 = struct.Struct("=I16s16s2s2s2s2x")
assert _RANGE2.size == nat_range2.sizeof() == RANGE2_SIZE

# The range handed to the kfunc, written where the program's frame keeps it.
NAT_RANGE = facts.reserve("nat_range", RANGE2_SIZE)
facts.OPTIONAL["nat_range"] = lambda asm, k: None
facts.READ_CONNTRACK.add("nat_range")   # xt_nat's checkentry: nf_ct_netns_get()

_PRE, _IN, _OUT, _POST = (1 << h.value for h in (Hook.PRE_ROUTING, Hook.LOCAL_IN,
                                                 Hook.LOCAL_OUT, Hook.POST_ROUTING))


@dataclass(frozen=True)
class NatRange:
    """A struct nf_nat_range2, as the kernel's target hands it to nf_nat."""
    flags: int
    min_addr: bytes = bytes(16)
    max_addr: bytes = bytes(16)
    min_proto: bytes = bytes(2)
    max_proto: bytes = bytes(2)
    base_proto: bytes = bytes(2)

    def packed(self) -> bytes:
        """nat_range2's bytes (packed by struct: a table may have tens of thousands)."""
        return _RANGE2.pack(self.flags, self.min_addr, self.max_addr, self.min_proto,
                            self.max_proto, self.base_proto)


@dataclass(frozen=True, kw_only=True)
class NatTarget(ExtensionTarget):
    name: str
    revision: int
    how: NatHow
    range: NatRange
    family: Family


def _port(raw: bytes) -> int:
    return struct.unpack(">H", raw)[0]


def _address(raw: bytes, family: Family) -> str:
    if family == Family.IPV4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def describe_range(r: NatRange, family: Family) -> str:
    """The range as libxt_NAT prints it (iptables -L)."""
    out = ""
    if r.flags & NF_NAT_RANGE_MAP_IPS:
        low, high = _address(r.min_addr, family), _address(r.max_addr, family)
        out = low if low == high else f"{low}-{high}"
        if family == Family.IPV6 and r.flags & NF_NAT_RANGE_PROTO_SPECIFIED:
            out = f"[{out}]"
    if r.flags & NF_NAT_RANGE_PROTO_SPECIFIED:
        low, high = _port(r.min_proto), _port(r.max_proto)
        out += f":{low}" if low == high else f":{low}-{high}"
        if r.flags & NF_NAT_RANGE_PROTO_OFFSET:
            out += f"/{_port(r.base_proto)}"
    return out


def _options(r: NatRange) -> str:
    words = [word for flag, word in ((NF_NAT_RANGE_PROTO_RANDOM, "random"),
                                     (NF_NAT_RANGE_PROTO_RANDOM_FULLY, "random-fully"),
                                     (NF_NAT_RANGE_PERSISTENT, "persistent"))
             if r.flags & flag]
    return "".join(f" {w}" for w in words)


class _Nat(TargetExtension):
    """What the nat targets share: the table, the kfunc, the code."""

    table = "nat"
    facts = frozenset({"skb", "nf_state", "nat_range"})
    how: NatHow

    def _range(self, payload: bytes, where: str) -> NatRange:
        raise NotImplementedError

    def check(self, r: NatRange, where: str) -> None:
        """The target's checkentry, past the payload's own checks."""

    def decode(self, payload: bytes, ip: IpHeader, where: str) -> NatTarget:
        r = self._range(payload, where)
        self.check(r, where)
        return NatTarget(name=self.name, revision=self.revision, how=self.how, range=r,
                         family=self.family)

    def unsupported(self, target: NatTarget) -> Optional[str]:
        missing = missing_kfunc(NAT_KFUNC)
        if missing:
            return (f"needs bpfilter.ko (kernel module mode): only the kernel's NAT core can "
                    f"bind a connection ({missing})")
        if self.how != NatHow.SNAT and self.how != NatHow.DNAT \
                and target.range.flags & NF_NAT_RANGE_PROTO_OFFSET:
            return ("with a port offset (NF_NAT_RANGE_PROTO_OFFSET), which the kernel's "
                    f"{self.name} reads from a base port it never sets")
        return None

    def describe(self, target: NatTarget) -> str:
        return f"to:{describe_range(target.range, self.family)}{_options(target.range)}"

    def emit(self, target: NatTarget, asm, next_rule) -> None:
        # (a template's range is a HoleBlock of its instances' records)
        emit_store_words(asm, R6, NAT_RANGE, target.range.packed())
        accept = asm.label("nat_bound")
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB),
                 BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
                 BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, NAT_RANGE),
                 BPF_MOV64_IMM(R4, RANGE2_SIZE), BPF_MOV64_IMM(R5, int(self.how)),
                 BPF_CALL_KFUNC(NAT_KFUNC),
                 # the target's verdict ends the chain: NF_ACCEPT, or NF_DROP when no
                 # binding could be made (and for a kfunc refusal, which never happens here)
                 BPF_JMP_IMM(I.BPF_JEQ, R0, NF_ACCEPT, accept),
                 BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        asm.place(accept)
        asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT), BPF_EXIT_INSN())


class _Compat(_Nat):
    """Revision 0 of IPv4: struct nf_nat_ipv4_multi_range_compat, one range."""
    struct = ipv4_multi_range_compat

    def _range(self, payload: bytes, where: str) -> NatRange:
        rangesize, flags, min_ip, max_ip, low, high = self.packed.unpack_from(payload)
        if rangesize != 1:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.name}: multiple ranges no "
                                              f"longer supported (rangesize {rangesize})")
        return NatRange(flags, min_ip + bytes(12), max_ip + bytes(12), low, high)


class _Range(_Nat):
    """struct nf_nat_range: revision 1 of SNAT/DNAT, and IPv6's other targets."""
    struct = nat_range

    def _range(self, payload: bytes, where: str) -> NatRange:
        return NatRange(*self.packed.unpack_from(payload))


class _Range2(_Nat):
    """struct nf_nat_range2: revision 2 of SNAT/DNAT."""
    struct = nat_range2

    def _range(self, payload: bytes, where: str) -> NatRange:
        return NatRange(*self.packed.unpack_from(payload)[:6])   # (then its padding)


_SNAT = dict(name="SNAT", how=NatHow.SNAT, hooks=_POST | _IN)
_DNAT = dict(name="DNAT", how=NatHow.DNAT, hooks=_PRE | _OUT)
_BOTH = (Family.IPV4, Family.IPV6)

for _kind in (_SNAT, _DNAT):
    # xt_nat: revision 0 is IPv4's, 1 and 2 are registered for every family
    register_target(type(f"{_kind['name']}0", (_Compat,), dict(_kind, revision=0)))
    for _revision, _base in ((1, _Range), (2, _Range2)):
        register_target(type(f"{_kind['name']}{_revision}", (_base,),
                             dict(_kind, revision=_revision, families=_BOTH,
                                  family_independent=True)))


class _NoAddresses:
    """MASQUERADE's and REDIRECT's checkentry: the address is theirs to choose."""

    def check(self, r: NatRange, where: str) -> None:
        if r.flags & NF_NAT_RANGE_MAP_IPS:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.name}: bad MAP_IPS "
                                              f"(it chooses the address itself)")


class _Ports:
    def describe(self, target: NatTarget) -> str:
        r = target.range
        words = []
        if r.flags & NF_NAT_RANGE_PROTO_SPECIFIED:
            low, high = _port(r.min_proto), _port(r.max_proto)
            words.append(f"{self.ports_word} {low}" if low == high
                         else f"{self.ports_word} {low}-{high}")
        return " ".join(words) + _options(r)


@register_target
class Masquerade(_NoAddresses, _Ports, _Compat):
    name, how, hooks, ports_word = "MASQUERADE", NatHow.MASQUERADE, _POST, "masq ports:"

    def _range(self, payload: bytes, where: str) -> NatRange:
        # masquerade_tg() hands nf_nat only the flags and ports
        r = super()._range(payload, where)
        return NatRange(r.flags, min_proto=r.min_proto, max_proto=r.max_proto)


@register_target
class Masquerade6(_NoAddresses, _Ports, _Range):
    name, how, hooks, ports_word = "MASQUERADE", NatHow.MASQUERADE, _POST, "masq ports:"
    families = (Family.IPV6,)


@register_target
class Redirect(_NoAddresses, _Ports, _Compat):
    name, how, hooks, ports_word = "REDIRECT", NatHow.REDIRECT, _PRE | _OUT, "redir ports"

    def _range(self, payload: bytes, where: str) -> NatRange:
        r = super()._range(payload, where)   # redirect_tg4(): flags and ports
        return NatRange(r.flags, min_proto=r.min_proto, max_proto=r.max_proto)


@register_target
class Redirect6(_NoAddresses, _Ports, _Range):
    name, how, hooks, ports_word = "REDIRECT", NatHow.REDIRECT, _PRE | _OUT, "redir ports"
    families = (Family.IPV6,)


class _Netmap:
    def check(self, r: NatRange, where: str) -> None:
        if not r.flags & NF_NAT_RANGE_MAP_IPS:
            raise BpfilterError(errno.EINVAL, f"{where}: NETMAP: bad MAP_IPS (it needs the "
                                              f"network to map to)")

    def describe(self, target: NatTarget) -> str:
        r = target.range
        size = 4 if self.family == Family.IPV4 else 16
        low = int.from_bytes(r.min_addr[:size], "big")
        high = int.from_bytes(r.max_addr[:size], "big")
        bits = size * 8 - (low ^ high).bit_length()
        return f"to:{_address(r.min_addr, self.family)}/{bits}"


@register_target
class Netmap(_Netmap, _Compat):
    name, how, hooks = "NETMAP", NatHow.NETMAP, _PRE | _POST | _OUT | _IN


@register_target
class Netmap6(_Netmap, _Range):
    name, how, hooks = "NETMAP", NatHow.NETMAP, _PRE | _POST | _OUT | _IN
    families = (Family.IPV6,)
