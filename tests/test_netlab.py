"""The differential lab, checked with the kernel's iptables on both sides."""
import os
import time

import pytest

from bpfilter_lab.lab import Case, Lab
from bpfilter_lab.packets import Packet
from rulegen import generate

pytestmark = pytest.mark.kernel

HAND_RULESET = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:fwd - [0:0]
-A INPUT -p udp --dport 53 -j DROP
-A INPUT -s 198.18.0.2 -p icmp --icmp-type echo-request -j ACCEPT
-A INPUT -p tcp --syn -j DROP
-A FORWARD -f -j DROP
-A FORWARD -i vin0 -o vout0 -j fwd
-A OUTPUT -d 198.18.0.2 -j DROP
-A OUTPUT -p tcp --tcp-flags SYN,ACK SYN,ACK
-A fwd -p tcp --dport 80 -j ACCEPT
-A fwd -p udp ! --dport 1000:2000 -j ACCEPT
COMMIT
"""
S, T, FAR = "198.18.0.2", "198.18.0.1", "198.19.5.5"
# (case, arrives, entry indices whose counters it bumps).  Entries: 0-2 INPUT
# rules, 3 INPUT policy, 4-5 FORWARD rules, 6 FORWARD policy, 7-8 OUTPUT
# rules, 9 OUTPUT policy, 10 fwd head, 11-12 fwd rules, 13 fwd return,
# 14 table end.
HAND_CASES = [
    (Case(Packet(S, T, "udp", dport=53), "input"), False, [0]),
    (Case(Packet(S, T, "udp", dport=54), "input"), True, [3]),
    (Case(Packet(S, T, "icmp", icmp_type=8), "input"), True, [1]),
    (Case(Packet("198.18.7.7", "198.19.0.1", "icmp", icmp_type=8), "input"), True, [3]),
    (Case(Packet(S, T, "tcp", dport=22, tcp_flags=0x02), "input"), False, [2]),
    (Case(Packet(S, T, "tcp", dport=22, tcp_flags=0x10), "input"), True, [3]),
    (Case(Packet(S, T, 47, options=b"\x94\x04\x00\x00"), "input"), True, [3]),
    (Case(Packet(S, FAR, "tcp", dport=80), "forward"), True, [5, 11]),
    (Case(Packet(S, FAR, "tcp", dport=81), "forward"), False, [5, 13, 6]),
    (Case(Packet(S, FAR, "udp", dport=1500), "forward"), False, [5, 13, 6]),
    (Case(Packet(S, FAR, "udp", dport=53), "forward"), True, [5, 12]),
    (Case(Packet(S, FAR, "tcp", dport=80, frag_offset=5), "forward"), False, [4]),
    (Case(Packet(S, FAR, "tcp", dport=80, more_fragments=True), "forward"), True, [5, 11]),
    (Case(Packet(S, S, "tcp", dport=80), "forward"), False, [6]),
    # The tcp match hot-drops a truncated header: no counter past the jump.
    (Case(Packet(S, FAR, "tcp", dport=80, truncate_l4=10), "forward"), False, [5]),
    (Case(Packet("198.18.0.9", S, "udp"), "output"), False, [7]),
    (Case(Packet("198.18.0.9", FAR, "tcp", tcp_flags=0x12), "output"), True, [8, 9]),
    (Case(Packet("198.18.0.9", FAR, "icmp", icmp_type=0), "output"), True, [9]),
    (Case(Packet(T, FAR, "icmp", truncate_l4=4), "output"), True, [9]),
]


def _require_root():
    assert os.geteuid() == 0, "the lab needs root (network namespaces, raw sockets)"


@pytest.fixture(scope="module")
def lab():
    _require_root()
    with Lab({"kernel": "kernel", "kernel2": "kernel"}) as lab:
        yield lab


def test_hand_ruleset_arrivals_and_counters(lab):
    lab.load(HAND_RULESET)
    time.sleep(0.3)  # room for any background traffic to show up in the counters
    for target in lab.targets:
        assert lab.counters(target) == [(0, 0)] * 15, "traffic other than the test's"
    cases = [c for c, _, _ in HAND_CASES]
    expected_counters = [[0, 0] for _ in range(15)]
    for case, _, entries in HAND_CASES:
        for e in entries:
            expected_counters[e][0] += 1
            expected_counters[e][1] += len(case.packet.build(1, 0))
    arrived = lab.run(cases)
    time.sleep(0.3)
    for target in lab.targets:
        assert arrived[target] == [a for _, a, _ in HAND_CASES], target
        assert lab.counters(target) == [tuple(c) for c in expected_counters], target


def test_send_single(lab):
    lab.load(HAND_RULESET)
    assert lab.send("kernel", Packet(S, T, "udp", dport=54), "input")
    assert not lab.send("kernel2", Packet(S, T, "udp", dport=53), "input")


def test_unobservable_case_refused(lab):
    with pytest.raises(ValueError):
        lab.run([Case(Packet(S, FAR, "udp"), "input")])
    with pytest.raises(ValueError):
        lab.run([Case(Packet(S, T, "udp", frag_offset=3), "input")])


def test_lab_names_unique_and_torn_down_on_failure():
    _require_root()
    with pytest.raises(RuntimeError, match="boom"):
        with Lab({"a": "kernel"}) as one, Lab({"a": "kernel"}) as two:
            names = {one.netns("a"), two.netns("a"), one.sender, two.sender}
            assert len(names) == 4 and names <= set(os.listdir("/run/netns"))
            raise RuntimeError("boom")
    assert not names & set(os.listdir("/run/netns"))


@pytest.mark.parametrize("seed", range(20))
def test_random_rulesets_agree(lab, seed):
    ruleset, cases = generate(seed)
    lab.load(ruleset)
    first = lab.run(cases)
    assert first["kernel"] == first["kernel2"], ruleset
    counters = lab.counters("kernel")
    assert counters == lab.counters("kernel2"), ruleset
    # The same packets again: same arrivals, exactly doubled counters, so
    # nothing but the test's packets crossed a hook and late or stale
    # arrivals are not mistaken for new ones.
    second = lab.run(cases)
    assert second == first, ruleset
    doubled = [(2 * p, 2 * b) for p, b in counters]
    assert lab.counters("kernel") == doubled == lab.counters("kernel2"), ruleset
