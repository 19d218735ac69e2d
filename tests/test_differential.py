"""The differential test: the same ruleset in the kernel's legacy iptables and in
bpfilter, real packets over veth from a peer namespace. Which packets arrive, and
every per-entry counter, must be identical.

Seeded random rulesets (BPFILTER_DIFF_SEEDS, default 40 for IPv4 and 12 for IPv6, of
200 packets each) and hand-written realistic ones, of both families. A failing seed is
reproduced with
`BPFILTER_DIFF_SEEDS=1 BPFILTER_DIFF_FIRST=<seed> pytest tests/test_differential.py`
(the IPv6 tests' seeds start 20000 and 22000 after FIRST).
"""
import os
import random
import time

import pytest

from bpfilter.abi import codec
from bpfilter.decode import table_from_blob, table_from_raw
from bpfilter.compiler import classifier, multifield
from bpfilter.compiler.runs import TupleSpace
from bpfilter.model import Family, Rule
from bpfilter_lab.demo import RULESET as HOST_FIREWALL, TRAFFIC as HOST_TRAFFIC
from bpfilter_lab.lab import S_IN6_ADDR, S_IN_MAC, T_IN6_ADDR, T_IN_MAC, T_OUT6_ADDR, Case, Lab
from bpfilter_lab.packets import (AuthenticationHeader, DestinationOptions, Fragment, HopByHop,
                                  Packet, icmpv6_error, neighbour_advertisement,
                                  neighbour_solicitation)
from bpfilter_lab.scratch import replace_blob
from rulegen import generate, generate_large6

pytestmark = pytest.mark.kernel

SEEDS = int(os.environ.get("BPFILTER_DIFF_SEEDS", "40"))
SEEDS6 = int(os.environ.get("BPFILTER_DIFF_SEEDS", "12"))
FIRST = int(os.environ.get("BPFILTER_DIFF_FIRST", "1000"))

ROUTER = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:from-lan - [0:0]
:to-dmz - [0:0]
:blocklist - [0:0]
:icmp-ok - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p icmp -j icmp-ok
-A INPUT -s 198.18.0.0/28 -p tcp --dport 22 -j ACCEPT
-A FORWARD -j blocklist
-A FORWARD -i vin0 -o vout0 -j from-lan
-A FORWARD -i vout+ -o vin0 -p tcp ! --syn -j ACCEPT
-A FORWARD -p icmp -g icmp-ok
-A from-lan -d 198.19.1.0/24 -g to-dmz
-A from-lan -p udp -m udp --dport 53 -j ACCEPT
-A from-lan -p tcp -m tcp --dport 80 -j ACCEPT
-A from-lan -p tcp -m tcp --dport 443 -j ACCEPT
-A from-lan -j RETURN
-A to-dmz -p tcp -m tcp --dport 25 -j ACCEPT
-A to-dmz -p tcp -m tcp --dport 1024:65535 -j ACCEPT
-A to-dmz -p udp -j DROP
-A blocklist -s 198.18.0.128/25 -j DROP
-A blocklist -d 198.19.66.0/24 -j DROP
-A blocklist -f -j DROP
-A icmp-ok -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A icmp-ok -p icmp -m icmp --icmp-type 3/4 -j ACCEPT
-A icmp-ok -p icmp -m icmp --icmp-type 11 -j ACCEPT
COMMIT
"""

LAN, BAD, DMZ, WAN, BLOCKED = "198.18.0.20", "198.18.0.200", "198.19.1.9", "198.19.9.9", \
    "198.19.66.6"
ROUTER_TRAFFIC = [Case(p, "forward") for p in (
    Packet(LAN, WAN, "udp", dport=53), Packet(LAN, WAN, "udp", dport=54),
    Packet(LAN, WAN, "tcp", dport=80), Packet(LAN, WAN, "tcp", dport=443),
    Packet(LAN, WAN, "tcp", dport=8080), Packet(LAN, DMZ, "tcp", dport=25),
    Packet(LAN, DMZ, "tcp", dport=2000), Packet(LAN, DMZ, "tcp", dport=80),
    Packet(LAN, DMZ, "udp", dport=53), Packet(BAD, WAN, "tcp", dport=80),
    Packet(LAN, BLOCKED, "tcp", dport=80), Packet(LAN, WAN, "tcp", frag_offset=3),
    Packet(LAN, WAN, "tcp", dport=80, frag_offset=0, more_fragments=True),
    Packet(LAN, WAN, "icmp", icmp_type=8), Packet(LAN, WAN, "icmp", icmp_type=3, icmp_code=4),
    Packet(LAN, WAN, "icmp", icmp_type=3, icmp_code=3), Packet(LAN, WAN, "icmp", icmp_type=13),
    Packet(LAN, WAN, "tcp", dport=80, truncate_l4=12),
)] + [Case(Packet(LAN, "198.18.0.1", "tcp", dport=22), "input"),
      Case(Packet(BAD, "198.18.0.1", "tcp", dport=22), "input"),
      Case(Packet(BAD, "198.18.0.1", "icmp", icmp_type=8), "input"),
      Case(Packet("198.18.0.1", WAN, "tcp", dport=22), "output")]


# multiport, comment, iprange, length and ttl together, on every path.
SERVICES = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:services - [0:0]
-A INPUT -m ttl --ttl-lt 3 -m comment --comment "nothing from afar" -j DROP
-A INPUT -p tcp -m multiport --dports 22,80,443,8000:8999 -m comment --comment svc -j services
-A INPUT -p udp -m multiport --ports 53,123 -j ACCEPT
-A INPUT -p icmp -m length --length 0:128 -j ACCEPT
-A services -m iprange --src-range 198.18.0.10-198.18.0.99 -j ACCEPT
-A services -p tcp -m multiport --dports 8000:8999 -m iprange ! --src-range 198.18.0.100-198.18.0.200 -j ACCEPT
-A FORWARD -m iprange --src-range 198.18.0.2-198.18.0.50 --dst-range 198.19.1.0-198.19.1.255 -m length ! --length 1000:65535 -j ACCEPT
-A FORWARD -p udp -m multiport ! --dports 1:1023 -m ttl --ttl-gt 10 -j ACCEPT
-A FORWARD -p sctp -m multiport --dports 0 -j ACCEPT
-A OUTPUT -p tcp -m multiport --sports 22,80 -m ttl ! --ttl-eq 64 -j DROP
COMMIT
"""
T_ADDR, NEAR, MID, FAR, OUT_NET = "198.18.0.1", "198.18.0.20", "198.18.0.150", "198.18.0.240", \
    "198.19.1.7"
SERVICES_TRAFFIC = [Case(Packet(src, T_ADDR, proto, **kw), "input") for src, proto, kw in (
    (NEAR, "tcp", dict(dport=22)), (NEAR, "tcp", dict(dport=22, ttl=2)),
    (NEAR, "tcp", dict(dport=23)), (NEAR, "tcp", dict(dport=8500)), (MID, "tcp", dict(dport=8500)),
    (FAR, "tcp", dict(dport=8999)), (FAR, "tcp", dict(dport=9000)), (MID, "tcp", dict(dport=443)),
    (NEAR, "tcp", dict(dport=80, truncate_l4=3)), (NEAR, "tcp", dict(dport=80, truncate_l4=4)),
    (MID, "udp", dict(sport=53, dport=40000)), (MID, "udp", dict(sport=40000, dport=123)),
    (MID, "udp", dict(sport=40000, dport=124)), (MID, "icmp", dict(payload_len=100)),
    (MID, "icmp", dict(payload_len=101)), (MID, "icmp", dict(payload_len=8, ttl=1)),
)] + [Case(Packet(src, dst, proto, **kw), "forward") for src, dst, proto, kw in (
    (NEAR, OUT_NET, "tcp", dict(dport=80)), (NEAR, OUT_NET, "udp", dict(payload_len=971)),
    (NEAR, OUT_NET, "udp", dict(payload_len=972)), ("198.18.0.51", OUT_NET, "tcp", {}),
    (NEAR, "198.19.2.1", "tcp", {}), (FAR, "198.19.9.9", "udp", dict(dport=1024)),
    (FAR, "198.19.9.9", "udp", dict(dport=1024, ttl=11)),
    (FAR, "198.19.9.9", "udp", dict(dport=1023)),
    (FAR, "198.19.9.9", "udp", dict(dport=1024, frag_offset=20)), (FAR, "198.19.9.9", 132, {}),
    (FAR, "198.19.9.9", 132, dict(payload_len=2)),
)] + [Case(Packet("198.19.0.1", OUT_NET, "tcp", **kw), "output") for kw in (
    dict(sport=22), dict(sport=22, ttl=65), dict(sport=80, ttl=1), dict(sport=81, ttl=1),
)]


@pytest.fixture(scope="module")
def lab():
    with Lab({"kernel": "kernel", "bpfilter": "bpfilter"}) as lab:
        yield lab


def assert_identical(lab: Lab, ruleset: str, cases: list, target: str = "bpfilter",
                     family: Family = Family.IPV4) -> dict:
    """Load `ruleset` everywhere, send `cases`; the kernel's and `target`'s arrivals
    and per-entry counters must be identical. Returns the arrivals."""
    lab.load(ruleset, family)
    arrived = lab.run(cases)
    kernel, ours = lab.counters("kernel", family), lab.counters(target, family)
    verdicts = [(i, c.path, c.packet, k) for i, (c, k, b) in
                enumerate(zip(cases, arrived["kernel"], arrived[target])) if k != b]
    assert not verdicts, f"arrivals differ (case, path, packet, kernel's): {verdicts[:10]}"
    assert len(ours) == len(kernel), (kernel, ours)
    counters = [(e, k, b) for e, (k, b) in enumerate(zip(kernel, ours)) if k != b]
    assert not counters, f"counters differ (entry, kernel, {target}): {counters[:10]}"
    # A test that passes because nothing happened proves nothing.
    assert sum(p for p, _ in kernel) > 0
    return arrived


def test_host_firewall(lab):
    assert_identical(lab, HOST_FIREWALL, [case for _, case in HOST_TRAFFIC])


def test_router_forward_chain_with_user_chains(lab):
    assert_identical(lab, ROUTER, ROUTER_TRAFFIC)


def test_services_with_multiport_iprange_length_ttl_and_comments(lab):
    arrived = assert_identical(lab, SERVICES, SERVICES_TRAFFIC)
    # every path let something through and stopped something
    for path in ("input", "forward", "output"):
        seen = {a for c, a in zip(SERVICES_TRAFFIC, arrived["kernel"]) if c.path == path}
        assert len(seen) == 2, (path, seen)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_random_ruleset(lab, seed):
    ruleset, cases = generate(seed)
    assert_identical(lab, ruleset, cases)


@pytest.mark.parametrize("seed", range(FIRST + 12000, FIRST + 12000 + SEEDS))
def test_random_ruleset_with_more_matches(lab, seed):
    """The general rulesets with multiport, iprange, length, ttl and comment matches,
    and with mark, pkttype, mac, owner and limit."""
    ruleset, cases = generate(seed, more=True, extras=True)
    assert_identical(lab, ruleset, cases)


@pytest.mark.parametrize("seed", range(FIRST + 20000, FIRST + 20000 + SEEDS6))
def test_random_ipv6_ruleset(lab, seed):
    """IPv6 rulesets (addresses and prefixes of the lab's IPv6 networks, interfaces, -p
    with names, numbers, all and extension headers, tcp, udp, icmp6) against packets
    with and without chains of extension headers, first and later fragments, headers
    cut short, neighbour discovery, ICMPv6 errors, connections both ways."""
    ruleset, cases = generate(seed, family=Family.IPV6)
    assert_identical(lab, ruleset, cases, family=Family.IPV6)


@pytest.mark.parametrize("seed", range(FIRST + 22000, FIRST + 22000 + SEEDS6))
def test_random_ipv6_ruleset_with_more_matches(lab, seed):
    """The IPv6 rulesets with multiport, iprange, length, hl and comment, and with mark,
    pkttype, mac, owner and limit."""
    ruleset, cases = generate(seed, family=Family.IPV6, more=True, extras=True)
    assert_identical(lab, ruleset, cases, family=Family.IPV6)


# An IPv6 host and router: neighbour discovery and ICMPv6 errors let in by type and
# hop limit, services by MAC, multiport and source range, mDNS by packet type, short
# datagrams by length (skb->len: a hop-by-hop header with a zero payload length leaves
# the received skb longer than its header says), forwarding one way with answers back,
# a later fragment's protocol, and OUTPUT by mark, owner, tcp flags and options.
IPV6_HOST_ROUTER = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:icmp6-in - [0:0]
:services - [0:0]
:lan-out - [0:0]
-A INPUT -p all -m hl --hl-lt 2 -j DROP
-A INPUT -p icmpv6 -g icmp6-in
-A INPUT -m pkttype --pkt-type multicast -p udp --dport 5353 -j ACCEPT
-A INPUT -m mac --mac-source 02:bf:00:00:01:02 -p tcp -m multiport --dports 22,80,443 -j services
-A INPUT -p udp -m length --length 41:80 -m comment --comment "short datagrams" -j ACCEPT
-A icmp6-in -p icmpv6 --icmpv6-type neighbour-solicitation -m hl --hl-eq 255 -j ACCEPT
-A icmp6-in -p icmpv6 --icmpv6-type neighbour-advertisement -m hl --hl-eq 255 -j ACCEPT
-A icmp6-in -p icmpv6 --icmpv6-type echo-request -m limit --limit 1/hour --limit-burst 2 -j ACCEPT
-A icmp6-in -p icmpv6 --icmpv6-type destination-unreachable -j ACCEPT
-A icmp6-in -p icmpv6 --icmpv6-type packet-too-big -j ACCEPT
-A services -p tcp --syn -m iprange --src-range 2001:db8:1::2-2001:db8:1::ff -j ACCEPT
-A services -p tcp ! --syn -j ACCEPT
-A services -j RETURN
-A FORWARD -i vin0 -o vout0 -j lan-out
-A FORWARD -i vout0 -o vin0 -p tcp ! --syn -j ACCEPT
-A FORWARD -i vout0 -o vin0 -p udp --sport 53 -j ACCEPT
-A FORWARD -p udp -m length --length 72 -j ACCEPT
-A lan-out -p 44 -j DROP
-A lan-out -p tcp -m multiport --dports 80,443 -j ACCEPT
-A lan-out -p udp --dport 53 -j ACCEPT
-A lan-out -p icmpv6 -j ACCEPT
-A OUTPUT -m mark --mark 0x42 -m owner --uid-owner 0 -p udp --dport 9 -j DROP
-A OUTPUT -p tcp --tcp-flags RST RST -m comment --comment "no resets" -j DROP
-A OUTPUT -p tcp --tcp-option 2 -m iprange --dst-range 2001:db8:7::-2001:db8:7::ff -j DROP
COMMIT
"""
S6, T6, FAR6 = S_IN6_ADDR, T_IN6_ADDR, "2001:db8:7::7"
JUMBO_LESS = dict(ext=(HopByHop(),), stated_length=0)   # skb->len 72, the header says 40
IPV6_HOST_ROUTER_TRAFFIC = [Case(p, "input") for p in (
    neighbour_solicitation(S6, T6, T6, S_IN_MAC), neighbour_solicitation(S6, T6, T6, ttl=254),
    neighbour_advertisement(S6, "ff02::1", S6, target_lladdr=S_IN_MAC),
    *[Packet(S6, T6, "icmpv6")] * 3,
    icmpv6_error(S6, T6, Packet(T6, S6, "udp", dport=53)),
    icmpv6_error(S6, T6, Packet(T6, S6, "tcp", ext=(DestinationOptions(),)), icmp_type=2,
                 icmp_rest=1280),
    icmpv6_error(S6, T6, Packet(T6, S6, "udp"), icmp_type=3),
    Packet(S6, "ff02::1", "udp", dport=5353), Packet(S6, T_OUT6_ADDR, "udp", dport=5353,
                                                      payload_len=100),
    Packet(S6, T6, "udp", dport=5353), Packet(S6, T6, "udp", dport=5353, ttl=1),
    Packet(S6, T6, "udp", dport=7, **JUMBO_LESS),
    Packet(S6, T6, "udp", dport=7, ext=(HopByHop(),), truncate_ext=1, payload_len=0),
    Packet(S6, T6, "tcp", dport=22), Packet("2001:db8:1::100", T6, "tcp", dport=22),
    Packet("2001:db8:1::100", T6, "tcp", dport=443, tcp_flags=0x10),
    Packet(S6, T6, "tcp", dport=23), Packet(S6, T6, "tcp", dport=80, ext=(Fragment(offset=9),)),
)] + [Case(Packet(S6, FAR6, proto, **kw), "forward") for proto, kw in (
    ("tcp", dict(dport=80)), ("tcp", dict(dport=22)), ("udp", dict(dport=53)),
    ("udp", dict(dport=54)), ("udp", dict(dport=54, **JUMBO_LESS)), ("icmpv6", {}),
    ("tcp", dict(dport=80, ext=(Fragment(offset=20),))),
    ("tcp", dict(dport=443, ext=(HopByHop(), AuthenticationHeader(), Fragment(more=True)))),
)] + [Case(Packet(FAR6, S6, proto, **kw), "reverse") for proto, kw in (
    ("tcp", dict(sport=80, tcp_flags=0x12)), ("tcp", dict(sport=80)), ("udp", dict(sport=53)),
    ("udp", dict(sport=54)),
)] + [Case(Packet(T6, dst, proto, **kw), "output") for dst, proto, kw in (
    (S6, "udp", dict(dport=9)), (S6, "udp", dict(dport=10)), (S6, "tcp", dict(tcp_flags=0x14)),
    (FAR6, "tcp", dict(tcp_options=b"\x02\x04\x05\xb4")),
    ("2001:db8:7::100", "tcp", dict(tcp_options=b"\x02\x04\x05\xb4")), (FAR6, "tcp", {}),
    (FAR6, "udp", dict(dport=9, stated_length=8)),
)]


def test_ipv6_host_and_router(lab):
    arrived = assert_identical(lab, IPV6_HOST_ROUTER, IPV6_HOST_ROUTER_TRAFFIC,
                               family=Family.IPV6)
    # every path let something through and stopped something
    for path in ("input", "forward", "reverse", "output"):
        seen = {a for c, a in zip(IPV6_HOST_ROUTER_TRAFFIC, arrived["kernel"]) if c.path == path}
        assert len(seen) == 2, (path, seen)
    # the forwarded datagram the length rule let through: by skb->len, not the header's 40
    assert arrived["kernel"][IPV6_HOST_ROUTER_TRAFFIC.index(
        Case(Packet(S6, FAR6, "udp", dport=54, **JUMBO_LESS), "forward"))]


@pytest.mark.parametrize("seed", range(FIRST + 5000, FIRST + 5000 + SEEDS))
def test_random_long_runs_through_the_classifier(lab, seed):
    """Long runs of simple rules, which the tuple space classifies, broken by rules of
    any shape, in built-in and user chains."""
    ruleset, cases = generate(seed, runs=True)
    assert_identical(lab, ruleset, cases)


@pytest.mark.parametrize("seed", range(FIRST + 7000, FIRST + 7000 + SEEDS // 2))
def test_random_acl_runs_through_multifield(lab, seed, monkeypatch):
    """ClassBench-style ACL runs (prefixes of every length, port ranges), which the
    tuple space cannot take, in multifield's merged tuples: packets aimed inside and
    just outside the rules' networks and ranges, deep in the runs or missing them all,
    fragments and truncated headers. Runs of a hundred rules are classified even where
    plain code would be faster, to test more of them."""
    monkeypatch.setattr(multifield, "RULES_PER_LOOKUP", 1)
    ruleset, cases = generate(seed, n_cases=300, acl=True)
    table = table_from_raw(codec.parse_replace(replace_blob(ruleset)))
    runs = [s for chain in table.chains.values()
            for s in classifier.segments(chain.rules, TupleSpace())
            if isinstance(s, multifield.MultiFieldRun)]
    assert sum(len(run.rules) for run in runs) >= 400
    assert_identical(lab, ruleset, cases)


@pytest.mark.parametrize("seed", range(FIRST + 9000, FIRST + 9000 + SEEDS // 2))
def test_random_ruleset_with_every_short_run_classified(lab, seed, monkeypatch):
    """The general rulesets with runs of two or more simple rules classified too."""
    monkeypatch.setattr(classifier, "MIN_RUN", 2)
    ruleset, cases = generate(seed)
    assert_identical(lab, ruleset, cases)


def test_ten_thousand_rules(lab):
    """10k rules (blocklists and service ports in INPUT and FORWARD): exact at scale."""
    ruleset, cases = generate(424242, n_cases=400, size=10_000)
    assert ruleset.count("\n-A ") >= 10_000
    assert_identical(lab, ruleset, cases)


def test_ten_thousand_ipv6_rules(lab):
    """10k IPv6 rules (a source blocklist of /32 to /128 prefixes, some with -p, and
    service ports, some for one destination, in INPUT and FORWARD), nearly all in
    tuple space runs, against ip6tables-legacy: packets aimed inside and just outside
    the prefixes, with extension headers, first and later fragments, chains that
    cannot be walked and short transport headers."""
    ruleset, cases = generate_large6(525252, 10_000)
    table = table_from_blob(replace_blob(ruleset, family=Family.IPV6), Family.IPV6)[1]
    runs = [s for chain in table.chains.values()
            for s in classifier.segments(chain.rules, TupleSpace(Family.IPV6))
            if isinstance(s, classifier.Run)]
    assert sum(len(run.rules) for run in runs) >= 9_900
    assert_identical(lab, ruleset, cases, family=Family.IPV6)


def test_two_thousand_ipv6_acl_rules_as_code(lab):
    """A 2k-rule ClassBench-style IPv6 ACL in FORWARD: merged tuples are IPv4's and
    the tuple space cannot take it, so it is code, rule after rule, verified whole."""
    ruleset, cases = generate_large6(535353, 2_000, acl=True)
    table = table_from_blob(replace_blob(ruleset, family=Family.IPV6), Family.IPV6)[1]
    assert all(isinstance(s, Rule) for s in classifier.segments(table.chains["FORWARD"].rules,
                                                                TupleSpace(Family.IPV6)))
    assert_identical(lab, ruleset, cases, family=Family.IPV6)


def test_ten_thousand_acl_rules(lab, monkeypatch):
    """A 10k-rule ClassBench-style ACL in INPUT: one multifield run, its slot tables
    and records at scale, its projection built by a forked child (as past 20k rules),
    against packets aimed inside and just outside its networks and ranges."""
    monkeypatch.setattr(multifield, "PARALLEL_MIN", 1000)
    ruleset, cases = generate(434343, n_cases=400, size=10_000, acl=True)
    table = table_from_raw(codec.parse_replace(replace_blob(ruleset)))
    runs = [s for s in classifier.segments(table.chains["INPUT"].rules, TupleSpace())
            if isinstance(s, multifield.MultiFieldRun)]
    assert sum(len(run.rules) for run in runs) >= 9_000
    assert_identical(lab, ruleset, cases)


LINK_LAYER = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m pkttype --pkt-type broadcast -p udp --dport 7 -j DROP
-A INPUT -m pkttype --pkt-type multicast -p udp --dport 8 -j DROP
-A INPUT -m pkttype ! --pkt-type unicast -p tcp
-A INPUT -m mac --mac-source 02:bf:00:00:01:02 -p udp --dport 53 -j DROP
-A INPUT -m mac ! --mac-source 02:bf:00:00:01:02 -p udp --dport 54 -j DROP
-A INPUT -m mac ! --mac-source 02:bf:00:00:01:03 -p udp --dport 55 -j DROP
-A INPUT -m mark --mark 0x42 -j DROP
-A FORWARD -m mac --mac-source 02:bf:00:00:01:03 -j DROP
-A FORWARD -m mark ! --mark 0 -j DROP
-A FORWARD -m mac --mac-source 02:BF:00:00:01:02 -p tcp --dport 22 -j DROP
-A OUTPUT -m mark --mark 0x42/0xff -p udp --dport 53 -j DROP
-A OUTPUT -m mark ! --mark 0x2/0x2 -p udp --dport 54 -j DROP
-A OUTPUT -m mark --mark 0x40/0xf0 -p udp --dport 55 -j DROP
-A OUTPUT -m pkttype --pkt-type unicast -p udp --dport 56 -j DROP
COMMIT
"""
BROADCAST_MAC, MULTICAST_MAC = "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"
LINK_LAYER_TRAFFIC = [Case(Packet(LAN, "198.18.0.1", proto, dport=port, eth_dst=mac), "input")
                      for proto in ("udp", "tcp") for port in (7, 8, 9, 53, 54, 55)
                      for mac in (T_IN_MAC, BROADCAST_MAC, MULTICAST_MAC)] + \
    [Case(Packet(LAN, WAN, proto, dport=port), "forward")
     for proto in ("udp", "tcp") for port in (22, 53)] + \
    [Case(Packet("198.18.0.1", WAN, "udp", dport=port), "output") for port in (53, 54, 55, 56, 57)]


def test_mark_pkttype_and_mac_with_real_frames(lab):
    """The link layer as only real frames have it: frames to our MAC, to broadcast and to
    a multicast MAC (pkt_type), from the peer's MAC on an Ethernet device (mac), and the
    lab's output socket marking its packets 0x42 (mark)."""
    arrived = assert_identical(lab, LINK_LAYER, LINK_LAYER_TRAFFIC)
    assert not all(arrived["kernel"]) and any(arrived["kernel"])


def tcp_option_case(rng: random.Random, path: str) -> Case:
    """A tcp packet whose option area is random bytes, mostly made of options' kinds
    and lengths, with a data offset that sometimes lies (under 5 words, past the end)."""
    kinds = [0, 1, 2, 3, 4, 5, 8, 30, 200, 255]
    size = rng.choice([0, 4, 8, 12, 20, 40])
    options = bytes(rng.choice(kinds) if rng.random() < 0.6 else rng.randrange(6)
                    for _ in range(size))
    doff = rng.choice([None] * 8 + [0, 4, 5, 15])
    dst = "198.18.0.1" if path == "input" else WAN
    return Case(Packet(LAN if path != "output" else "198.18.0.1", dst, "tcp",
                       dport=rng.choice([22, 80]), tcp_options=options, tcp_doff=doff,
                       payload_len=rng.choice([0, 16])), path)


TCP_OPTIONS = "\n".join(
    ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    + [f"-A {chain} -p tcp {'! ' if inv else ''}--tcp-option {n}{' --dport 22' if port else ''}"
       f"{' -j DROP' if drop else ''}"
       for chain in ("FORWARD", "OUTPUT")
       for n, inv, port, drop in ((2, False, False, False), (4, True, False, False),
                                  (8, False, True, True), (255, False, False, False),
                                  (1, True, True, False), (3, False, False, True),
                                  (200, True, False, False), (30, False, False, True))]
    + ["COMMIT", ""])


@pytest.mark.parametrize("seed", range(FIRST, FIRST + 3))
def test_tcp_option_walk_on_random_option_areas(lab, seed):
    rng = random.Random(seed)
    cases = [tcp_option_case(rng, rng.choice(["forward", "output"])) for _ in range(300)]
    assert_identical(lab, TCP_OPTIONS, cases)


# limit at 1/hour: no token comes back while a test runs. INPUT has its own bucket;
# FORWARD and OUTPUT share the one of the chain they both jump to.
LIMITED = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:rl - [0:0]
-A INPUT -p udp --dport 7 -m limit --limit 1/hour --limit-burst 3 -j ACCEPT
-A INPUT -p udp --dport 7 -j DROP
-A FORWARD -p udp -j rl
-A OUTPUT -p udp -j rl
-A rl -m limit --limit 1/hour --limit-burst 4 -j RETURN
-A rl -j DROP
COMMIT
"""
LIMITED_TRAFFIC = [Case(Packet(LAN, "198.18.0.1", "udp", dport=port), "input")
                   for port in (7, 8, 7, 7, 9, 7, 7)] + \
    [Case(Packet(LAN, WAN, "udp", dport=53), "forward"),
     Case(Packet("198.18.0.1", WAN, "udp", dport=53), "output")] * 3


def test_limit_bursts_with_real_packets(lab):
    arrived = assert_identical(lab, LIMITED, LIMITED_TRAFFIC)["kernel"]
    assert arrived == [True, True, True, True, True, False, False] + [True] * 4 + [False] * 2


# 12/min: a token every 5 seconds, two at most. A burst (sent well within 5 s) takes
# the two; after 11 s the bucket is full again, however much longer the wait was.
REFILLED = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp --dport 7 -m limit --limit 12/min --limit-burst 2 -j ACCEPT
-A INPUT -p udp --dport 7 -j DROP
COMMIT
"""
REFILL_SECONDS = 11


def test_limit_refills_with_time(lab):
    burst = [Case(Packet(LAN, "198.18.0.1", "udp", dport=7), "input")] * 4
    lab.load(REFILLED)
    first = lab.run(burst)
    time.sleep(REFILL_SECONDS)
    second = lab.run(burst)
    for arrived in (first, second):
        assert arrived["bpfilter"] == arrived["kernel"] == [True, True, False, False]
    assert lab.counters("bpfilter") == lab.counters("kernel")
