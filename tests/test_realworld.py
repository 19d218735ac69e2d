"""Real rulesets (tests/realworld, see INVENTORY.md there) through bpfilter.

Each fixture goes in as a person puts it in: the unmodified iptables-legacy-restore
(ip6tables-legacy-restore for NAME.ip6) under `bpfilter exec`, into a running
`bpfilter serve`. Each must then behave exactly as the kernel's iptables (ip6tables)
with the same ruleset, on traffic written for it, connections included. (REJECT's
answers, which the lab's routing keeps from leaving, are compared byte for byte in
test_reject_served.py.)
"""
from __future__ import annotations

import os
import sys

import pytest

from bpfilter.model import Family
from bpfilter_lab.backends import KernelBackend, ServiceBackend
from bpfilter_lab.lab import S_IN6_ADDR, S_IN_ADDR, T_IN6_ADDR, T_IN_ADDR, Case, Lab
from bpfilter_lab.packets import (Packet, icmpv6_error, neighbour_advertisement,
                                  neighbour_solicitation, redirect, router_advertisement,
                                  router_solicitation)

from test_differential import assert_identical
from test_service import Service

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import realworld_inventory  # noqa: E402

pytestmark = pytest.mark.kernel

FIXTURES = realworld_inventory.fixtures()
V4, V6 = Family.IPV4, Family.IPV6
# Per family: the host, its peer on vin0, a host beyond vout0.
T = {V4: T_IN_ADDR, V6: T_IN6_ADDR}
P = {V4: S_IN_ADDR, V6: S_IN6_ADDR}
FAR = {V4: "198.19.0.9", V6: "2001:db8:7::7"}
LINK_LOCAL = "fe80::2"               # P's link-local address, for neighbour discovery
SYN, ACK, RST, SYN_ACK = 0x02, 0x10, 0x04, 0x12


def to_host(proto, sport, dport, family=V4, **kw) -> Case:
    return Case(Packet(P[family], T[family], proto, sport=sport, dport=dport, **kw), "input")


def from_host(proto, sport, dport, family=V4, **kw) -> Case:
    return Case(Packet(T[family], P[family], proto, sport=sport, dport=dport, **kw), "output")


def outbound(proto, sport, dport, family=V4, **kw) -> Case:
    """Forwarded from P (behind vin0) to FAR."""
    return Case(Packet(P[family], FAR[family], proto, sport=sport, dport=dport, **kw),
                "forward")


def inbound(proto, sport, dport, family=V4, **kw) -> Case:
    """Forwarded from FAR to P."""
    return Case(Packet(FAR[family], P[family], proto, sport=sport, dport=dport, **kw),
                "reverse")


# (cases, whether each arrives): the traffic each fixture is about.
TRAFFIC = {
    # its REJECT rules answered by the service (answers.py; in the lab the answers
    # find no route back, for the kernel's as for ours)
    "fail2ban": [
        (to_host("tcp", 40000, 22, tcp_flags=SYN), True),
        (to_host("udp", 40001, 7100), False),
        (to_host("tcp", 40002, 25, tcp_flags=SYN), True),
        (to_host("udp", 40003, 9999), True),
        (inbound("tcp", 9030, 80, tcp_flags=SYN), True),
        (inbound("tcp", 9030, 81, tcp_flags=SYN), False),
        (outbound("udp", 40004, 53), True),
    ],
    # its addrtype rules asked of the service's mirror of the local table
    "ufw": [
        (to_host("tcp", 40010, 22, tcp_flags=SYN), True),
        (to_host("tcp", 40011, 23, tcp_flags=SYN), False),
        (to_host("udp", 40012, 137), False),
        (to_host("icmp", 0, 0, icmp_type=8), True),
        (from_host("tcp", 40013, 443, tcp_flags=SYN), True),
        (outbound("tcp", 40014, 80, tcp_flags=SYN), False),
    ],
    "ufw.ip6": [
        (to_host("tcp", 40020, 22, V6, tcp_flags=SYN), True),
        (to_host("tcp", 40021, 443, V6, tcp_flags=SYN), True),
        (to_host("tcp", 40022, 23, V6, tcp_flags=SYN), False),
        (from_host("udp", 40023, 53, V6), True),
    ],
    "firewalld.ip6": [
        (to_host("tcp", 40030, 22, V6, tcp_flags=SYN), True),
        (to_host("tcp", 40031, 80, V6, tcp_flags=SYN), False),
        (to_host("udp", 40032, 5000, V6), True),
        (outbound("tcp", 40033, 80, V6, tcp_flags=SYN), False),
        (from_host("udp", 40034, 53, V6), True),
    ],
    "docker": [
        (inbound("tcp", 5555, 80, tcp_flags=SYN, seq=10), True),     # the published port
        (outbound("tcp", 80, 5555, tcp_flags=SYN_ACK, seq=70, ack=11), True),
        (inbound("tcp", 5555, 80, tcp_flags=ACK, seq=11, ack=71), True),
        (inbound("tcp", 5556, 22, tcp_flags=SYN, seq=10), False),    # not published
        (outbound("tcp", 40000, 443, tcp_flags=SYN, seq=500), True),  # a container goes out
        (inbound("tcp", 443, 40000, tcp_flags=SYN_ACK, seq=900, ack=501), True),   # its reply
        (inbound("tcp", 443, 40001, tcp_flags=SYN_ACK, seq=900, ack=501), False),  # unsolicited
        (outbound("udp", 40002, 53), True),
        (inbound("udp", 53, 40002), True),
        (inbound("udp", 53, 40003), False),
        (outbound("icmp", 0, 0, icmp_type=8), True),
        (inbound("icmp", 0, 0, icmp_type=0), True),
    ],
    "server": [
        (to_host("tcp", 41000, 22, tcp_flags=SYN, seq=1), True),
        (to_host("tcp", 41001, 443, tcp_flags=SYN, seq=1), True),
        (to_host("tcp", 41002, 25, tcp_flags=SYN, seq=1), False),
        (to_host("tcp", 41003, 22, tcp_flags=ACK, seq=1, ack=1), False),   # no SYN, no connection
        (to_host("udp", 41004, 53), True),
        (to_host("udp", 41005, 123), True),
        (to_host("udp", 41006, 9), False),
        (from_host("tcp", 41010, 443, tcp_flags=SYN, seq=100), True),
        (to_host("tcp", 443, 41010, tcp_flags=SYN_ACK, seq=7, ack=101), True),
        (to_host("tcp", 443, 41011, tcp_flags=SYN_ACK, seq=7, ack=101), False),
        (from_host("udp", 41012, 53), True),
        (to_host("udp", 53, 41012), True),
        # ping: a burst of 10, then 5 a second
        *[(to_host("icmp", 0, 0, icmp_type=8), True) for _ in range(10)],
        (to_host("icmp", 0, 0, icmp_type=8), False),
    ],
    "docker.ip6": [
        (outbound("tcp", 40000, 443, V6, tcp_flags=SYN, seq=500), True),   # a container goes out
        (inbound("tcp", 443, 40000, V6, tcp_flags=SYN_ACK, seq=900, ack=501), True),  # its reply
        (outbound("tcp", 40000, 443, V6, tcp_flags=ACK, seq=501, ack=901), True),
        (inbound("tcp", 443, 40001, V6, tcp_flags=SYN_ACK, seq=900, ack=501), False),
        (inbound("tcp", 5555, 80, V6, tcp_flags=SYN, seq=10), False),   # nothing published
        (outbound("udp", 40002, 53, V6), True),
        (inbound("udp", 53, 40002, V6), True),
        (inbound("udp", 53, 40003, V6), False),
        # ICMPv6 errors about the container's flows are RELATED; others are not let in
        (Case(icmpv6_error(FAR[V6], P[V6], Packet(P[V6], FAR[V6], "udp", sport=40002,
                                                  dport=53)), "reverse"), True),
        (Case(icmpv6_error(FAR[V6], P[V6], Packet(P[V6], FAR[V6], "udp", sport=40009,
                                                  dport=53)), "reverse"), False),
        (outbound("icmpv6", 0, 0, V6), True),
        (inbound("icmpv6", 0, 0, V6, icmp_type=129), True),
        (inbound("icmpv6", 0, 0, V6), False),
        # from one container to another on the same bridge: routed back out vin0
        (Case(Packet("2001:db8:1::3", P[V6], "tcp", dport=80), "forward"), True),
    ],
    "synology.ip6": [
        (to_host("tcp", 41000, 443, V6, tcp_flags=SYN), True),      # the NAS's services
        (to_host("tcp", 41001, 9030, V6, tcp_flags=SYN), True),
        (to_host("tcp", 41002, 22, V6, tcp_flags=SYN), False),      # closed by port
        (to_host("tcp", 41003, 8080, V6, tcp_flags=SYN), False),    # closed by the last DROP
        (to_host("udp", 41004, 1900, V6), True),
        (to_host("udp", 5004, 41005, V6), True),                     # by source port
        (to_host("udp", 41006, 5353, V6), False),
        (to_host("udp", 41007, 9999, V6), False),
        (to_host("icmpv6", 0, 0, V6), False),                        # no ping over IPv6
        # neighbour and router discovery from link-local sources only
        (Case(neighbour_solicitation(LINK_LOCAL, T[V6], T[V6]), "input"), True),
        (Case(neighbour_solicitation(P[V6], T[V6], T[V6]), "input"), False),
        (Case(neighbour_advertisement(LINK_LOCAL, T[V6], LINK_LOCAL), "input"), True),
        (Case(router_solicitation(LINK_LOCAL, T[V6]), "input"), True),
        (Case(router_advertisement(LINK_LOCAL), "input"), True),
        (Case(redirect(LINK_LOCAL, T[V6], LINK_LOCAL, FAR[V6]), "input"), True),
        (Case(router_solicitation(P[V6], T[V6]), "input"), False),
        # the NAS's own flows: replies and their ICMPv6 errors are let in
        (from_host("tcp", 41010, 443, V6, tcp_flags=SYN, seq=100), True),
        (to_host("tcp", 443, 41010, V6, tcp_flags=SYN_ACK, seq=7, ack=101), True),
        (to_host("tcp", 443, 41011, V6, tcp_flags=SYN_ACK, seq=7, ack=101), False),
        (from_host("udp", 41012, 53, V6), True),
        (to_host("udp", 53, 41012, V6), True),
        (Case(icmpv6_error(P[V6], T[V6], Packet(T[V6], P[V6], "udp", sport=41012, dport=53)),
              "input"), True),
        (Case(icmpv6_error(P[V6], T[V6], Packet(T[V6], P[V6], "udp", sport=41019, dport=53)),
              "input"), False),
        # resets from vin0: a burst of 5, then 1 a second (DOS_PROTECT)
        *[(to_host("tcp", 41020, 80, V6, tcp_flags=RST), True) for _ in range(5)],
        (to_host("tcp", 41020, 80, V6, tcp_flags=RST), False),
        # forwarded, both ways
        (outbound("tcp", 40020, 9030, V6, tcp_flags=SYN, seq=1), True),
        (inbound("tcp", 9030, 40020, V6, tcp_flags=SYN_ACK, seq=50, ack=2), True),
        (inbound("tcp", 9030, 40021, V6, tcp_flags=SYN_ACK, seq=50, ack=2), False),
        (outbound("tcp", 40022, 22, V6, tcp_flags=SYN), False),
        (outbound("udp", 40023, 1900, V6), True),
        (outbound("udp", 40024, 5353, V6), False),
        (outbound("udp", 40025, 7777, V6), False),
    ],
}


@pytest.fixture(scope="module")
def service():
    svc = Service()
    try:
        svc.start()
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def lab(service):
    backend = ServiceBackend(service.socket, service.bpffs, env=service.env)
    with Lab({"kernel": KernelBackend(), "bpfilter": backend}) as lab:
        yield lab


def test_every_fixture_is_covered():
    assert set(FIXTURES) == set(TRAFFIC)


def test_the_inventory_is_up_to_date():
    with open(os.path.join(realworld_inventory.FIXTURES, "INVENTORY.md")) as f:
        assert f.read() == realworld_inventory.inventory(), \
            "run: python3 tools/realworld_inventory.py > tests/realworld/INVENTORY.md"


@pytest.mark.parametrize("name", sorted(TRAFFIC))
def test_fixture_behaves_as_with_the_kernel(lab, name):
    cases = [case for case, _ in TRAFFIC[name]]
    fixture = FIXTURES[name]
    assert {c.packet.family for c in cases} == {fixture.family}
    arrived = assert_identical(lab, fixture.text, cases, family=fixture.family)["kernel"]
    assert arrived == [expected for _, expected in TRAFFIC[name]]
