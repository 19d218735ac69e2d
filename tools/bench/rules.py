"""The benchmark's rulesets: one neutral list of rules per mix and size, rendered for
iptables-restore, for plain nftables and, where the mix allows, for nftables sets.

Every ruleset is built around two UDP flows from the sender namespace:

  MATCH   198.18.0.2:40000 -> 198.18.0.1:5001; only the last rule matches it (ACCEPT)
  MISS    198.18.0.3:40001 -> 198.18.0.1:5002; no rule matches it (policy ACCEPT)

so one loaded ruleset serves both variants and both flows are counted at the
receiver. Every other rule is checked against both flows and redrawn if it would
match either: each packet walks all N rules in a linear classifier.
"""
from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass
from typing import Optional

MIXES = ("blocklist", "ports", "classbench")


@dataclass(frozen=True)
class Flow:
    src: str
    sport: int
    dst: str
    dport: int


MATCH = Flow("198.18.0.2", 40000, "198.18.0.1", 5001)
MISS = Flow("198.18.0.3", 40001, "198.18.0.1", 5002)
FLOWS = {"match": MATCH, "miss": MISS}

Range = tuple[int, int]


def _addr(text: str) -> int:
    return struct.unpack("!I", socket.inet_aton(text))[0]


def _span(prefix: str) -> Range:
    """The first and last address of a.b.c.d/len."""
    addr, length = prefix.split("/")
    size = 1 << (32 - int(length))
    lo = _addr(addr) & ~(size - 1)
    return lo, lo + size - 1


def _prefix(lo: int, length: int) -> str:
    return f"{socket.inet_ntoa(struct.pack('!I', lo))}/{length}"


_LAB = _span("198.18.0.0/15")


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

    def nft(self) -> str:
        def ports(field: str, r: Range) -> str:
            return f"{self.proto} {field} {r[0]}" if r[0] == r[1] else \
                f"{self.proto} {field} {r[0]}-{r[1]}"

        parts = []
        if self.src:
            parts.append(f"ip saddr {self.src}")
        if self.dst:
            parts.append(f"ip daddr {self.dst}")
        if self.proto and not (self.sport or self.dport):
            parts.append(f"ip protocol {self.proto}")
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

    def iptables_restore(self) -> str:
        return iptables_restore(self.rules)

    def nft_plain(self) -> str:
        return _nft_table([r.nft() for r in self.rules])

    def nft_sets(self) -> Optional[str]:
        """The same filter as set lookups, or None where the mix has no set form."""
        if self.mix not in SET_MIXES:
            return None
        spec = SET_MIXES[self.mix]
        elements = sorted({spec.key(r) for r in self.rules[:-1]}, key=spec.order)
        body = ", ".join(elements)
        decl = (f"\tset drops {{\n\t\ttype {spec.type};{spec.flags}\n"
                + (f"\t\telements = {{ {body} }}\n" if elements else "") + "\t}\n")
        return _nft_table([f"{spec.lookup} @drops drop", *(r.nft() for r in self.rules[-1:])],
                          decl)

    def nft_append(self) -> str:
        return f"add rule ip bench input {self.extra.nft()}"

    def nft_sets_append(self) -> Optional[str]:
        spec = SET_MIXES.get(self.mix)
        return spec and f"add element ip bench drops {{ {spec.key(self.extra)} }}"


def iptables_restore(rules: list[Rule]) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *(r.iptables() for r in rules), "COMMIT", ""])


def _nft_table(rules: list[str], decl: str = "") -> str:
    body = "".join(f"\t\t{r}\n" for r in rules)
    return (f"table ip bench {{\n{decl}\tchain input {{\n"
            f"\t\ttype filter hook input priority 0; policy accept;\n{body}\t}}\n}}\n")


@dataclass(frozen=True)
class _SetSpec:
    type: str
    flags: str
    lookup: str
    key: object
    order: object


SET_MIXES = {
    # Mixed prefix lengths need an interval set; the generator keeps them disjoint,
    # which nft demands of a set's intervals.
    "blocklist": _SetSpec("ipv4_addr", " flags interval;", "ip saddr",
                          lambda r: r.src, lambda e: _span(e)[0]),
    # Past 65533 rules ports repeat (a port space is that small): the set holds each once.
    "ports": _SetSpec("inet_service", "", "udp dport", lambda r: str(r.dport[0]), int),
}


# ---------------------------------------------------------------- the mixes

def _misses(rule: Rule) -> bool:
    return not any(rule.matches(f) for f in FLOWS.values())


def _random_prefix(rng: random.Random, length: int) -> str:
    """A prefix of unicast space outside the lab's 198.18.0.0/15, host bits clear."""
    size = 1 << (32 - length)
    while True:
        lo = rng.randrange(1 << 24, 224 << 24) & ~(size - 1)
        if lo + size - 1 < _LAB[0] or lo > _LAB[1]:
            return _prefix(lo, length)


def _blocklist(rng: random.Random, count: int) -> list[Rule]:
    """A blocklist as people keep one: mostly hosts, some /24s, a few larger nets,
    never overlapping (so the set form is the same filter)."""
    nets: list[str] = []
    while len(nets) < count:
        nets += [_random_prefix(rng, rng.choices((32, 24, 20, 16), (85, 10, 4, 1))[0])
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
    space = [p for p in range(1, 65536) if p not in (MATCH.dport, MISS.dport)]
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


_LAST = {
    "blocklist": Rule("ACCEPT", src=f"{MATCH.src}/32"),
    "ports": Rule("ACCEPT", proto="udp", dport=(MATCH.dport, MATCH.dport)),
    "classbench": Rule("ACCEPT", src=f"{MATCH.src}/32", dst=f"{MATCH.dst}/32", proto="udp",
                       sport=(MATCH.sport, MATCH.sport), dport=(MATCH.dport, MATCH.dport)),
}
_OTHERS = {"blocklist": _blocklist, "ports": _ports, "classbench": _classbench}


def generate(mix: str, n: int, seed: int = 1) -> Ruleset:
    """N rules of `mix` (the last ACCEPTs MATCH) and one more for the append test;
    the same (mix, n, seed) always gives the same rules."""
    if mix not in _OTHERS:
        raise ValueError(f"unknown mix {mix!r} (known: {', '.join(MIXES)})")
    if n < 0:
        raise ValueError("a ruleset has no fewer than 0 rules")
    rng = random.Random(f"{mix}-{n}-{seed}")
    others = _OTHERS[mix](rng, max(n, 1))
    extra, others = others[-1], others[:-1]
    rules = others + [_LAST[mix]] if n else []
    assert all(_misses(r) for r in others + [extra])
    assert not rules or (rules[-1].matches(MATCH) and not rules[-1].matches(MISS))
    return Ruleset(mix, rules, extra)
