"""Seeded random filter-table rulesets (ip(6)tables-restore text) and packet cases.

generate(seed) -> (ruleset, cases), IPv4 unless `family` says IPv6. The ruleset uses
only what bpfilter implements (matches other than tcp, udp and icmp only when asked);
the cases are built from the values the rules mention (inside and just outside their
networks and ranges, port ranges, flag sets, ICMP types, TTLs or hop limits) so that
rules match often, plus random packets, fragments, truncated transport headers and
odd protocols. Every address lies in the lab's network of its family (198.18.0.0/15,
2001:db8::/32).

What the families share is written once; a Dialect says what differs in the rules
(addresses, the ICMP and its names, ttl or hl, -f), and each family has its own
packet cases: IPv4's with IP options and fragment offsets, IPv6's with chains of
extension headers, first and later fragments, extension headers cut short, neighbour
discovery, ICMPv6 errors quoting a packet, and connections both ways.

generate_large6(seed, size) -> (ruleset, cases): IPv6 long lists (blocklists of /32 to
/128 prefixes, per-port service rules, or a ClassBench-style ACL), with extension
headers, later fragments and chains that cannot be walked among the packets.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Callable

from bpfilter.model import Family
from bpfilter_lab.lab import (IPV4, IPV6, LAB_NET6, S_IN6_ADDR, S_IN_MAC, S_OUT_MAC, T_IN6_ADDR,
                              T_IN_ADDR, T_LOCAL, T_LOCAL6, T_OUT6_ADDR, T_OUT_ADDR, Case,
                              Wiring)
from bpfilter_lab.packets import (AuthenticationHeader, DestinationOptions, Fragment, HopByHop,
                                  Packet, Routing, icmpv6_error, mld_query,
                                  neighbour_advertisement, neighbour_solicitation, redirect,
                                  router_advertisement, router_solicitation)

BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
IFACES = ("vin0", "vout0", "vin+", "vout+", "v+", "lo", "nosuch0")
PORTS = (0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 65535)
TCP_FLAG_BITS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20}
COMMON_FLAGS = (0x02, 0x12, 0x10, 0x18, 0x04, 0x14, 0x01, 0x11, 0x00, 0x3F, 0xC2)
# iptables' ICMP names: type, and code (None: every code of the type).
ICMP_NAMES = {
    "any": (None, None),
    "echo-reply": (0, None), "destination-unreachable": (3, None),
    "network-unreachable": (3, 0), "host-unreachable": (3, 1),
    "port-unreachable": (3, 3), "fragmentation-needed": (3, 4),
    "host-prohibited": (3, 10), "source-quench": (4, None), "redirect": (5, None),
    "host-redirect": (5, 1), "echo-request": (8, None),
    "router-advertisement": (9, None), "time-exceeded": (11, None),
    "ttl-zero-during-transit": (11, 0), "ttl-zero-during-reassembly": (11, 1),
    "parameter-problem": (12, None), "ip-header-bad": (12, 0),
    "timestamp-request": (13, None), "address-mask-reply": (18, None),
}
# ip6tables' (libxt_icmp.h's icmpv6_codes; no "any")
ICMPV6_NAMES = {
    "destination-unreachable": (1, None), "no-route": (1, 0),
    "communication-prohibited": (1, 1), "address-unreachable": (1, 3),
    "port-unreachable": (1, 4), "packet-too-big": (2, None), "time-exceeded": (3, None),
    "ttl-zero-during-reassembly": (3, 1), "parameter-problem": (4, None),
    "unknown-header-type": (4, 1), "echo-request": (128, None), "echo-reply": (129, None),
    "router-solicitation": (133, None), "router-advertisement": (134, None),
    "neighbour-solicitation": (135, None), "neighbor-advertisement": (136, None),
    "redirect": (137, None),
}
LAB_LO = int(ipaddress.IPv4Address("198.18.0.0"))
LAB_SIZE = 1 << 17
# Network and broadcast addresses of T's subnets: no use as a source.
SUBNET_EDGES = T_LOCAL - {T_IN_ADDR, T_OUT_ADDR}
OPTIONS = (b"\x01\x01\x01\x00", b"\x94\x04\x00\x00")  # NOPs + EOL; router alert
OTHER_MAC = "02:bf:00:00:09:09"
LINK_LOCAL6 = "fe80::bf:102"          # the sender's, as it would say it
ALL_NODES = "ff02::1"
BROADCAST_MAC, MULTICAST_MAC = "ff:ff:ff:ff:ff:ff", "33:33:00:00:00:09"


# ---------------------------------------------------------------- the families

@dataclass(frozen=True)
class Dialect:
    """What a family's rules and addresses are made of."""
    wiring: Wiring
    bits: int                  # an address's
    lab_prefix: int            # the lab network's prefix length
    masks: tuple               # prefix lengths rules use (and one at random)
    icmp: str                  # -p name of the family's ICMP
    icmp_number: int
    icmp_option: str
    icmp_names: dict
    icmp_rule_types: tuple     # types a rule names by number (and one at random)
    icmp_code_types: tuple     # types a rule names with a code (and one at random)
    icmp_packet_types: tuple   # types packets have (and one at random)
    proto_numbers: tuple       # protocols rules name by number
    hop: str                   # the match comparing the ttl or the hop limit, its option stem
    lengths: tuple             # where a length range may start
    fragment_flag: bool        # -f (ip6tables has none)
    random_address: Callable

    @property
    def family(self) -> Family:
        return self.wiring.family

    @property
    def lab_lo(self) -> int:
        return int(ipaddress.ip_network(self.wiring.net).network_address)

    @property
    def lab_size(self) -> int:
        return 1 << (self.bits - self.lab_prefix)

    def number(self, address: str) -> int:
        return int(ipaddress.ip_address(address))

    def text(self, n: int) -> str:
        return str(ipaddress.IPv4Address(n) if self.bits == 32 else ipaddress.IPv6Address(n))

    @property
    def known(self) -> tuple:
        """The lab's own addresses: T's and the sender's on either side."""
        w = self.wiring
        return tuple(self.number(a) for a in (w.t_in, w.s_in, w.t_out, w.s_out))


def _random_ipv4(rng: random.Random) -> int:
    return LAB_LO + rng.randrange(LAB_SIZE)


def _random_ipv6(rng: random.Random) -> int:
    """2001:db8:<subnet>::<interface id>: a few subnets the lab names, or any; small
    interface ids, or any."""
    subnet = rng.choice([1, 2, 7, 8, rng.randrange(1 << 16)])
    iid = rng.choice([1, 2, rng.randrange(256), rng.getrandbits(64)])
    return 0x20010DB8 << 96 | subnet << 80 | iid


DIALECTS = {
    Family.IPV4: Dialect(
        IPV4, 32, 15, (0, 8, 15, 16, 24, 30, 32, 32), "icmp", 1, "--icmp-type", ICMP_NAMES,
        (0, 3, 5, 8, 11, 12, 13), (3, 5, 11, 12), (0, 3, 5, 8, 11, 12),
        (6, 17, 1, 47, 50, 89, 132), ("ttl", "--ttl"), (0, 100), True, _random_ipv4),
    Family.IPV6: Dialect(
        IPV6, 128, 32, (0, 16, 32, 33, 48, 56, 64, 96, 120, 127, 128, 128), "icmpv6", 58,
        "--icmpv6-type", ICMPV6_NAMES, (1, 2, 3, 4, 128, 129, 135, 136),
        (1, 3, 4), (1, 2, 3, 4, 128, 129, 133, 134, 135, 136, 137),
        # -p 0 is -p all; -p 43, 44, 51, 60 never match (the walk goes past them), and
        # 59, no next header, is a protocol of its own
        (6, 17, 58, 47, 50, 132, 59, 0, 43, 44, 51, 60), ("hl", "--hl"), (40, 160), False,
        _random_ipv6),
}


@dataclass
class _Hints:
    """Values the rules mention, to aim packets at them."""
    nets: list[tuple[int, int]] = field(default_factory=list)
    protos: list[int] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)
    icmp: list[tuple[int, "int | None"]] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)   # iprange
    ttls: list[int] = field(default_factory=list)
    # whole rules, to aim a packet at all their fields at once: (src net, dst net,
    # protocol, sport range, dport range), a None net or range for any
    rules: list[tuple] = field(default_factory=list)


# ---------------------------------------------------------------- rules

def _bang(rng: random.Random, p: float = 0.25) -> str:
    return "! " if rng.random() < p else ""


def _net(rng: random.Random, d: Dialect, hints: _Hints) -> str:
    base = rng.choice([*d.known, d.random_address(rng)])
    mask = rng.choice([*d.masks, rng.randint(0, d.bits)])
    hints.nets.append((base, mask))
    return f"{d.text(base)}/{mask}"


def _ports(rng: random.Random, hints: _Hints) -> str:
    def port() -> int:
        return rng.choice(PORTS) if rng.random() < 0.6 else rng.randrange(65536)
    kind = rng.random()
    if kind < 0.5:
        p = port()
        hints.ports.append(p)
        return str(p)
    lo, hi = sorted((port(), port()))
    hints.ports += [lo, hi]
    if kind < 0.6:
        return f":{hi}"
    if kind < 0.7:
        return f"{lo}:"
    return f"{lo}:{hi}"


def _flag_set(rng: random.Random) -> tuple[str, int]:
    r = rng.random()
    if r < 0.1:
        return "ALL", 0x3F
    if r < 0.2:
        return "NONE", 0
    names = rng.sample(sorted(TCP_FLAG_BITS), rng.randint(1, 4))
    return ",".join(names), sum(TCP_FLAG_BITS[n] for n in names)


def _tcp_udp(rng: random.Random, proto: str, hints: _Hints) -> list[str]:
    out = []
    if rng.random() < 0.4:
        out.append(f"{_bang(rng)}--sport {_ports(rng, hints)}")
    if rng.random() < 0.6:
        out.append(f"{_bang(rng)}--dport {_ports(rng, hints)}")
    if proto == "tcp" and rng.random() < 0.6:
        if rng.random() < 0.4:
            out.append(f"{_bang(rng)}--syn")
            hints.flags += [0x02, 0x12]
        else:
            (mname, mask), (cname, comp) = _flag_set(rng), _flag_set(rng)
            if rng.random() < 0.8:  # comparisons that can match
                comp &= mask
                cname = ",".join(n for n, b in TCP_FLAG_BITS.items() if comp & b) or "NONE"
            out.append(f"{_bang(rng)}--tcp-flags {mname} {cname}")
            hints.flags.append(comp)
    return out


def _icmp(rng: random.Random, d: Dialect, hints: _Hints) -> list[str]:
    if rng.random() < 0.3:
        return []
    r = rng.random()
    if r < 0.6:
        name = rng.choice(sorted(d.icmp_names))
        t, c = d.icmp_names[name]
        spec = name
    elif r < 0.8:
        t, c = rng.choice([*d.icmp_rule_types, rng.randrange(255)]), None
        spec = str(t)
    else:
        t, c = rng.choice([*d.icmp_code_types, rng.randrange(255)]), rng.randrange(16)
        spec = f"{t}/{c}"
    if t is not None:
        hints.icmp.append((t, c))
    return [f"{_bang(rng)}{d.icmp_option} {spec}"]


def _multiport(rng: random.Random, hints: _Hints) -> str:
    """A list iptables accepts: at most 15 slots, a range taking two, lo < hi."""
    items, slots = [], rng.randint(1, 15)
    while slots > 0:
        lo = rng.choice(PORTS) if rng.random() < 0.6 else rng.randrange(65535)
        if slots >= 2 and lo < 65535 and rng.random() < 0.3:
            hi = rng.randint(lo + 1, min(65535, lo + rng.choice([1, 10, 1000, 65535])))
            items.append(f"{lo}:{hi}")
            hints.ports += [lo, hi]
            slots -= 2
        else:
            items.append(str(lo))
            hints.ports.append(lo)
            slots -= 1
        if rng.random() < 0.3:
            break
    which = rng.choice(["--sports", "--dports", "--ports"])
    return f"-m multiport {_bang(rng)}{which} {','.join(items)}"


def _more_matches(rng: random.Random, d: Dialect, hints: _Hints) -> list[str]:
    """iprange, length, ttl (hl) and comment matches, any of them."""
    out = []
    if rng.random() < 0.3:
        specs = []
        for option in ("--src-range", "--dst-range"):
            if rng.random() < 0.6:
                lo = _aimed_addr(rng, d, hints)
                hi = lo + rng.choice([0, 1, 7, 300, 70000]) if rng.random() < 0.9 else lo - 3
                hints.ranges.append((lo, hi))
                specs.append(f"{_bang(rng)}{option} {d.text(lo)}-{d.text(hi)}")
        if specs:
            out.append("-m iprange " + " ".join(specs))
    if rng.random() < 0.25:
        lo = rng.randint(*d.lengths)
        span = f"{lo}" if rng.random() < 0.3 else f"{lo}:{lo + rng.randint(1, 40)}"
        out.append(f"-m length {_bang(rng)}--length {span}")
    if rng.random() < 0.25:
        ttl = rng.choice([0, 1, 2, 63, 64, 65, 127, 128, 254, 255, rng.randrange(256)])
        hints.ttls.append(ttl)
        name, stem = d.hop
        test = rng.choice([f"{stem}-eq", f"! {stem}-eq", f"{stem}-lt", f"{stem}-gt"])
        out.append(f"-m {name} {test} {ttl}")
    if rng.random() < 0.15:
        out.append(f'-m comment --comment "rule {rng.randrange(1000)}"')
    rng.shuffle(out)
    return out


def _extra_matches(rng: random.Random, chain: str) -> list[str]:
    """mark (the lab's output socket marks 0x42), pkttype, mac (INPUT and FORWARD only:
    user chains may be reached from OUTPUT), owner (OUTPUT only: the lab's sockets are
    root's) and limit (1/hour: no token comes back while a test runs)."""
    out = []
    if rng.random() < 0.12:
        mark = rng.choice(["0x42", "0", "0x2/0x2", "0x40/0xf0", "0/0xff00", "1"])
        out.append(f"-m mark {_bang(rng)}--mark {mark}")
    if rng.random() < 0.1:
        kind = rng.choice(["unicast", "multicast", "broadcast", "otherhost"])
        out.append(f"-m pkttype {_bang(rng)}--pkt-type {kind}")
    if chain in ("INPUT", "FORWARD") and rng.random() < 0.12:
        mac = rng.choice([S_IN_MAC, S_OUT_MAC, OTHER_MAC])
        out.append(f"-m mac {_bang(rng)}--mac-source {mac}")
    if chain == "OUTPUT" and rng.random() < 0.15:
        owner = rng.choice(["--uid-owner 0", "! --uid-owner 0", "--uid-owner 1-100",
                            "--gid-owner 0-10", "--socket-exists", "! --socket-exists"])
        out.append(f"-m owner {owner}")
    if rng.random() < 0.08:
        out.append(f"-m limit --limit 1/hour --limit-burst {rng.randint(1, 5)}")
    rng.shuffle(out)
    return out


def _rule(rng: random.Random, d: Dialect, chain: str, index: "int | None", chains: list[str],
          hints: _Hints, more: bool = False, extras: bool = False) -> str:
    parts = [f"-A {chain}"]
    if rng.random() < 0.3:
        parts.append(f"{_bang(rng)}-s {_net(rng, d, hints)}")
    if rng.random() < 0.3:
        parts.append(f"{_bang(rng)}-d {_net(rng, d, hints)}")
    # iptables refuses -i in OUTPUT and -o in INPUT; user chains may have both.
    if chain != "OUTPUT" and rng.random() < 0.2:
        parts.append(f"{_bang(rng)}-i {rng.choice(IFACES)}")
    if chain != "INPUT" and rng.random() < 0.2:
        parts.append(f"{_bang(rng)}-o {rng.choice(IFACES)}")
    if rng.random() < 0.55:
        r = rng.random()
        if r < 0.7:
            proto = rng.choice(["tcp", "tcp", "udp", "udp", d.icmp, d.icmp, "all"])
            inverted = proto != "all" and rng.random() < 0.15
            parts.append(f"{'! ' if inverted else ''}-p {proto}")
            hints.protos.append({"tcp": 6, "udp": 17, d.icmp: d.icmp_number, "all": 0}[proto])
            # Protocol matches need the plain, non-inverted protocol.
            if not inverted and proto in ("tcp", "udp"):
                parts += _tcp_udp(rng, proto, hints)
                if more and rng.random() < 0.5:
                    parts.append(_multiport(rng, hints))
            elif not inverted and proto == d.icmp:
                parts += _icmp(rng, d, hints)
        else:
            num = rng.choice(d.proto_numbers)
            # iptables refuses `! -p 0` ("rule would never match protocol")
            inverted = rng.random() < 0.2 and num != 0
            parts.append(f"{'! ' if inverted else ''}-p {num}")
            hints.protos.append(num)
            if more and num == 132 and not inverted and rng.random() < 0.5:
                parts.append(_multiport(rng, hints))
    if more:
        parts += _more_matches(rng, d, hints)
    if extras:
        parts += _extra_matches(rng, chain)
    if d.fragment_flag and rng.random() < 0.08:
        parts.append(f"{_bang(rng, 0.5)}-f")
    later = chains[index + 1:] if index is not None else chains
    targets = ["ACCEPT", "DROP", "RETURN", None] + \
        [f"-j {c}" for c in later] * 2 + [f"-g {c}" for c in later]
    target = rng.choice(targets)
    if target in ("ACCEPT", "DROP", "RETURN"):
        parts.append(f"-j {target}")
    elif target is not None:
        parts.append(target)
    return " ".join(parts)


# Long runs for the classifiers, which take IPv4 rules only: these are IPv4's.
V4 = DIALECTS[Family.IPV4]


@dataclass(frozen=True)
class _RunStyle:
    """What a run's rules vary in, kept to a few field shapes as real lists are
    (blocklists, service ports), so that the classifier takes the run."""
    src_masks: tuple
    dst_masks: tuple
    protos: tuple
    ports: bool
    ranges: bool = True


def _run_style(rng: random.Random) -> _RunStyle:
    return _RunStyle(src_masks=tuple(rng.sample([None, 32, 24, 16, 8, 0], rng.randint(1, 2))),
                     dst_masks=tuple(rng.sample([None, 32, 24], rng.randint(1, 2))),
                     protos=tuple(rng.sample(["tcp", "udp", "all", "47", None],
                                             rng.randint(1, 2))),
                     ports=rng.random() < 0.7)


def _simple_rule(rng: random.Random, chain: str, style: _RunStyle, hints: _Hints) -> str:
    """A rule the classifier takes: verdict target, no `!`, no interface, no -f, at
    most a tcp/udp port match without flags."""
    parts = [f"-A {chain}"]
    for flag, masks in (("-s", style.src_masks), ("-d", style.dst_masks)):
        mask = rng.choice(masks)
        if mask is not None:
            base = rng.choice([LAB_LO + 2, _random_ipv4(rng)])
            hints.nets.append((base, mask))
            parts.append(f"{flag} {V4.text(base)}/{mask}")
    proto = rng.choice(style.protos)
    if proto:
        parts.append(f"-p {proto}")
        hints.protos.append({"tcp": 6, "udp": 17, "all": 0, "47": 47}[proto])
    if proto in ("tcp", "udp") and style.ports:
        port = rng.choice(PORTS) if rng.random() < 0.5 else rng.randrange(65536)
        hints.ports.append(port)
        ranged = style.ranges and rng.random() < 0.2
        parts.append(f"--dport {port}:65535" if ranged else f"--dport {port}")
    parts.append(f"-j {rng.choice(['ACCEPT', 'DROP'])}")
    return " ".join(parts)


def runs_ruleset(rng: random.Random, hints: _Hints) -> str:
    """Long runs of simple rules (what the classifier takes), broken now and then by
    rules of any shape, in built-in chains and in a user chain."""
    lines = ["*filter"]
    lines += [f":{c} {rng.choice(['ACCEPT', 'DROP'])} [0:0]" for c in BUILTIN]
    lines.append(":runs - [0:0]")
    for chain in BUILTIN + ("runs",):
        for _ in range(rng.randint(1, 3)):
            style = _run_style(rng)
            lines += [_simple_rule(rng, chain, style, hints) for _ in range(rng.randint(16, 90))]
            if chain != "runs" and rng.random() < 0.5:
                lines.append(f"-A {chain} -j runs")
            else:
                lines.append(_rule(rng, V4, chain, 0 if chain == "runs" else None, ["runs"],
                                   hints))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _acl_rule(rng: random.Random, chain: str, hints: _Hints) -> str:
    """A ClassBench-style ACL rule (what multifield takes): source and destination
    prefixes of any length or none, tcp or udp or any protocol, the source port mostly
    any, the destination port exact, a range or any."""
    parts = [f"-A {chain}"]
    for flag in ("-s", "-d"):
        length = rng.choice([0, 0, 16, 20, 24, 24, 28, 30, 32, 32, rng.randint(15, 32)])
        if length:
            base = rng.choice([LAB_LO + 2, LAB_LO + LAB_SIZE // 2 + 2, _random_ipv4(rng)])
            hints.nets.append((base, length))
            parts.append(f"{flag} {V4.text(base)}/{length}")
    proto = rng.choices(["tcp", "udp", None], [5, 4, 1])[0]
    if proto:
        parts.append(f"-p {proto}")
        hints.protos.append({"tcp": 6, "udp": 17}[proto])
        for opt, weights in (("--sport", (70, 15, 15)), ("--dport", (20, 50, 30))):
            kind = rng.choices(["any", "exact", "range"], weights)[0]
            if kind == "exact":
                port = rng.choice(PORTS) if rng.random() < 0.5 else rng.randrange(65536)
                hints.ports.append(port)
                parts.append(f"{opt} {port}")
            elif kind == "range":
                lo, hi = rng.choice([(0, 1023), (1024, 65535)]) if rng.random() < 0.4 else \
                    sorted((rng.choice(PORTS), rng.randrange(65536)))
                hints.ports += [lo, hi]
                parts.append(f"{opt} {lo}:{hi}")
    parts.append(f"-j {rng.choice(['ACCEPT', 'DROP'])}")
    return " ".join(parts)


def acl_ruleset(rng: random.Random, hints: _Hints) -> str:
    """Long ClassBench-style ACL runs in built-in chains and a user chain, broken now
    and then by rules of any shape."""
    lines = ["*filter"]
    lines += [f":{c} {rng.choice(['ACCEPT', 'DROP'])} [0:0]" for c in BUILTIN]
    lines.append(":acl - [0:0]")
    for chain in BUILTIN + ("acl",):
        for _ in range(rng.randint(1, 2)):
            lines += [_acl_rule(rng, chain, hints) for _ in range(rng.randint(100, 300))]
            if chain != "acl" and rng.random() < 0.5:
                lines.append(f"-A {chain} -j acl")
            else:
                lines.append(_rule(rng, V4, chain, 0 if chain == "acl" else None, ["acl"], hints))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def large_ruleset(rng: random.Random, hints: _Hints, size: int) -> str:
    """`size` rules in INPUT and FORWARD as long lists are written: a source blocklist,
    then per-port service rules, then a short tail of rules of any shape."""
    blocklist = _RunStyle((32, 24), (None,), (None,), False)
    services = _RunStyle((None,), (None, 32), ("tcp", "udp"), True, ranges=False)
    lines = ["*filter"] + [f":{c} {rng.choice(['ACCEPT', 'DROP'])} [0:0]" for c in BUILTIN]
    for chain in ("INPUT", "FORWARD"):
        for style, count in ((blocklist, size // 4), (services, size // 4)):
            lines += [_simple_rule(rng, chain, style, hints) for _ in range(count)]
        lines += [_rule(rng, V4, chain, None, [], hints) for _ in range(5)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def large_acl_ruleset(rng: random.Random, hints: _Hints, size: int) -> str:
    """`size` ClassBench-style ACL rules in INPUT, then a short tail of any shape."""
    lines = ["*filter"] + [f":{c} {rng.choice(['ACCEPT', 'DROP'])} [0:0]" for c in BUILTIN]
    lines += [_acl_rule(rng, "INPUT", hints) for _ in range(size)]
    lines += [_rule(rng, V4, "INPUT", None, [], hints) for _ in range(5)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def ruleset(rng: random.Random, d: Dialect, hints: _Hints, more: bool = False,
            extras: bool = False) -> str:
    chains = [f"c{i}" for i in range(rng.randint(0, 5))]
    lines = ["*filter"]
    lines += [f":{c} {rng.choice(['ACCEPT', 'DROP'])} [0:0]" for c in BUILTIN]
    lines += [f":{c} - [0:0]" for c in chains]
    for chain in BUILTIN:
        lines += [_rule(rng, d, chain, None, chains, hints, more, extras)
                  for _ in range(rng.randint(0, 8))]
    for i, chain in enumerate(chains):
        lines += [_rule(rng, d, chain, i, chains, hints, more, extras)
                  for _ in range(rng.randint(0, 6))]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- what both families' cases share

def _aimed_addr(rng: random.Random, d: Dialect, hints: _Hints) -> int:
    """An address inside, or just outside, a network or range a rule names."""
    lab_lo, lab_size = d.lab_lo, d.lab_size
    if hints.ranges and rng.random() < 0.3:
        lo, hi = rng.choice(hints.ranges)
        return max(lab_lo, min(lab_lo + lab_size - 1, rng.choice([lo, hi, lo - 1, hi + 1])))
    if not hints.nets or rng.random() < 0.3:
        return rng.choice([d.known[1], d.known[3], d.random_address(rng)])
    base, mask = rng.choice(hints.nets)
    if mask <= d.lab_prefix:
        return d.random_address(rng)
    host_bits = d.bits - mask
    inside = (base >> host_bits << host_bits) | rng.getrandbits(host_bits) if host_bits else base
    if rng.random() < 0.7:
        return inside
    return inside ^ (1 << host_bits)


def _addr_for(rng: random.Random, d: Dialect, hints: _Hints, allowed) -> str:
    while True:
        a = d.text(_aimed_addr(rng, d, hints))
        if allowed(a):
            return a


def _port(rng: random.Random, hints: _Hints) -> int:
    if hints.ports and rng.random() < 0.6:
        return max(0, min(65535, rng.choice(hints.ports) + rng.choice([0, 0, 0, -1, 1])))
    return rng.choice(PORTS) if rng.random() < 0.5 else rng.randrange(65536)


def _proto(rng: random.Random, d: Dialect, hints: _Hints, protos: tuple) -> int:
    if hints.protos and rng.random() < 0.7:
        return rng.choice(hints.protos) or rng.choice(protos)
    return rng.choice(protos)


def _transport(rng: random.Random, d: Dialect, hints: _Hints, proto: int, kw: dict) -> None:
    """Ports, tcp flags, ICMP type and code, aimed at what the rules name."""
    if proto in (6, 17):
        kw["sport"], kw["dport"] = _port(rng, hints), _port(rng, hints)
    if proto == 6:
        if hints.flags and rng.random() < 0.6:
            f = rng.choice(hints.flags)
            kw["tcp_flags"] = f ^ (1 << rng.randrange(8)) if rng.random() < 0.3 else f
        else:
            kw["tcp_flags"] = rng.choice(COMMON_FLAGS) if rng.random() < 0.7 \
                else rng.randrange(256)
    if proto == d.icmp_number:
        if hints.icmp and rng.random() < 0.7:
            t, c = rng.choice(hints.icmp)
            kw["icmp_type"] = t
            kw["icmp_code"] = c if c is not None and rng.random() < 0.8 else rng.randrange(16)
        else:
            kw["icmp_type"] = rng.choice([*d.icmp_packet_types, rng.randrange(256)])
            kw["icmp_code"] = rng.randrange(16)


def _hop_limit(rng: random.Random, hints: _Hints, kw: dict) -> None:
    if hints.ttls and rng.random() < 0.6:
        kw["ttl"] = max(1, min(255, rng.choice(hints.ttls) + rng.choice([-1, 0, 1])))


# ---------------------------------------------------------------- IPv4 cases

def _case4(rng: random.Random, hints: _Hints) -> list[Case]:
    d = V4
    path = rng.choices(["input", "forward", "output"], [0.35, 0.4, 0.25])[0]
    proto = _proto(rng, d, hints, d.proto_numbers)
    kw: dict = {"proto": proto, "payload_len": rng.randint(8, 48)}
    if path == "input":
        kw["dst"] = rng.choice([T_IN_ADDR, T_OUT_ADDR])
    else:
        kw["dst"] = _addr_for(rng, d, hints, lambda a: a not in T_LOCAL)
    kw["src"] = _addr_for(rng, d, hints, lambda a: a not in SUBNET_EDGES)
    _transport(rng, d, hints, proto, kw)
    if path != "input" and rng.random() < 0.12:
        if rng.random() < 0.7:
            kw["frag_offset"] = 1 if rng.random() < 0.3 else rng.randint(2, 200)
            kw["more_fragments"] = rng.random() < 0.5
        else:
            kw["more_fragments"] = True
    header_len = Packet(src="", dst="", proto=proto).header_len
    if header_len and not kw.get("frag_offset") and rng.random() < 0.07 \
            and not (path == "input" and proto == 1):
        kw["truncate_l4"] = rng.randrange(header_len)
    if rng.random() < 0.05:
        kw["options"] = rng.choice(OPTIONS)
    _hop_limit(rng, hints, kw)
    return [Case(Packet(**kw), path)]


# ---------------------------------------------------------------- IPv6 cases

V6 = DIALECTS[Family.IPV6]
T6, T6_OUT, S6 = IPV6.t_in, IPV6.t_out, IPV6.s_in
# what packets are made of (rules' protocol numbers aside: 0 is -p all)
PACKET_PROTOS6 = (6, 17, 58, 47, 50, 132, 59, 44, 60)


def _extension(rng: random.Random, first: bool, dst: str):
    """One extension header: hop-by-hop mostly first, routing headers with segments
    left or none (only the last address's owner processes them), first and later
    fragments (some followed by an extension header, which the walk cannot pass), AH;
    now and then one whose length byte lies, running into what follows or past the
    packet's end (where kernels' walks differ: packet/ipv6_probe.py)."""
    kind = rng.choice(["hbh" if first else "dst", "dst", "rt", "first", "later", "ah"] * 4 +
                      ["lying"])
    if kind == "lying":
        if rng.random() < 0.5:
            return DestinationOptions(ext_len=rng.choice([1, 3, 9, 255]))
        return AuthenticationHeader(ext_len=rng.choice([0, 1, 6, 255]))
    if kind == "hbh":
        return HopByHop()
    if kind == "dst":
        return DestinationOptions()
    if kind == "rt":
        left = rng.choice([0, 0, 1])
        return Routing(rng.choice([0, 2, 4]), left, (dst,) if left or rng.random() < 0.5 else ())
    if kind == "first":
        return Fragment(offset=0, more=True)
    if kind == "later":
        return Fragment(offset=rng.choice([1, 2, 8, rng.randint(3, 200)]),
                        more=rng.random() < 0.5,
                        next_header=60 if rng.random() < 0.15 else None)
    return AuthenticationHeader(spi=rng.randrange(1 << 32),
                                icv=bytes(rng.choice([4, 12, 20])))


def _chain_length(ext: tuple) -> int:
    return sum(len(h.encode(0, 0)) for h in ext)


def _packet6(rng: random.Random, hints: _Hints, path: str, src: str, dst: str,
             proto: "int | None" = None, **fields) -> Packet:
    """A packet of any protocol aimed at the rules, with extension headers or not."""
    d = V6
    if proto is None:
        proto = _proto(rng, d, hints, PACKET_PROTOS6)
    kw: dict = {"src": src, "dst": dst, "proto": proto, "payload_len": rng.randint(8, 48)}
    _transport(rng, d, hints, proto, kw)
    if rng.random() < 0.4:
        kw["ext"] = tuple(_extension(rng, i == 0, dst) for i in range(rng.choice([1, 1, 2, 3])))
    ext = kw.get("ext", ())
    later = any(isinstance(h, Fragment) and h.offset for h in ext)
    header_len = Packet(src=src, dst=dst, proto=proto).header_len
    r = rng.random()
    hop_by_hop_first = bool(ext) and ext[0].number == HopByHop.number
    if header_len and not later and r < 0.07:
        kw["truncate_l4"] = rng.randrange(header_len)
        if path == "input" and proto == 58 and len(ext) <= hop_by_hop_first:
            # T's raw ICMPv6 socket reads it (after hop-by-hop options) only from 4 bytes on
            kw["truncate_l4"] = max(kw["truncate_l4"], 4)
        kw["payload_len"] = 0
    elif ext and r < 0.12:
        kw["truncate_ext"] = rng.randrange(_chain_length(ext))
        kw["payload_len"] = 0
    elif path != "output" and hop_by_hop_first and r < 0.15:
        # a zero payload length after hop-by-hop (a jumbogram's) leaves the receiving
        # skb untrimmed: skb->len and what the header says differ
        kw["stated_length"] = 0
    elif path != "output" and r < 0.17:
        # less than the packet holds: the receiving stack trims it to that before any
        # hook (and drops it if it holds less than its header says)
        kw["stated_length"] = rng.choice([0, 4, 8, 16, 24])
    elif path == "output" and r < 0.15:
        kw["stated_length"] = rng.choice([0, 8, 100, 1500])   # a raw socket's header lies
    _hop_limit(rng, hints, kw)
    return Packet(**{**kw, **fields})


def _local_input(rng: random.Random, hints: _Hints) -> Case:
    """To T: its addresses, or all-nodes; now and then in a broadcast or multicast
    frame (pkttype), from the sender's addresses or others."""
    dst = rng.choice([T6, T6, T6_OUT, ALL_NODES])
    src = _addr_for(rng, V6, hints, lambda a: a not in T_LOCAL6)
    eth = rng.choice([None] * 8 + [BROADCAST_MAC, MULTICAST_MAC])
    return Case(_packet6(rng, hints, "input", src, dst, eth_dst=eth), "input")


def _neighbour_discovery(rng: random.Random) -> Case:
    """Neighbour discovery and MLD as the sender would send them to T."""
    src = rng.choice([S6, LINK_LOCAL6])
    dst = rng.choice([T6, ALL_NODES])
    kind = rng.randrange(6)
    if kind == 0:
        p = neighbour_solicitation(src, dst, rng.choice([T6, T6_OUT]), S_IN_MAC)
    elif kind == 1:
        p = neighbour_advertisement(src, dst, src, target_lladdr=S_IN_MAC)
    elif kind == 2:
        p = router_solicitation(LINK_LOCAL6, ALL_NODES)
    elif kind == 3:
        p = router_advertisement(LINK_LOCAL6)
    elif kind == 4:
        p = redirect(LINK_LOCAL6, T6, S6, "2001:db8:7::7")
    else:
        p = mld_query(LINK_LOCAL6)
    return Case(p, "input")


def _icmpv6_error(rng: random.Random, hints: _Hints, path: str, src: str, dst: str) -> Case:
    """An error about a packet `dst` sent to `src` (quoting it, extension headers
    and all)."""
    about = _packet6(rng, hints, "output", dst, src, proto=rng.choice([6, 17, 58]))
    icmp_type = rng.choice([1, 2, 3, 4])
    return Case(icmpv6_error(src, dst, about, icmp_type=icmp_type, icmp_code=rng.randrange(7),
                             icmp_rest=rng.choice([0, 1280, 40])), path)


def _not_local(a: str) -> bool:
    return a not in T_LOCAL6


def _connection(rng: random.Random, hints: _Hints) -> list[Case]:
    """A tcp or udp packet and its answer: input then output (T serves), output then
    input (T is the client), forward then reverse (the sender is the client)."""
    proto = rng.choice([6, 17])
    kind = rng.randrange(3)
    far = _addr_for(rng, V6, hints, _not_local)
    if kind == 0:
        there, back, client, server = "input", "output", far, rng.choice([T6, T6_OUT])
    elif kind == 1:
        there, back, client, server = "output", "input", rng.choice([T6, T6_OUT]), far
    else:
        far = _addr_for(rng, V6, hints, lambda a: _not_local(a) and a != S6)
        there, back, client, server = "forward", "reverse", S6, far
    sport, dport = _port(rng, hints), _port(rng, hints)
    flags = rng.choice([(0x02, 0x12), (0x10, 0x10), (0x18, 0x10), (0x11, 0x14)])
    first = _packet6(rng, hints, there, client, server, proto, sport=sport, dport=dport,
                     tcp_flags=flags[0])
    answer = _packet6(rng, hints, back, server, client, proto, sport=dport, dport=sport,
                      tcp_flags=flags[1])
    return [Case(first, there), Case(answer, back)]


def _case6(rng: random.Random, hints: _Hints) -> list[Case]:
    r = rng.random()
    if r < 0.15:
        return _connection(rng, hints)
    if r < 0.2:
        return [_neighbour_discovery(rng)]
    path = rng.choices(["input", "forward", "reverse", "output"], [0.3, 0.35, 0.1, 0.25])[0]
    if path == "input":
        src, dst = _addr_for(rng, V6, hints, _not_local), rng.choice([T6, T6_OUT])
    elif path == "reverse":
        src, dst = _addr_for(rng, V6, hints, _not_local), S6
    else:
        src = _addr_for(rng, V6, hints, lambda a: True)
        dst = _addr_for(rng, V6, hints, _not_local)
    if r < 0.28:
        return [_icmpv6_error(rng, hints, path, src, dst)]
    if path == "input" and r < 0.45:
        return [_local_input(rng, hints)]
    return [Case(_packet6(rng, hints, path, src, dst), path)]


_CASES = {Family.IPV4: _case4, Family.IPV6: _case6}


def generate(seed: int, n_cases: int = 200, runs: bool = False,
             size: "int | None" = None, acl: bool = False,
             more: bool = False, family: Family = Family.IPV4,
             extras: bool = False) -> tuple[str, list[Case]]:
    """A ruleset and packets aimed at it; `runs`: made of long runs of simple rules;
    `acl`: of long ClassBench-style ACL runs; `size`: that many rules, as large real
    lists are written (or, with `acl`, as one long ACL); those three are IPv4's, for
    the classifiers. `more`: with the multiport, iprange, length, ttl (hl) and comment
    matches too; `extras`: with mark, pkttype, mac, owner and limit."""
    rng = random.Random(seed)
    hints = _Hints()
    if family is not Family.IPV4 and (runs or acl or size is not None):
        raise ValueError("these long runs are IPv4's: IPv6's long lists are generate_large6's")
    if size is not None:
        text = (large_acl_ruleset if acl else large_ruleset)(rng, hints, size)
    elif acl:
        text = acl_ruleset(rng, hints)
    elif runs:
        text = runs_ruleset(rng, hints)
    else:
        text = ruleset(rng, DIALECTS[family], hints, more, extras)
    cases: list[Case] = []
    while len(cases) < n_cases:
        cases += _CASES[family](rng, hints)
    return text, cases[:n_cases]


# ---------------------------------------------------------------- IPv6 long lists

SOURCES6 = ipaddress.IPv6Network("2000::/12")   # where blocklisted sources are drawn from
LAB6 = ipaddress.IPv6Network(LAB_NET6)          # forwarded destinations, routed by T
BLOCK_LENGTHS6 = ((128, 64, 56, 48, 40, 32, 96, 127), (50, 25, 6, 8, 2, 3, 3, 3))


def _prefix6(rng: random.Random, space: ipaddress.IPv6Network, length: int) -> tuple[int, int]:
    base = int(space.network_address) | rng.getrandbits(128 - space.prefixlen)
    return base >> (128 - length) << (128 - length), length


def _text6(addr: int, length: int) -> str:
    return f"{ipaddress.IPv6Address(addr)}/{length}"


def large_ruleset6(rng: random.Random, hints: _Hints, size: int) -> str:
    """`size` IPv6 rules in INPUT and FORWARD as long lists are written: a source
    blocklist of prefixes /32 to /128 (some with -p, whose rules drop what cannot be
    walked), per-port tcp and udp service rules (some for one destination), then a
    short tail of rules the classifier does not take."""
    lines = ["*filter"] + [f":{c} {rng.choice(['ACCEPT', 'DROP'])} [0:0]" for c in BUILTIN]
    for chain in ("INPUT", "FORWARD"):
        for _ in range(size // 4):
            net = _prefix6(rng, SOURCES6, rng.choices(*BLOCK_LENGTHS6)[0])
            hints.nets.append(net)
            proto = rng.choices(["", " -p tcp", " -p udp", " -p all"], (80, 8, 8, 4))[0]
            lines.append(f"-A {chain} -s {_text6(*net)}{proto} -j {rng.choice(['DROP', 'ACCEPT'])}")
        for _ in range(size // 4):
            proto = rng.choice(["tcp", "udp"])
            port = rng.choice(PORTS) if rng.random() < 0.2 else rng.randrange(65536)
            hints.ports.append(port)
            hints.protos.append({"tcp": 6, "udp": 17}[proto])
            dst = ""
            if rng.random() < 0.3:
                net = _prefix6(rng, LAB6, rng.choice([128, 64]))
                hints.nets.append(net)
                dst = f" -d {_text6(*net)}"
            lines.append(f"-A {chain}{dst} -p {proto} --dport {port} "
                         f"-j {rng.choice(['DROP', 'ACCEPT'])}")
        lines += [f"-A {chain} -p ipv6-icmp -j ACCEPT", f"-A {chain} ! -s {T_IN6_ADDR}/64 -p tcp --syn -j DROP",
                  f"-A {chain} -i vin0 -p udp ! --dport 53 -j ACCEPT"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _aimed6(rng: random.Random, hints: _Hints, space: ipaddress.IPv6Network) -> str:
    """An address of `space`, inside or just outside a network a rule names there."""
    nets = [(a, n) for a, n in hints.nets if ipaddress.IPv6Address(a) in space]
    addr = int(space.network_address) | rng.getrandbits(128 - space.prefixlen)
    if nets and rng.random() < 0.8:
        base, length = rng.choice(nets)
        host = 128 - length
        inside = base | rng.getrandbits(host) if host else base
        outside = inside ^ (1 << host) if host < 128 else inside
        addr = outside if rng.random() < 0.3 and ipaddress.IPv6Address(outside) in space \
            else inside
    return str(ipaddress.IPv6Address(addr))


def _inside6(rng: random.Random, net: "tuple[int, int] | None", space) -> str:
    if net is None:
        return _aimed6(rng, _Hints(), space)
    base, length = net
    return str(ipaddress.IPv6Address(base | rng.getrandbits(128 - length)))


def _aimed_at_rule6(rng: random.Random, hints: _Hints) -> Case:
    """A forwarded packet every field of one rule matches (or, now and then, one port
    just past its range)."""
    src, dst, proto, sports, dports = rng.choice(hints.rules)
    while (address := _inside6(rng, dst, LAB6)) in T_LOCAL6 | {S_IN6_ADDR}:
        pass

    def port(span):
        if span is None:
            return rng.randrange(65536)
        lo, hi = span
        return rng.choice([lo, hi, rng.randint(lo, hi), min(65535, hi + 1)])
    return Case(Packet(_inside6(rng, src, SOURCES6), address, proto, sport=port(sports),
                       dport=port(dports), tcp_flags=rng.choice(COMMON_FLAGS)), "forward")


def _long_list_case6(rng: random.Random, hints: _Hints) -> Case:
    if hints.rules and rng.random() < 0.5:
        return _aimed_at_rule6(rng, hints)
    path = rng.choices(["input", "forward", "output"], [0.35, 0.4, 0.25])[0]
    proto = rng.choice(hints.protos) if hints.protos and rng.random() < 0.7 else \
        rng.choice([6, 17, 58, 47])
    kw: dict = {"proto": proto, "payload_len": rng.randint(8, 48)}
    if path == "input":
        kw["dst"] = rng.choice([T_IN6_ADDR, T_OUT6_ADDR])
    else:
        while (dst := _aimed6(rng, hints, LAB6)) in T_LOCAL6 | {S_IN6_ADDR}:
            pass
        kw["dst"] = dst
    kw["src"] = _aimed6(rng, hints, SOURCES6 if rng.random() < 0.8 else LAB6)
    if proto in (6, 17):
        kw["sport"], kw["dport"] = _port(rng, hints), _port(rng, hints)
    if proto == 6:
        kw["tcp_flags"] = rng.choice(COMMON_FLAGS)
    kind = rng.choices(["plain", "options", "first", "later", "unwalkable", "short"],
                       (60, 10, 6, 8, 8, 8))[0]
    if kind == "options":
        kw["ext"] = rng.choice([(HopByHop(),), (DestinationOptions(),),
                                (HopByHop(), DestinationOptions())])
    elif kind == "first":
        kw["ext"] = (Fragment(more=True),)
    elif kind == "later":
        kw["ext"] = (Fragment(offset=rng.choice([1, 2, 100])),)
    elif kind == "unwalkable":
        # a destination options header cut short, or a later fragment followed by an
        # extension header: -p walks fail on either (hop-by-hop would be dropped first)
        if rng.random() < 0.5:
            kw["ext"], kw["truncate_ext"] = (DestinationOptions(),), 1
        else:
            kw["ext"] = (Fragment(offset=8, next_header=60),)
    elif kind == "short" and proto in (6, 17):
        kw["truncate_l4"] = rng.randrange({6: 20, 17: 8}[proto])
    return Case(Packet(**kw), path)


def acl_ruleset6(rng: random.Random, hints: _Hints, size: int) -> str:
    """`size` ClassBench-style IPv6 ACL rules in FORWARD (prefixes of every length from
    /32 on, or none; tcp or udp; port ranges), which neither classifier takes: code."""
    lines = ["*filter"] + [f":{c} {rng.choice(['ACCEPT', 'DROP'])} [0:0]" for c in BUILTIN]
    for _ in range(size):
        parts = ["-A FORWARD"]
        aim: list = []
        for flag, space in (("-s", SOURCES6), ("-d", LAB6)):
            net = None
            # no rule wild in both addresses: it would catch most packets of its protocol
            if rng.random() < 0.8 or (flag == "-d" and aim == [None]):
                shortest = space.prefixlen + 16   # (LAB6 is a /32: no rule takes it all)
                net = _prefix6(rng, space, rng.choice([max(32, shortest), 48, 56, 64, 128,
                                                       rng.randint(shortest, 128)]))
                hints.nets.append(net)
                parts.append(f"{flag} {_text6(*net)}")
            aim.append(net)
        proto = rng.choice(["tcp", "udp"])
        hints.protos.append({"tcp": 6, "udp": 17}[proto])
        parts.append(f"-p {proto}")
        aim.append({"tcp": 6, "udp": 17}[proto])
        for option in ("--sport", "--dport"):
            span = None
            if rng.random() < 0.7:
                lo = rng.choice(PORTS) if rng.random() < 0.3 else rng.randrange(65536)
                hi = min(65535, lo + rng.choice([0, 1, 100, 5000]))
                hints.ports += [lo, hi]
                parts.append(f"{option} {lo}:{hi}" if hi > lo else f"{option} {lo}")
                span = (lo, hi)
            aim.append(span)
        hints.rules.append(tuple(aim))
        parts.append(f"-j {rng.choice(['ACCEPT', 'DROP'])}")
        lines.append(" ".join(parts))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def generate_large6(seed: int, size: int, n_cases: int = 400,
                    acl: bool = False) -> tuple[str, list[Case]]:
    """An IPv6 ruleset of `size` long-list rules (large_ruleset6; `acl`: acl_ruleset6)
    and packets aimed at it."""
    rng = random.Random(seed)
    hints = _Hints()
    text = (acl_ruleset6 if acl else large_ruleset6)(rng, hints, size)
    return text, [_long_list_case6(rng, hints) for _ in range(n_cases)]
