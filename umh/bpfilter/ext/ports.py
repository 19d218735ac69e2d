"""What tcp and udp share: the port ranges of struct xt_tcp/xt_udp and their code."""
from __future__ import annotations

import errno
from dataclasses import dataclass

from ..bpf.asm import Assembler
from ..errors import BpfilterError
from ..packet import facts
from ..packet.primitives import RuleOutcome, emit_below, emit_nonzero, emit_range
from .exthdr import BUF, emit_read, emit_thoff


@dataclass(frozen=True)
class PortRange:
    lo: int = 0
    hi: int = 0xFFFF
    invert: bool = False


def emit_transport_header(asm: Assembler, header_size: int, out: RuleOutcome) -> None:
    """tcp_mt()/udp_mt()/icmp_match(): never match a non-first fragment, and drop the
    packet (hotdrop) when the header is shorter than the struct they read."""
    emit_nonzero(asm, facts.FRAGOFF, 2, invert=True, out=out)
    emit_below(asm, facts.L4_AVAIL, 1, header_size, out)


def emit_ports(asm: Assembler, sport: PortRange, dport: PortRange, out: RuleOutcome) -> None:
    emit_range(asm, facts.SPORT, 2, sport.lo, sport.hi, sport.invert, out)
    emit_range(asm, facts.DPORT, 2, dport.lo, dport.hi, dport.invert, out)


def describe_ports(label: str, ports: PortRange) -> str:
    """`iptables -L -n` spelling: dpt:22, dpts:1000:2000, dpt:!22; empty for any."""
    if (ports.lo, ports.hi) == (0, 0xFFFF) and not ports.invert:
        return ""
    bang = "!" if ports.invert else ""
    if ports.lo == ports.hi:
        return f"{label}:{bang}{ports.lo}"
    return f"{label}s:{bang}{ports.lo}:{ports.hi}"


def flagged_ports(pts, bit: int, flags: int, invflags: int) -> "PortRange | None":
    """dccp's and sctp's port range `pts`: tested only when `bit` is in their flags,
    inverted when it is in invflags; None when not tested."""
    return PortRange(*pts, bool(invflags & bit)) if flags & bit else None


def emit_header_ports(asm: Assembler, header_size: int, sport: "PortRange | None",
                      dport: "PortRange | None", out: RuleOutcome) -> None:
    """dccp_mt()/sctp_mt()'s start: a fragment other than the first never matches; the
    header's `header_size` bytes at par->thoff read into exthdr.BUF (else hotdrop);
    then the port ranges tested (None: not) against its first 4 bytes."""
    emit_nonzero(asm, facts.FRAGOFF, 2, invert=True, out=out)
    emit_thoff(asm)
    emit_read(asm, 0, header_size, out)
    for ports, at in ((sport, 0), (dport, 2)):
        if ports is not None:
            emit_range(asm, BUF + at, 2, ports.lo, ports.hi, ports.invert, out, wire_order=True)


def holds_and_drops(where: str, name: str, option: str) -> BpfilterError:
    """The refusal of an inverted test whose packet the kernel's match cannot walk:
    the match then holds and drops the packet, so the kernel counts the rule and runs
    its target before the drop, which a rule's outcome here cannot say."""
    return BpfilterError(errno.EOPNOTSUPP, f"{where}: match '{name}' ! {option} is not "
                                           "supported by bpfilter: where the packet cannot be "
                                           "walked, the kernel counts the rule and runs its "
                                           "target, then drops it; the whole table is refused")


def describe_flagged(sport: "PortRange | None", dport: "PortRange | None") -> list[str]:
    """dccp's and sctp's ports as their print_ports() spell them, those tested."""
    return [describe_ports(label, ports) for label, ports in (("spt", sport), ("dpt", dport))
            if ports is not None and describe_ports(label, ports)]
