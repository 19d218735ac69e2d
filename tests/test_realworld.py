"""Real rulesets (tests/realworld, see INVENTORY.md there) through bpfilter.

Each fixture goes in as a person puts it in: the unmodified iptables-legacy-restore
under `bpfilter exec`, into a running `bpfilter serve`. A fixture bpfilter supports
must then behave exactly as the kernel's iptables with the same ruleset, on traffic
written for it, connections included; one it does not support must be refused whole,
for the reason INVENTORY.md gives.
"""
from __future__ import annotations

import os
import sys

import pytest

from bpfilter_lab.backends import KernelBackend, ServiceBackend
from bpfilter_lab.lab import S_IN_ADDR, T_IN_ADDR, Case, Lab
from bpfilter_lab.packets import Packet

from test_differential import assert_identical
from test_service import Service

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import realworld_inventory  # noqa: E402

pytestmark = pytest.mark.kernel

FIXTURES = realworld_inventory.fixtures()
T, P = T_IN_ADDR, S_IN_ADDR          # the host, and its peer on vin0
FAR = "198.19.0.9"                   # a host beyond vout0
SYN, ACK, SYN_ACK = 0x02, 0x10, 0x12


def to_host(proto, sport, dport, **kw) -> Case:
    return Case(Packet(P, T, proto, sport=sport, dport=dport, **kw), "input")


def from_host(proto, sport, dport, **kw) -> Case:
    return Case(Packet(T, P, proto, sport=sport, dport=dport, **kw), "output")


def outbound(proto, sport, dport, **kw) -> Case:
    """Forwarded from P (behind vin0) to FAR."""
    return Case(Packet(P, FAR, proto, sport=sport, dport=dport, **kw), "forward")


def inbound(proto, sport, dport, **kw) -> Case:
    """Forwarded from FAR to P."""
    return Case(Packet(FAR, P, proto, sport=sport, dport=dport, **kw), "reverse")


# (cases, whether each arrives): the traffic each fixture is about.
TRAFFIC = {
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
}
REFUSED = {
    "fail2ban": "target 'REJECT'",
    "ufw": "match 'addrtype'",
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
    assert set(FIXTURES) == set(TRAFFIC) | set(REFUSED)
    assert not set(TRAFFIC) & set(REFUSED)


def test_the_inventory_is_up_to_date():
    with open(os.path.join(realworld_inventory.FIXTURES, "INVENTORY.md")) as f:
        assert f.read() == realworld_inventory.inventory(), \
            "run: python3 tools/realworld_inventory.py > tests/realworld/INVENTORY.md"


@pytest.mark.parametrize("name", sorted(TRAFFIC))
def test_fixture_behaves_as_with_the_kernel(lab, name):
    cases = [case for case, _ in TRAFFIC[name]]
    arrived = assert_identical(lab, FIXTURES[name], cases)["kernel"]
    assert arrived == [expected for _, expected in TRAFFIC[name]]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_fixture_is_refused_whole(lab, name):
    done = lab.backend("bpfilter").exec(lab, "bpfilter", ["iptables-legacy-restore"],
                                         FIXTURES[name])
    assert done.returncode != 0
    assert REFUSED[name] in done.stderr and "the whole table is refused" in done.stderr, \
        done.stderr
