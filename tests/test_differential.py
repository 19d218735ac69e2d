"""The differential test: the same ruleset in the kernel's legacy iptables and in
bpfilter, real packets over veth from a peer namespace. Which packets arrive, and
every per-entry counter, must be identical.

Seeded random rulesets (BPFILTER_DIFF_SEEDS, default 40, of 200 packets each) and
hand-written realistic ones. A failing seed is reproduced with
`BPFILTER_DIFF_SEEDS=1 BPFILTER_DIFF_FIRST=<seed> pytest tests/test_differential.py`.
"""
import os

import pytest

from bpfilter.demo import RULESET as HOST_FIREWALL, TRAFFIC as HOST_TRAFFIC
from bpfilter.abi import codec
from bpfilter.abi.decode import table_from_raw
from bpfilter.compiler import classifier, multifield
from bpfilter.scratch import replace_blob
from bpfilter.lab import Case, Lab, Packet
from rulegen import generate

pytestmark = pytest.mark.kernel

SEEDS = int(os.environ.get("BPFILTER_DIFF_SEEDS", "40"))
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


@pytest.fixture(scope="module")
def lab():
    with Lab({"kernel": "kernel", "bpfilter": "bpfilter"}) as lab:
        yield lab


def assert_identical(lab: Lab, ruleset: str, cases: list, target: str = "bpfilter") -> dict:
    """Load `ruleset` everywhere, send `cases`; the kernel's and `target`'s arrivals
    and per-entry counters must be identical. Returns the arrivals."""
    lab.load(ruleset)
    arrived = lab.run(cases)
    kernel, ours = lab.counters("kernel"), lab.counters(target)
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


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_random_ruleset(lab, seed):
    ruleset, cases = generate(seed)
    assert_identical(lab, ruleset, cases)


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
            for s in classifier.segments(chain.rules, classifier.TupleSpace())
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
