"""What tcp and udp share: the port ranges of struct xt_tcp/xt_udp and their code."""
from __future__ import annotations

from dataclasses import dataclass

from ..bpf.asm import Assembler
from ..packet import facts
from ..packet.primitives import RuleOutcome, emit_below, emit_nonzero, emit_range


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
