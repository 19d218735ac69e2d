"""A table with its live counters, in the shape of `iptables -L -v -n -x`."""
from __future__ import annotations

import ipaddress

from . import ext
from .model import (Accept, Drop, ExtensionTarget, Fallthrough, Family, Goto, Interface, Jump,
                    Prefix, Return, Rule, Table)

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}


def _target(target) -> str:
    if isinstance(target, (Jump, Goto)):
        return target.chain
    if isinstance(target, ExtensionTarget):
        return target.name
    return {Accept: "ACCEPT", Drop: "DROP", Return: "RETURN", Fallthrough: ""}[type(target)]


def _prefix(p: Prefix) -> str:
    net = ipaddress.ip_network((bytes(p.addr), bin(int.from_bytes(p.mask, "big")).count("1")),
                               strict=False)
    text = str(net) if net.prefixlen != len(p.addr) * 8 else str(net.network_address)
    return ("!" if p.invert else "") + text


def _iface(i: Interface) -> str:
    if i.is_any:
        return "*"
    used = sum(1 for b in i.mask if b)
    name = i.name[:used].rstrip(b"\0").decode(errors="replace")
    wildcard = "+" if used and i.name[used - 1:used] != b"\0" else ""
    return ("!" if i.invert else "") + name + wildcard


def options(rule: Rule, family: Family) -> str:
    """What `iptables -L -n` prints after the addresses: "[goto] ", then each match's
    and an extension target's options, each after a space."""
    parts = [ext.describe_match(m, family) for m in rule.matches]
    if isinstance(rule.target, ExtensionTarget):
        parts.append(ext.describe_target(rule.target, family))
    goto = "[goto] " if isinstance(rule.target, Goto) else ""
    return (goto + "".join(f" {p}" for p in parts if p)).strip()


def render(table: Table, counters: list[tuple[int, int]]) -> str:
    lines = []
    for chain in table.chains.values():
        if chain.builtin:
            pkts, byts = counters[chain.tail_entry]
            lines.append(f"Chain {chain.name} (policy {chain.policy.value} {pkts} packets, "
                         f"{byts} bytes)")
        else:
            refs = sum(1 for c in table.chains.values() for r in c.rules
                       if isinstance(r.target, (Jump, Goto)) and r.target.chain == chain.name)
            lines.append(f"Chain {chain.name} ({refs} references)")
        lines.append(f"{'pkts':>8} {'bytes':>10} {'target':<12} {'prot':<5}{'opt':<4}"
                     f"{'in':<8}{'out':<8}{'source':<20}{'destination':<20}")
        for rule in chain.rules:
            ip = rule.ip
            pkts, byts = counters[rule.entry]
            proto = ("!" if ip.invert_proto else "") + _PROTO_NAMES.get(ip.proto, str(ip.proto)) \
                if ip.proto else "all"
            opt = ("!" if ip.invert_fragment else "-") + ("f" if ip.fragment else "-")
            extra = options(rule, table.family)
            lines.append(f"{pkts:>8} {byts:>10} {_target(rule.target):<12} {proto:<5}{opt:<4}"
                         f"{_iface(ip.in_iface):<8}{_iface(ip.out_iface):<8}"
                         f"{_prefix(ip.src):<20}{_prefix(ip.dst):<20}{extra}".rstrip())
        lines.append("")
    return "\n".join(lines)
