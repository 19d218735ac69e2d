"""A table with its live counters, as `iptables-legacy -L -v -n -x` (ip6tables-legacy
for IPv6) prints it: the columns and spacing of iptables' print_header(),
print_rule_details(), print_fragment(), print_ifaces() and print_ipv4_addresses() /
print_ipv6_addresses(), then each match's and the target's own text."""
from __future__ import annotations

import socket

from . import ext
from .model import (Accept, AnyIpHeader, Drop, ExtensionTarget, Fallthrough, Family, Goto,
                    Interface, Jump, Prefix, Return, Rule, Stray, Table)


def _target(target, table: Table) -> str:
    if isinstance(target, (Jump, Goto)):
        return table.chains[target.chain].name   # by key: names may repeat
    if isinstance(target, Stray):
        return str(target.offset)                 # the raw verdict, as the blob holds it
    if isinstance(target, ExtensionTarget):
        return target.name
    return {Accept: "ACCEPT", Drop: "DROP", Return: "RETURN", Fallthrough: ""}[type(target)]


def _address(p: Prefix, family: Family) -> str:
    """The address as stored (inet_ntop's spelling, as iptables prints it) and its
    mask: a prefix length, nothing for a host, the mask spelled out when it is no
    prefix."""
    af = socket.AF_INET if family == Family.IPV4 else socket.AF_INET6
    mask = int.from_bytes(p.mask, "big")
    width = 8 * len(p.mask)
    ones = bin(mask).count("1")
    if mask != ((1 << ones) - 1) << (width - ones):
        suffix = "/" + socket.inet_ntop(af, bytes(p.mask))
    else:
        suffix = "" if ones == width else f"/{ones}"
    return socket.inet_ntop(af, bytes(p.addr)) + suffix


def _iface(i: Interface, inverted_flag: bool) -> str:
    name = i.name.split(b"\0", 1)[0].decode(errors="replace")
    return ("!" if inverted_flag else "") + (name or "*")


def options(rule: Rule, family: Family) -> str:
    """What `iptables -L -n` prints after the addresses: "[goto] ", then each match's
    and an extension target's options, each after a space."""
    parts = [ext.describe_match(m, family) for m in rule.matches]
    if isinstance(rule.target, ExtensionTarget):
        parts.append(ext.describe_target(rule.target, family))
    goto = "[goto] " if isinstance(rule.target, Goto) else ""
    return (goto + "".join(f" {p}" for p in parts if p)).strip()


def _fragment(ip: AnyIpHeader, family: Family) -> str:
    if family == Family.IPV6:
        return "--"    # ip6tables prints no fragment flag
    return ("!" if ip.invert_fragment else "-") + ("f" if ip.fragment else "-")


def _rule_line(rule: Rule, table: Table, pkts: int, byts: int) -> str:
    ip, family = rule.ip, table.family
    parts = [ext.describe_match(m, family) for m in rule.matches]
    if isinstance(rule.target, ExtensionTarget):
        parts.append(ext.describe_target(rule.target, family))
    return (f"{pkts:8d} {byts:8d} {_target(rule.target, table):<9} "
            f"{'!' if ip.invert_proto else ' '}{ip.proto:<4} {_fragment(ip, family)} "
            f" {_iface(ip.in_iface, ip.in_iface.invert):<6} "
            f"{_iface(ip.out_iface, ip.out_iface.invert):<6} "
            f"{'!' if ip.src.invert else ' '}{_address(ip.src, family):<19} "
            f"{'!' if ip.dst.invert else ' '}{_address(ip.dst, family):<19} "
            + ("[goto] " if isinstance(rule.target, Goto) else "")
            + "".join(f" {p}" for p in parts if p))


_COLUMNS = (f"{'pkts':>8} {'bytes':>10} {'target':<9}  prot opt {'in':<6} {'out':<6}  "
            f"{'source':<19}  {'destination':<19} ")


def render(table: Table, counters: list[tuple[int, int]]) -> str:
    chains = []
    refs: dict[str, int] = {}   # chain key -> rules jumping to it, counted in one pass
    for c in table.chains.values():
        for r in c.rules:
            if isinstance(r.target, (Jump, Goto)):
                refs[r.target.chain] = refs.get(r.target.chain, 0) + 1
    for chain in table.chains.values():
        if chain.builtin:
            pkts, byts = counters[chain.tail_entry]
            head = f"Chain {chain.name} (policy {chain.policy.value} {pkts} packets, {byts} bytes)"
        else:
            head = f"Chain {chain.name} ({refs.get(chain.key, 0)} references)"
        lines = [head, _COLUMNS]
        lines += [_rule_line(rule, table, *counters[rule.entry]) for rule in chain.rules]
        chains.append("\n".join(lines) + "\n")
    return "\n".join(chains)
