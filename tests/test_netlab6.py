"""The lab's IPv6 side, checked with the kernel's ip6tables-legacy in identical targets."""
from __future__ import annotations

import time

import pytest

from bpfilter.model import Family
from bpfilter.netns import entered
from bpfilter_lab.backends import kernel_counters
from bpfilter_lab.lab import S_IN6_ADDR as S
from bpfilter_lab.lab import S_OUT6_ADDR, Case, Lab
from bpfilter_lab.lab import T_IN6_ADDR as T
from bpfilter_lab.lab import T_OUT6_ADDR as T2
from bpfilter_lab.packets import (ROUTER_ALERT_MLD, AuthenticationHeader, DestinationOptions,
                                  Fragment, HopByHop, Option, Packet, Routing, icmpv6_error,
                                  mld_query, neighbour_advertisement, neighbour_solicitation,
                                  redirect, router_advertisement, router_solicitation)
from bpfilter_lab.scratch import replace_blob

pytestmark = pytest.mark.kernel

IPV6 = Family.IPV6
FAR, FARTHER = "2001:db8:7::7", "2001:db8:8::8"
S_LINK_LOCAL = "fe80::bf:102"
S_MAC = "02:bf:00:00:01:02"

HAND_RULESET = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:fwd - [0:0]
-A INPUT -p udp --dport 53 -j DROP
-A INPUT -s 2001:db8:1::2 -p icmpv6 --icmpv6-type echo-request -j ACCEPT
-A INPUT -p tcp --syn -j DROP
-A INPUT -m frag --fragmore -j DROP
-A INPUT -m rt --rt-type 0 --rt-segsleft 1 -j DROP
-A FORWARD -m frag --fragid 7 -j DROP
-A FORWARD -i vin0 -o vout0 -j fwd
-A FORWARD -i vout0 -o vin0 -p udp --sport 53 -j ACCEPT
-A OUTPUT -d 2001:db8:1::2 -j DROP
-A OUTPUT -p tcp --tcp-flags SYN,ACK SYN,ACK
-A fwd -p tcp --dport 80 -j ACCEPT
-A fwd -p udp ! --dport 1000:2000 -j ACCEPT
COMMIT
"""
# Entries: 0-4 INPUT rules, 5 INPUT policy, 6-8 FORWARD rules, 9 FORWARD policy,
# 10-11 OUTPUT rules, 12 OUTPUT policy, 13 fwd head, 14-15 fwd rules, 16 fwd return,
# 17 table end.
ENTRIES = 18
FWD, FWD_ACCEPT_80, FWD_RETURN = 7, 14, 16
# (case, arrives, entries whose counters it bumps)
HAND_CASES = [
    (Case(Packet(S, T, "udp", dport=53), "input"), False, [0]),
    (Case(Packet(S, T, "udp", dport=54), "input"), True, [5]),
    (Case(Packet(S, T, "icmp"), "input"), True, [1]),
    (Case(Packet(FAR, T2, "icmp"), "input"), True, [5]),
    (Case(Packet(S, T, "tcp", dport=22), "input"), False, [2]),
    (Case(Packet(S, T, "tcp", dport=22, tcp_flags=0x10), "input"), True, [5]),
    # -p finds the transport header past any extension header
    (Case(Packet(S, T, "tcp", dport=22, ext=[HopByHop(), DestinationOptions()]), "input"),
     False, [2]),
    (Case(Packet(S, T, "udp", dport=53, ext=[AuthenticationHeader(spi=9)]), "input"),
     False, [0]),
    (Case(Packet(S, T, "udp", dport=54, ext=[AuthenticationHeader(spi=9)]), "input"),
     True, [5]),
    (Case(Packet(S, T, "udp", dport=53, ext=[Fragment(more=True)]), "input"), False, [0]),
    (Case(Packet(S, T, "udp", dport=54, ext=[Fragment(more=True)]), "input"), False, [3]),
    # a later fragment has no udp header for --dport: no match, and no drop either
    (Case(Packet(S, T, "udp", dport=53, ext=[Fragment(offset=5)]), "input"), True, [5]),
    (Case(Packet(S, T, "udp", dport=54, ext=[Routing(0, 1, (FAR,))]), "input"), False, [4]),
    (Case(Packet(S, T, "udp", dport=54, ext=[Routing(0, 0, (FAR,))]), "input"), True, [5]),
    (Case(Packet(S, T, "ipv6-nonxt"), "input"), True, [5]),
    (Case(neighbour_solicitation(S, T, T, S_MAC), "input"), True, [5]),
    (Case(icmpv6_error(S, T, Packet(T, S, "udp", dport=53)), "input"), True, [5]),
    (Case(Packet(S, FAR, "tcp", dport=80), "forward"), True, [FWD, FWD_ACCEPT_80]),
    (Case(Packet(S, FAR, "tcp", dport=81), "forward"), False, [FWD, FWD_RETURN, 9]),
    (Case(Packet(S, FAR, "udp", dport=1500), "forward"), False, [FWD, FWD_RETURN, 9]),
    (Case(Packet(S, FAR, "udp", dport=53), "forward"), True, [FWD, 15]),
    (Case(Packet(S, FAR, "tcp", dport=80, ext=[Fragment(more=True, ident=7)]), "forward"),
     False, [6]),
    (Case(Packet(S, FAR, "tcp", dport=80, ext=[Fragment(more=True)]), "forward"),
     True, [FWD, FWD_ACCEPT_80]),
    (Case(Packet(S, FAR, "tcp", dport=80, ext=[Fragment(offset=8)]), "forward"),
     False, [FWD, FWD_RETURN, 9]),
    # only the destination processes a routing header
    (Case(Packet(S, FAR, "tcp", dport=80, ext=[HopByHop((ROUTER_ALERT_MLD,)),
                                               Routing(0, 2, (FAR, FARTHER))]), "forward"),
     True, [FWD, FWD_ACCEPT_80]),
    (Case(Packet(S, S, "tcp", dport=80), "forward"), False, [9]),
    # the tcp match drops a header it cannot read, uncounted past the jump
    (Case(Packet(S, FAR, "tcp", dport=80, truncate_l4=10), "forward"), False, [FWD]),
    (Case(Packet(FAR, S, "udp", sport=53), "reverse"), True, [8]),
    (Case(Packet(FAR, S, "udp", sport=54), "reverse"), False, [9]),
    (Case(Packet(T, S, "udp"), "output"), False, [10]),
    (Case(Packet(T, FAR, "tcp", tcp_flags=0x12), "output"), True, [11, 12]),
    (Case(Packet(T2, FAR, "icmp", icmp_type=129), "output"), True, [12]),
    (Case(Packet(T, FAR, "icmp", truncate_l4=2), "output"), True, [12]),
]


@pytest.fixture(scope="module")
def lab():
    with Lab({"kernel": "kernel", "kernel2": "kernel"}) as lab:
        yield lab


def expected_counters(cases) -> list[tuple[int, int]]:
    counters = [[0, 0] for _ in range(ENTRIES)]
    for case, _, entries in cases:
        for e in entries:
            counters[e][0] += 1
            counters[e][1] += len(case.packet.build(1, 0))
    return [tuple(c) for c in counters]


def test_hand_ruleset_arrivals_and_counters(lab):
    lab.load(HAND_RULESET, IPV6)
    for target in lab.targets:
        assert lab.counters(target, IPV6) == [(0, 0)] * ENTRIES, "traffic other than the test's"
    arrived = lab.run([c for c, _, _ in HAND_CASES])
    for target in lab.targets:
        assert arrived[target] == [a for _, a, _ in HAND_CASES], target
        assert lab.counters(target, IPV6) == expected_counters(HAND_CASES), target


ACCEPT_ALL = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
EVERY_PATH = [
    *(Case(Packet(S, dst, proto), "input") for dst in (T, T2) for proto in ("tcp", "udp", "icmp", 47)),
    Case(Packet(S, "ff02::1", "icmp"), "input"),
    Case(Packet(S, T, "tcp", ext=[HopByHop(), DestinationOptions((Option(0x1E, b"ab"),)),
                                  Routing(0, 0, (FAR,)), Fragment(), AuthenticationHeader()]),
         "input"),
    *(Case(Packet(S, dst, proto), "forward") for dst in (FAR, S, S_OUT6_ADDR)
      for proto in ("tcp", "udp", "icmp", 47)),
    *(Case(Packet(FAR, S, proto), "reverse") for proto in ("tcp", "udp", "icmp", 47)),
    *(Case(Packet(src, dst, proto), "output") for src in (T, FAR) for dst in (S, FAR)
      for proto in ("tcp", "udp", "icmp", 47)),
]


def test_every_path_delivers(lab):
    lab.load(ACCEPT_ALL, IPV6)
    arrived = lab.run(EVERY_PATH)
    for target in lab.targets:
        assert arrived[target] == [True] * len(EVERY_PATH), target


def test_send_single(lab):
    lab.load(HAND_RULESET, IPV6)
    assert lab.send("kernel", Packet(S, T, "udp", dport=54), "input")
    assert not lab.send("kernel2", Packet(S, T, "udp", dport=53), "input")


@pytest.mark.parametrize("case", [
    Case(Packet(S, FAR, "udp"), "input"),                    # not T's
    Case(Packet(S, "ff02::2", "udp"), "input"),              # a group T is not in
    Case(Packet(S, "ff02::1", "udp"), "forward"),            # multicast is not forwarded
    Case(Packet(S, T, "udp"), "forward"),                    # T's own
    Case(Packet(FAR, T, "udp"), "reverse"),                  # reverse goes to S's side
    Case(Packet(S, T, 255), "input"),                        # no raw socket reads these
    Case(Packet(S, T, "udp", ext=[HopByHop(next_header=0)]), "input"),
    Case(Packet(S, T, "icmp", truncate_l4=2), "input"),      # raw ICMPv6 sockets drop these
    Case(Packet(S, T, "udp", next_header=58), "input"),      # ... and a wrong checksum
])
def test_unobservable_case_refused(lab, case):
    with pytest.raises(ValueError):
        lab.run([case])


def test_ip6tables_blob():
    blob = replace_blob(HAND_RULESET, family=IPV6)
    # ip6t_replace's header, then 18 entries of at least an ip6t_entry each
    assert blob[:6] == b"filter" and int.from_bytes(blob[36:40], "little") == ENTRIES
    assert len(blob) - 96 == int.from_bytes(blob[40:44], "little") >= ENTRIES * 168


# ---------------------------------------------------------------- quietness

QUIET_RULESET = """\
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING
-A OUTPUT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING
-A INPUT
-A FORWARD
-A OUTPUT
-A POSTROUTING
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT
-A FORWARD
-A OUTPUT
COMMIT
"""
CHAINS = {"raw": ("PREROUTING", "OUTPUT"),
          "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
          "filter": ("INPUT", "FORWARD", "OUTPUT")}
HOOKS = {"input": ("PREROUTING", "INPUT"), "forward": ("PREROUTING", "FORWARD", "POSTROUTING"),
         "reverse": ("PREROUTING", "FORWARD", "POSTROUTING"), "output": ("OUTPUT", "POSTROUTING")}
# Every packet T's stack could answer, or start something with, and the hooks each
# crosses itself (the path's, unless said).
PROVOCATIONS = [
    (Case(Packet(S, T, "tcp", dport=22), "input"), None),              # RST
    (Case(Packet(S, T2, "tcp", dport=22, tcp_flags=0x10), "input"), None),
    (Case(Packet(S, T, "udp", dport=33434), "input"), None),           # port unreachable
    (Case(Packet(S, T, "icmp"), "input"), None),                       # echo reply
    (Case(Packet(S, "ff02::1", "icmp"), "input"), None),
    (Case(Packet(S, T, 253), "input"), None),                          # parameter problem
    (Case(Packet(S, T, "udp", ext=[Routing(0, 1, (FAR,))]), "input"), None),
    (Case(Packet(S, T, "udp", ext=[Routing(4, 1, (FAR,))]), "input"), None),
    (Case(Packet(S, T, "udp", ext=[DestinationOptions((Option(0xC2, bytes(4)),))]), "input"),
     None),
    (Case(Packet(S, T, "udp", ext=[Fragment(more=True)]), "input"), None),  # reassembly
    (Case(Packet(S, T, "udp", ext=[Fragment(offset=1)]), "input"), None),
    (Case(neighbour_solicitation(S, T, T, S_MAC), "input"), None),     # advertisement
    (Case(neighbour_solicitation(S_LINK_LOCAL, "ff02::1", T2, S_MAC), "input"), None),
    (Case(neighbour_advertisement(S, "ff02::1", S, flags=0x20000000,
                                                target_lladdr=S_MAC), "input"), None),
    (Case(router_solicitation(S_LINK_LOCAL, "ff02::1"), "input"), None),
    (Case(router_advertisement(S_LINK_LOCAL), "input"), None),
    (Case(redirect(S_LINK_LOCAL, T, FAR, FARTHER), "input"), None),
    (Case(mld_query(S_LINK_LOCAL), "input"), None),                    # reports
    (Case(icmpv6_error(S, T, Packet(T, S, "udp"), icmp_type=2, icmp_rest=1280), "input"), None),
    # dropped while hop-by-hop options are read, before any hook: a parameter problem
    (Case(Packet(S, T, "udp", ext=[HopByHop((Option(0x80, bytes(2)),))]), "input"), ()),
    (Case(Packet(S, FAR, "udp", ext=[HopByHop((Option(0x80, bytes(2)),))]), "forward"), ()),
    (Case(Packet(S, FAR, "udp", ttl=1), "forward"), ("PREROUTING",)),  # time exceeded
    (Case(Packet(S, FAR, "tcp"), "forward"), None),
    (Case(Packet(S, S, "tcp"), "forward"), None),                      # redirect
    (Case(Packet(FAR, S, "udp"), "reverse"), None),
    (Case(Packet(S_LINK_LOCAL, FAR, "udp"), "forward"), ("PREROUTING",)),  # beyond scope
    (Case(Packet(S, "2001:db9::1", "udp"), "forward"), ("PREROUTING",)),  # no route
    (Case(Packet(T, FAR, "udp"), "output"), None),
    (Case(Packet(T, S, "icmp"), "output"), None),
]


def quiet_counters(lab: Lab, target: str) -> dict[str, list[tuple[int, int]]]:
    """(packets, bytes) counted by each chain's one rule, which its policy must repeat."""
    out = {}
    for table, chains in CHAINS.items():
        entries = kernel_counters(lab.netns(target), table, IPV6)
        rules, policies = entries[0:-1:2], entries[1:-1:2]
        assert rules == policies and entries[-1] == (0, 0), table
        out.update({f"{table} {chain}": c for chain, c in zip(chains, rules)})
    return out


def sent_by_stack(lab: Lab, target: str) -> dict[str, int]:
    with entered(lab.netns(target)), open("/proc/net/snmp6") as f:
        snmp = dict(line.split() for line in f)
    return {k: int(snmp[k]) for k in ("Icmp6OutMsgs", "Ip6OutRequests")}


def test_targets_are_quiet():
    """Nothing but the test's packets crosses a target's hooks, idle or provoked, and a
    target's own stack never sends a thing (since it was made): no DAD, no router
    solicitation, no MLD report, no neighbour discovery, no answer to anything."""
    with Lab({"kernel": "kernel", "kernel2": "kernel"}) as lab:
        lab.load(QUIET_RULESET, IPV6)
        time.sleep(3)
        for target in lab.targets:
            assert set(quiet_counters(lab, target).values()) == {(0, 0)}, target
        want = {f"{table} {chain}": [0, 0] for table, chains in CHAINS.items()
                for chain in chains}
        for case, hooks in PROVOCATIONS:
            for hook in HOOKS[case.path] if hooks is None else hooks:
                for table, chains in CHAINS.items():
                    if hook in chains:
                        want[f"{table} {hook}"][0] += 1
                        want[f"{table} {hook}"][1] += len(case.packet.build(1, 0))
        want = {chain: tuple(c) for chain, c in want.items()}
        cases = [case for case, _ in PROVOCATIONS]
        arrived = lab.run(cases)
        time.sleep(3)
        outputs = sum(case.path == "output" for case in cases)
        for target in lab.targets:
            assert arrived[target] == arrived["kernel"], target
            assert quiet_counters(lab, target) == want, target
            assert sent_by_stack(lab, target) == {"Icmp6OutMsgs": 0, "Ip6OutRequests": outputs}
