"""The benchmark's rulesets: one neutral list of rules per mix and size, rendered for
ip(6)tables-restore, for plain nftables and, where the mix allows, for nftables sets.

The mixes of IPv4 (blocklist, ports, classbench) and of IPv6 (blocklist6, ports6)
are each built around two UDP flows of their family from the sender namespace:

  MATCH   198.18.0.2:40000 -> 198.18.0.1:5001    (IPv6: 2001:db8:1::2 -> 2001:db8:1::1);
          only the last rule matches it (ACCEPT)
  MISS    198.18.0.3:40001 -> 198.18.0.1:5002    (IPv6: 2001:db8:1::3 -> 2001:db8:1::1);
          no rule matches it (policy ACCEPT)

so one loaded ruleset serves both variants and both flows are counted at the
receiver. Every other rule is checked against both flows and redrawn if it would
match either: each packet walks all N rules in a linear classifier.
"""
from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import Optional

MIXES = ("blocklist", "ports", "classbench", "blocklist6", "ports6")
IPV4, IPV6 = 4, 6
FAMILY = {"blocklist": IPV4, "ports": IPV4, "classbench": IPV4, "blocklist6": IPV6,
          "ports6": IPV6}


@dataclass(frozen=True)
class Flow:
    src: str
    sport: int
    dst: str
    dport: int

    @property
    def family(self) -> int:
        return _family(self.dst)


FLOWS = {IPV4: {"match": Flow("198.18.0.2", 40000, "198.18.0.1", 5001),
                "miss": Flow("198.18.0.3", 40001, "198.18.0.1", 5002)},
         IPV6: {"match": Flow("2001:db8:1::2", 40000, "2001:db8:1::1", 5001),
                "miss": Flow("2001:db8:1::3", 40001, "2001:db8:1::1", 5002)}}
FLOW_NAMES = ("match", "miss")
PORTS = sorted({f.dport for flows in FLOWS.values() for f in flows.values()})

Range = tuple[int, int]
_SOCKET_FAMILY = {IPV4: socket.AF_INET, IPV6: socket.AF_INET6}
_BITS = {IPV4: 32, IPV6: 128}


def _family(address: str) -> int:
    return IPV6 if ":" in address else IPV4


def _addr(text: str) -> int:
    return int.from_bytes(socket.inet_pton(_SOCKET_FAMILY[_family(text)], text), "big")


def _span(prefix: str) -> Range:
    """The first and last address of addr/len."""
    addr, length = prefix.split("/")
    size = 1 << (_BITS[_family(addr)] - int(length))
    lo = _addr(addr) & ~(size - 1)
    return lo, lo + size - 1


def _prefix(lo: int, length: int, family: int = IPV4) -> str:
    size = _BITS[family] // 8
    return f"{socket.inet_ntop(_SOCKET_FAMILY[family], lo.to_bytes(size, 'big'))}/{length}"


_LAB = {IPV4: _span("198.18.0.0/15"), IPV6: _span("2001:db8::/32")}
# what nft calls a family's table, its addresses and its protocol field
_NFT = {IPV4: ("ip", "ip", "ip protocol"), IPV6: ("ip6", "ip6", "meta l4proto")}


@dataclass(frozen=True)
class Rule:
    action: str                      # ACCEPT or DROP
    src: Optional[str] = None        # a.b.c.d/len, host bits clear
    dst: Optional[str] = None
    proto: Optional[str] = None      # tcp or udp
    sport: Optional[Range] = None
    dport: Optional[Range] = None

    def matches(self, flow: Flow) -> bool:
        """For UDP `flow`, as the kernel decides it."""
        def inside(addr: str, prefix: Optional[str]) -> bool:
            return prefix is None or _span(prefix)[0] <= _addr(addr) <= _span(prefix)[1]

        def within(port: int, r: Optional[Range]) -> bool:
            return r is None or r[0] <= port <= r[1]

        return (self.proto in (None, "udp") and inside(flow.src, self.src)
                and inside(flow.dst, self.dst) and within(flow.sport, self.sport)
                and within(flow.dport, self.dport))

    def iptables(self) -> str:
        def ports(opt: str, r: Range) -> str:
            return f"--{opt} {r[0]}" if r[0] == r[1] else f"--{opt} {r[0]}:{r[1]}"

        parts = ["-A INPUT"]
        if self.src:
            parts.append(f"-s {self.src}")
        if self.dst:
            parts.append(f"-d {self.dst}")
        if self.proto:
            parts.append(f"-p {self.proto}")
        if self.sport:
            parts.append(ports("sport", self.sport))
        if self.dport:
            parts.append(ports("dport", self.dport))
        parts.append(f"-j {self.action}")
        return " ".join(parts)

    def nft(self, family: int) -> str:
        def ports(field: str, r: Range) -> str:
            return f"{self.proto} {field} {r[0]}" if r[0] == r[1] else \
                f"{self.proto} {field} {r[0]}-{r[1]}"

        _, addresses, protocol = _NFT[family]
        parts = []
        if self.src:
            parts.append(f"{addresses} saddr {self.src}")
        if self.dst:
            parts.append(f"{addresses} daddr {self.dst}")
        if self.proto and not (self.sport or self.dport):
            parts.append(f"{protocol} {self.proto}")
        if self.sport:
            parts.append(ports("sport", self.sport))
        if self.dport:
            parts.append(ports("dport", self.dport))
        parts.append(self.action.lower())
        return " ".join(parts)


@dataclass
class Ruleset:
    mix: str
    rules: list[Rule]      # N rules, the last one ACCEPTs MATCH (N = 0: none, the
                           # policy accepts every flow: each system's own baseline)
    extra: Rule            # what the append test adds after them

    @property
    def family(self) -> int:
        return FAMILY[self.mix]

    @property
    def flows(self) -> dict[str, Flow]:
        return FLOWS[self.family]

    def iptables_restore(self) -> str:
        return iptables_restore(self.rules)

    def nft_plain(self) -> str:
        return _nft_table([r.nft(self.family) for r in self.rules], self.family)

    def nft_sets(self) -> Optional[str]:
        """The same filter as set lookups, or None where the mix has no set form."""
        if self.mix not in SET_MIXES:
            return None
        spec = SET_MIXES[self.mix]
        elements = sorted({spec.key(r) for r in self.rules[:-1]}, key=spec.order)
        body = ", ".join(elements)
        decl = (f"\tset drops {{\n\t\ttype {spec.type};{spec.flags}\n"
                + (f"\t\telements = {{ {body} }}\n" if elements else "") + "\t}\n")
        return _nft_table([f"{spec.lookup} @drops drop",
                           *(r.nft(self.family) for r in self.rules[-1:])], self.family, decl)

    def nft_append(self) -> str:
        return f"add rule {_NFT[self.family][0]} bench input {self.extra.nft(self.family)}"

    def nft_sets_append(self) -> Optional[str]:
        spec = SET_MIXES.get(self.mix)
        return spec and f"add element {_NFT[self.family][0]} bench drops {{ {spec.key(self.extra)} }}"


def iptables_restore(rules: list[Rule]) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *(r.iptables() for r in rules), "COMMIT", ""])


def _nft_table(rules: list[str], family: int, decl: str = "") -> str:
    body = "".join(f"\t\t{r}\n" for r in rules)
    return (f"table {_NFT[family][0]} bench {{\n{decl}\tchain input {{\n"
            f"\t\ttype filter hook input priority 0; policy accept;\n{body}\t}}\n}}\n")


@dataclass(frozen=True)
class _SetSpec:
    type: str
    flags: str
    lookup: str
    key: object
    order: object


# Mixed prefix lengths need an interval set; the generator keeps them disjoint,
# which nft demands of a set's intervals.
_ADDRESS_SET = {family: _SetSpec(f"ipv{family}_addr", " flags interval;",
                                 f"{_NFT[family][1]} saddr", lambda r: r.src,
                                 lambda e: _span(e)[0])
                for family in (IPV4, IPV6)}
# Past 65533 rules ports repeat (a port space is that small): the set holds each once.
_PORT_SET = _SetSpec("inet_service", "", "udp dport", lambda r: str(r.dport[0]), int)
SET_MIXES = {"blocklist": _ADDRESS_SET[IPV4], "ports": _PORT_SET,
             "blocklist6": _ADDRESS_SET[IPV6], "ports6": _PORT_SET}


# ---------------------------------------------------------------- the mixes

def _misses(rule: Rule, family: int = IPV4) -> bool:
    return not any(rule.matches(f) for f in FLOWS[family].values())


# unicast space a random prefix is drawn from: IPv4's, IPv6's global unicast 2000::/3
_UNICAST = {IPV4: (1 << 24, 224 << 24), IPV6: (1 << 125, 2 << 125)}


def _random_prefix(rng: random.Random, length: int, family: int = IPV4) -> str:
    """A prefix of unicast space outside the lab's (198.18.0.0/15, 2001:db8::/32), host
    bits clear."""
    size = 1 << (_BITS[family] - length)
    lab = _LAB[family]
    while True:
        lo = rng.randrange(*_UNICAST[family]) & ~(size - 1)
        if lo + size - 1 < lab[0] or lo > lab[1]:
            return _prefix(lo, length, family)


# Prefix lengths of blocklists and their shares: IPv4's mostly hosts, some /24s, a
# few larger nets; IPv6's mostly hosts and /64s (a host's subnet), then sites and
# providers' allocations.
BLOCK_LENGTHS = {IPV4: ((32, 24, 20, 16), (85, 10, 4, 1)),
                 IPV6: ((128, 64, 56, 48, 40, 32), (70, 15, 5, 6, 2, 2))}


def _blocklist(rng: random.Random, count: int, family: int = IPV4) -> list[Rule]:
    """A blocklist as people keep one (BLOCK_LENGTHS), never overlapping (so the set
    form is the same filter)."""
    nets: list[str] = []
    while len(nets) < count:
        nets += [_random_prefix(rng, rng.choices(*BLOCK_LENGTHS[family])[0], family)
                 for _ in range(count - len(nets) + 16)]
        nets.sort(key=lambda net: _span(net)[0])
        disjoint, end = [], -1
        for net in nets:
            lo, hi = _span(net)
            if lo > end:
                disjoint.append(net)
                end = hi
        nets = disjoint
    return [Rule("DROP", src=net) for net in rng.sample(nets, count)]


def _ports(rng: random.Random, count: int) -> list[Rule]:
    space = [p for p in range(1, 65536) if p not in PORTS]
    out: list[int] = []
    while len(out) < count:
        rng.shuffle(space)
        out += space[:count - len(out)]
    return [Rule("DROP", proto="udp", dport=(p, p)) for p in out]


_WELL_KNOWN = (21, 22, 23, 25, 53, 80, 110, 123, 143, 161, 389, 443, 445, 514, 993,
               995, 1433, 1521, 3306, 3389, 5432, 5060, 8080, 8443)


def _classbench_rule(rng: random.Random) -> Rule:
    """One ACL rule shaped like ClassBench's acl seeds: prefix lengths skewed to
    /32 and /24 with some wildcards, tcp or udp, the source port mostly any, the
    destination port an exact service or a range."""
    def prefix() -> Optional[str]:
        length = rng.choices((32, 24, 16, rng.randrange(8, 31), 0), (40, 25, 10, 15, 10))[0]
        return _random_prefix(rng, length) if length else None

    def port_range() -> Range:
        kind = rng.choices(("high", "low", "window"), (50, 20, 30))[0]
        if kind == "high":
            return (1024, 65535)
        if kind == "low":
            return (0, 1023)
        lo = rng.randrange(1024, 65000)
        return (lo, lo + rng.choice((1, 7, 15, 63, 255)))

    def port(exact: int, kind: str) -> Optional[Range]:
        if kind == "range":
            return port_range()
        return (exact, exact) if kind == "exact" else None

    return Rule(rng.choice(("ACCEPT", "DROP")), src=prefix(), dst=prefix(),
                proto=rng.choices(("tcp", "udp"), (60, 40))[0],
                sport=port(rng.randrange(1, 65536),
                           rng.choices(("any", "range", "exact"), (80, 15, 5))[0]),
                dport=port(rng.choice(_WELL_KNOWN),
                           rng.choices(("any", "range", "exact"), (15, 30, 55))[0]))


def _classbench(rng: random.Random, count: int) -> list[Rule]:
    out: list[Rule] = []
    while len(out) < count:
        rule = _classbench_rule(rng)
        if _misses(rule):
            out.append(rule)
    return out


MATCH, MATCH6 = FLOWS[IPV4]["match"], FLOWS[IPV6]["match"]
_LAST = {
    "blocklist": Rule("ACCEPT", src=f"{MATCH.src}/32"),
    "ports": Rule("ACCEPT", proto="udp", dport=(MATCH.dport, MATCH.dport)),
    "classbench": Rule("ACCEPT", src=f"{MATCH.src}/32", dst=f"{MATCH.dst}/32", proto="udp",
                       sport=(MATCH.sport, MATCH.sport), dport=(MATCH.dport, MATCH.dport)),
    "blocklist6": Rule("ACCEPT", src=f"{MATCH6.src}/128"),
    "ports6": Rule("ACCEPT", proto="udp", dport=(MATCH6.dport, MATCH6.dport)),
}
_OTHERS = {"blocklist": _blocklist, "ports": _ports, "classbench": _classbench,
           "blocklist6": lambda rng, count: _blocklist(rng, count, IPV6), "ports6": _ports}


def generate(mix: str, n: int, seed: int = 1) -> Ruleset:
    """N rules of `mix` (the last ACCEPTs its MATCH flow) and one more for the append
    test; the same (mix, n, seed) always gives the same rules."""
    if mix not in _OTHERS:
        raise ValueError(f"unknown mix {mix!r} (known: {', '.join(MIXES)})")
    if n < 0:
        raise ValueError("a ruleset has no fewer than 0 rules")
    rng = random.Random(f"{mix}-{n}-{seed}")
    family = FAMILY[mix]
    others = _OTHERS[mix](rng, max(n, 1))
    extra, others = others[-1], others[:-1]
    rules = others + [_LAST[mix]] if n else []
    flows = FLOWS[family]
    assert all(_misses(r, family) for r in others + [extra])
    assert not rules or (rules[-1].matches(flows["match"]) and not rules[-1].matches(flows["miss"]))
    return Ruleset(mix, rules, extra)
