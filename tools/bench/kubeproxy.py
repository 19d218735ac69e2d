#!/usr/bin/env python3
"""A kube-proxy-shaped ruleset with N Services, as kube-proxy 1.3x's iptables mode
writes it (pkg/proxy/iptables/proxier.go; ../shared/realworld/kube-proxy-iptables-mode.rules
is its own test's output) and as its nftables mode writes the same Services
(pkg/proxy/nftables: a verdict map from address, protocol and port to each Service's
chain).

Every Service is a ClusterIP on TCP port 80 with two endpoints on port 8080, chosen by
`statistic --mode random --probability 0.5`; every fifth of the first 10,000 has a
NodePort (30000 + its number / 5), and so has the last one (LAST_NODEPORT). The last
Service's ClusterIP is what the benchmark connects to (its rule is the last of
KUBE-SERVICES, which ip_tables walks to the end); its endpoints are ENDPOINTS, which
the benchmark's server namespace holds. With `affine`, the one before it has
`sessionAffinity: ClientIP` (kube-proxy's `-m recent` rules: a client's connections
stay with the endpoint its first one got, for three hours) and AFFINE_ENDPOINTS.

`iptables(N, ipv6=True)` is the same Services on an IPv6 cluster, for ip6tables.

    python3 tools/bench/kubeproxy.py iptables|iptables-change|nft|nft-change N
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import sys

CLUSTER_CIDR = "10.244.0.0/16"     # the pods' addresses (KUBE-SVC's masquerade test)
SERVICE_NET = ipaddress.IPv4Address("172.30.0.0")   # its first host address is the first's
ENDPOINT_NET = ipaddress.IPv4Address("10.128.0.0")
ENDPOINTS = ("10.96.0.1", "10.96.0.2")    # the last Service's, held by the server
AFFINE_ENDPOINTS = ("10.96.0.3", "10.96.0.4")   # the affine Service's, held there too
AFFINITY_SECONDS = 10800    # kube-proxy's default sessionAffinityConfig timeout
SERVICE_PORT, TARGET_PORT = 80, 8080
NODEPORT_EVERY, NODEPORT_BASE, NODEPORTS = 5, 30000, 2000
LAST_NODEPORT = NODEPORT_BASE + NODEPORTS   # the last Service's
MASQ_MARK = "0x4000"


def _hash(text: str) -> str:
    """kube-proxy's chain suffix: base32 of sha256, 16 characters."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


# an IPv6 cluster's (kube-proxy writes the same rules for ip6tables)
CLUSTER_CIDR6 = "fd00:10:244::/64"
SERVICE_NET6 = ipaddress.IPv6Address("fd00:30::")
ENDPOINT_NET6 = ipaddress.IPv6Address("fd00:10:128::")
ENDPOINTS6 = ("fd00:96::1", "fd00:96::2")
AFFINE_ENDPOINTS6 = ("fd00:96::3", "fd00:96::4")


class Service:
    def __init__(self, number: int, count: int, affine: bool = False, ipv6: bool = False):
        self.number = number
        self.name = f"ns{number // 100}/svc{number}:p80"
        self.ip = str((SERVICE_NET6 if ipv6 else SERVICE_NET) + 1 + number)
        last = number == count - 1
        self.affine = affine and number == count - 2
        endpoint_net = ENDPOINT_NET6 if ipv6 else ENDPOINT_NET
        self.endpoints = ((ENDPOINTS6 if ipv6 else ENDPOINTS) if last
                          else (AFFINE_ENDPOINTS6 if ipv6 else AFFINE_ENDPOINTS) if self.affine
                          else tuple(str(endpoint_net + 2 * number + k) for k in range(2)))
        self.ipv6 = ipv6
        self.svc = "KUBE-SVC-" + _hash(self.name + "tcp")
        self.ext = "KUBE-EXT-" + _hash(self.name + "tcp")
        self.seps = ["KUBE-SEP-" + _hash(self.name + "tcp" + ep) for ep in self.endpoints]
        self.nodeport = (LAST_NODEPORT if last
                         else NODEPORT_BASE + number // NODEPORT_EVERY
                         if number % NODEPORT_EVERY == 0 and number < NODEPORTS * NODEPORT_EVERY
                         else None)


    def target(self, endpoint: str) -> str:
        """An endpoint's address and port as kube-proxy writes them (net.JoinHostPort)."""
        return f"[{endpoint}]:{TARGET_PORT}" if self.ipv6 else f"{endpoint}:{TARGET_PORT}"


def services(count: int, affine: bool = False, ipv6: bool = False) -> list[Service]:
    return [Service(i, count, affine, ipv6) for i in range(count)]


FILTER = [
    "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
    *(f":{c} - [0:0]" for c in ("KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL", "KUBE-FORWARD",
                                 "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES")),
    '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
    '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    "-A INPUT -j KUBE-FIREWALL",
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
    '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
    '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    "-A OUTPUT -j KUBE-FIREWALL",
    '-A KUBE-FIREWALL -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP',
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT',
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
    "COMMIT",
]
# the nat chains kube-proxy writes whole at every sync (with --noflush too)
TOP_CHAINS = ("KUBE-MARK-MASQ", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-SERVICES")


def _nat_top(svcs: list[Service]) -> list[str]:
    out = [f":{chain} - [0:0]" for chain in TOP_CHAINS]
    out += [f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
            f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            '-j MASQUERADE --random-fully']
    out += [f"-A KUBE-NODEPORTS -m comment --comment {s.name} -m tcp -p tcp --dport {s.nodeport} "
            f"-j {s.ext}" for s in svcs if s.nodeport]
    out += [f'-A KUBE-SERVICES -m comment --comment "{s.name} cluster IP" -m tcp -p tcp '
            f'-d {s.ip} --dport {SERVICE_PORT} -j {s.svc}' for s in svcs]
    out.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this '
               'must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    return out


def _service_chains(s: Service) -> tuple[list[str], list[str]]:
    """A Service's chains: their declarations, their rules."""
    chains = [s.svc, *s.seps, *([s.ext] if s.nodeport else [])]
    rules = []
    if s.nodeport:
        rules += [f'-A {s.ext} -m comment --comment "masquerade traffic for {s.name} external '
                  f'destinations" -j KUBE-MARK-MASQ', f"-A {s.ext} -j {s.svc}"]
    cluster, host_mask = (CLUSTER_CIDR6, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") if s.ipv6 \
        else (CLUSTER_CIDR, "255.255.255.255")
    rules.append(f'-A {s.svc} -m comment --comment "{s.name} cluster IP" -m tcp -p tcp '
                 f'-d {s.ip} --dport {SERVICE_PORT} ! -s {cluster} -j KUBE-MARK-MASQ')
    # an affine Service's client goes back to the endpoint it is remembered by
    recent = lambda sep: f"-m recent --name {sep} --mask {host_mask} --rsource"  # noqa: E731
    if s.affine:
        rules += [f'-A {s.svc} -m comment --comment "{s.name} -> {s.target(ep)}" '
                  f'{recent(sep)} --rcheck --seconds {AFFINITY_SECONDS} --reap -j {sep}'
                  for ep, sep in zip(s.endpoints, s.seps)]
    rules += [f'-A {s.svc} -m comment --comment "{s.name} -> {s.target(s.endpoints[0])}" '
              f'-m statistic --mode random --probability 0.5000000000 -j {s.seps[0]}',
              f'-A {s.svc} -m comment --comment "{s.name} -> {s.target(s.endpoints[1])}" '
              f'-j {s.seps[1]}']
    for ep, sep in zip(s.endpoints, s.seps):
        remember = f"{recent(sep)} --set " if s.affine else ""
        rules += [f"-A {sep} -m comment --comment {s.name} -s {ep} -j KUBE-MARK-MASQ",
                  f"-A {sep} -m comment --comment {s.name} {remember}-m tcp -p tcp "
                  f"-j DNAT --to-destination {s.target(ep)}"]
    return [f":{c} - [0:0]" for c in chains], rules


def iptables(count: int, affine: bool = False, ipv6: bool = False) -> str:
    """filter and nat, for iptables-restore (ip6tables-restore with ipv6)."""
    svcs = services(count, affine, ipv6)
    chains = [_service_chains(s) for s in svcs]
    # IPv6 has no localnet to guard (kube-proxy writes KUBE-FIREWALL's rule for IPv4)
    filter_table = [line for line in FILTER if not (ipv6 and "127.0.0.0/8" in line)]
    out = [*filter_table, "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]",
           ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
    top = _nat_top(svcs)
    out += [line for line in top if line.startswith(":")]
    out += [line for decls, _ in chains for line in decls]
    out += ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING']
    out += [line for line in top if not line.startswith(":")]
    out += [line for _, rules in chains for line in rules]
    return "\n".join([*out, "COMMIT", ""])


def _moved(count: int) -> tuple[Service, Service]:
    """The first Service before and after its first endpoint moves (the change; with
    one Service, nothing moves: only the top chains are written again)."""
    before = Service(0, count)
    after = Service(0, count)
    after.endpoints = ("10.127.255.254", before.endpoints[1])
    after.seps = ["KUBE-SEP-" + _hash(after.name + "tcp" + ep) for ep in after.endpoints]
    return before, after


def iptables_change(count: int) -> str:
    """One Service's first endpoint moved, as kube-proxy writes it for
    iptables-restore --noflush: its top chains whole, the Service's changed chains,
    the old endpoint's chain deleted."""
    out = ["*nat", *_nat_top(services(count))]
    if count > 1:   # (the last Service, the one the bench connects to, stays)
        before, after = _moved(count)
        decls, rules = _service_chains(after)
        # (a chain is flushed by its declaration, and only an empty one can be deleted)
        out[1:1] = [d for d in decls if d != f":{before.seps[1]} - [0:0]"] + \
            [f":{before.seps[0]} - [0:0]"]
        out += [r for r in rules if not r.startswith(f"-A {before.seps[1]} ")]
        out.append(f"-X {before.seps[0]}")
    return "\n".join([*out, "COMMIT", ""])


def nft(count: int) -> str:
    """The same Services as kube-proxy's nftables mode writes them: a verdict map."""
    svcs = services(count)

    def chain(name: str, *statements: str) -> list[str]:
        return [f"  chain {name} {{", *(f"    {s}" for s in statements), "  }"]

    def vmap(name: str, key: str, elements: list[str]) -> list[str]:
        return [f"  map {name} {{", f"    type {key} : verdict",
                *([f"    elements = {{ " + ",\n      ".join(elements) + " }"] if elements else []),
                "  }"]

    out = ["table ip kube-proxy {"]
    out += chain("mark-for-masquerade", f"meta mark set meta mark or {MASQ_MARK}")
    out += chain("masquerading", f"meta mark & {MASQ_MARK} == 0 return",
                 f"meta mark set meta mark xor {MASQ_MARK}", "masquerade fully-random")
    out += chain("nat-prerouting", "type nat hook prerouting priority -100;", "jump services")
    out += chain("nat-output", "type nat hook output priority -100;", "jump services")
    out += chain("nat-postrouting", "type nat hook postrouting priority 100;",
                 "jump masquerading")
    out += vmap("service-ips", "ipv4_addr . inet_proto . inet_service",
                [f"{s.ip} . tcp . {SERVICE_PORT} : goto {s.svc.lower()}" for s in svcs])
    out += vmap("service-nodeports", "inet_proto . inet_service",
                [f"tcp . {s.nodeport} : goto {s.ext.lower()}" for s in svcs if s.nodeport])
    out += chain("nodeports", "meta l4proto . th dport vmap @service-nodeports")
    out += chain("services", "ip daddr . meta l4proto . th dport vmap @service-ips",
                 "fib daddr type local jump nodeports")
    for s in svcs:
        if s.nodeport:
            out += chain(s.ext.lower(), "jump mark-for-masquerade", f"goto {s.svc.lower()}")
        out += chain(s.svc.lower(),
                     f"ip daddr {s.ip} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} "
                     "jump mark-for-masquerade",
                     f"numgen random mod 2 vmap {{ 0 : goto {s.seps[0].lower()}, "
                     f"1 : goto {s.seps[1].lower()} }}")
        for ep, sep in zip(s.endpoints, s.seps):
            out += chain(sep.lower(), f"ip saddr {ep} jump mark-for-masquerade",
                         f"meta l4proto tcp dnat to {ep}:{TARGET_PORT}")
    out += ["}", ""]
    return "\n".join(out)


def nft_change(count: int) -> str:
    """The same change as kube-proxy's nftables mode makes it: the new endpoint's chain,
    the Service's chain rewritten, the old endpoint's chain deleted."""
    if count <= 1:
        return ("flush chain ip kube-proxy nodeports\n"
                "add rule ip kube-proxy nodeports meta l4proto . th dport vmap @service-nodeports\n")
    before, after = _moved(count)
    new, svc = after.seps[0].lower(), after.svc.lower()
    ep = after.endpoints[0]
    return "\n".join([
        f"add chain ip kube-proxy {new}",
        f"add rule ip kube-proxy {new} ip saddr {ep} jump mark-for-masquerade",
        f"add rule ip kube-proxy {new} meta l4proto tcp dnat to {ep}:{TARGET_PORT}",
        f"flush chain ip kube-proxy {svc}",
        f"add rule ip kube-proxy {svc} ip daddr {after.ip} tcp dport {SERVICE_PORT} "
        f"ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        f"add rule ip kube-proxy {svc} numgen random mod 2 vmap {{ 0 : goto {new}, "
        f"1 : goto {after.seps[1].lower()} }}",
        f"delete chain ip kube-proxy {before.seps[0].lower()}", ""])


KINDS = {"iptables": iptables, "iptables-change": iptables_change, "nft": nft,
         "nft-change": nft_change}

if __name__ == "__main__":
    kind, count = sys.argv[1], int(sys.argv[2])
    sys.stdout.write(KINDS[kind](count))
