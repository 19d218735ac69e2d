"""-m multiport: [!] --sports/--dports/--ports with lists of ports and ranges
(struct xt_multiport_v1, revision 1: the only one Linux still has)."""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import NamedTuple

from construct import Int8un, Int16un, Struct

from ..bpf import insn as I
from ..bpf.insn import BPF_ALU64_IMM, BPF_ALU64_REG, BPF_MOV64_IMM, R1, R2
from ..packet import facts
from ..packet.primitives import emit_outside
from ..errors import BpfilterError
from ..model import IpHeader, Match
from . import BOTH_FAMILIES, MatchExtension, register_match
from .ports import emit_transport_header

XT_MULTI_PORTS = 15
XT_MULTIPORT_SOURCE, XT_MULTIPORT_DESTINATION, XT_MULTIPORT_EITHER = 0, 1, 2
# The protocols whose first four header bytes are the two ports.
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE = 6, 17, 33, 132, 136
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE})

xt_multiport_v1 = Struct(
    "flags" / Int8un,
    "count" / Int8un,
    "ports" / Int16un[XT_MULTI_PORTS],
    "pflags" / Int8un[XT_MULTI_PORTS],
    "invert" / Int8un,
)

_DIRECTION = {XT_MULTIPORT_SOURCE: "sports", XT_MULTIPORT_DESTINATION: "dports",
              XT_MULTIPORT_EITHER: "ports"}
_FIELDS = {XT_MULTIPORT_SOURCE: (facts.SPORT,), XT_MULTIPORT_DESTINATION: (facts.DPORT,),
           XT_MULTIPORT_EITHER: (facts.SPORT, facts.DPORT)}


class PortItem(NamedTuple):
    lo: int
    hi: int
    is_range: bool   # written lo:hi (a range of one port still prints as one)


@dataclass(frozen=True)
class MultiportMatch(Match):
    flags: int                       # which ports: XT_MULTIPORT_*
    items: tuple[PortItem, ...]
    invert: int                      # the raw byte: see emit()
    name = "multiport"
    revision = 1


def port_items(count: int, ports: tuple[int, ...], pflags: tuple[int, ...],
               where: str) -> tuple[PortItem, ...]:
    """The list as ports_match_v1() walks it: a slot with its pflag set starts a
    range that ends at the next slot. Linux 6.18 refuses a range whose end slot is
    past `count` (the walk would read past the list), starts a range itself, or is
    below its start."""
    items, i = [], 0
    while i < count:
        if not pflags[i]:
            items.append(PortItem(ports[i], ports[i], False))
            i += 1
            continue
        problem = ("has no end among the ports" if i + 1 >= count else
                   "ends where another range starts" if pflags[i + 1] else
                   f"is reversed ({ports[i]}:{ports[i + 1]})" if ports[i] > ports[i + 1] else "")
        if problem:
            raise BpfilterError(errno.EINVAL, f"{where}: multiport: the range at port {i + 1} "
                                              f"{problem}")
        items.append(PortItem(ports[i], ports[i + 1], True))
        i += 2
    return tuple(items)


@register_match
class Multiport(MatchExtension):
    reads_transport = True
    name = "multiport"
    families = BOTH_FAMILIES
    revision = 1
    struct = xt_multiport_v1

    def check_ip(self, ip: IpHeader, where: str) -> None:
        if ip.proto not in PORT_PROTOCOLS or ip.invert_proto:
            raise BpfilterError(errno.EINVAL, f"{where}: multiport is only valid with -p tcp, "
                                              "udp, udplite, sctp or dccp (without '!')")

    def decode(self, payload: bytes, where: str) -> MultiportMatch:
        p = self.packed.unpack_from(payload)
        flags, count = p[_FLAGS], p[_COUNT]
        if flags not in _DIRECTION:
            raise BpfilterError(errno.EINVAL, f"{where}: multiport: unknown flags {flags}")
        if count > XT_MULTI_PORTS:
            raise BpfilterError(errno.EINVAL, f"{where}: multiport: {count} ports, more than "
                                              f"{XT_MULTI_PORTS}")
        return MultiportMatch(flags, port_items(count, p[_PORTS], p[_PFLAGS], where), p[_INVERT])

    def emit(self, match: MultiportMatch, asm, out) -> None:
        emit_transport_header(asm, facts.PORTS_HEADER, out)
        # ports_match_v1() returns `true ^ invert` or `invert` as a bool: an invert
        # byte other than 0 and 1 makes it true whatever the ports.
        if match.invert > 1:
            return
        if not match.items:
            if not match.invert:
                out.never()
            return
        # R2 stays 1 while no listed port matches: the AND of every "outside" test.
        asm.emit(BPF_MOV64_IMM(R2, 1))
        for item in match.items:
            for field in _FIELDS[match.flags]:
                emit_outside(asm, R1, field, 2, item.lo, item.hi)
                asm.emit(BPF_ALU64_REG(I.BPF_AND, R2, R1))
        if match.invert:
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R2, 1))
        out.mismatch(R2)

    def describe(self, match: MultiportMatch) -> str:
        ports = ",".join(f"{i.lo}:{i.hi}" if i.is_range else f"{i.lo}" for i in match.items)
        bang = " !" if match.invert else ""
        return f"multiport {_DIRECTION[match.flags]} {bang}{ports}"


_FLAGS, _COUNT, _PORTS, _PFLAGS, _INVERT = map(
    Multiport.packed.index, ("flags", "count", "ports", "pflags", "invert"))
