"""`bpfilter demo`: one ruleset, the kernel's iptables and bpfilter side by side.

A sender namespace sends the same real packets over veth to two identically wired
namespaces: one filtered by the kernel's legacy iptables, one by bpfilter's BPF
programs (loaded from the exact blob `iptables-legacy-restore` produced). The demo
shows what arrived where and both sets of per-rule counters, and fails if they differ.
"""
from __future__ import annotations

import subprocess

from .lab import Case, Lab, Packet, T_IN_ADDR
from .listing import render

RULESET = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SERVICES - [0:0]
:ADMIN - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j SERVICES
-A INPUT -p udp -m udp --dport 53 -j ACCEPT
-A SERVICES -p tcp -m tcp --dport 22 -j ADMIN
-A SERVICES -p tcp -m tcp --dport 80 -j ACCEPT
-A SERVICES -p tcp -m tcp --dport 443 -j ACCEPT
-A ADMIN -s 198.18.0.0/28 -j ACCEPT
-A ADMIN -j DROP
-A FORWARD -i vin0 -o vout0 -p tcp -m tcp --dport 8000:8099 -j ACCEPT
-A FORWARD -f -j DROP
-A OUTPUT -p udp -m udp --dport 9 -j DROP
COMMIT
"""

ADMIN_HOST, STRANGER = "198.18.0.2", "198.18.0.200"
ELSEWHERE = "198.19.7.7"

TRAFFIC = [
    ("ping", Case(Packet(STRANGER, T_IN_ADDR, "icmp", icmp_type=8), "input")),
    ("icmp timestamp request", Case(Packet(STRANGER, T_IN_ADDR, "icmp", icmp_type=13), "input")),
    ("ssh SYN from the admin net", Case(Packet(ADMIN_HOST, T_IN_ADDR, "tcp", dport=22), "input")),
    ("ssh SYN from elsewhere", Case(Packet(STRANGER, T_IN_ADDR, "tcp", dport=22), "input")),
    ("http SYN", Case(Packet(STRANGER, T_IN_ADDR, "tcp", dport=80), "input")),
    ("https SYN", Case(Packet(STRANGER, T_IN_ADDR, "tcp", dport=443), "input")),
    ("http ACK (no SYN)", Case(Packet(STRANGER, T_IN_ADDR, "tcp", dport=80, tcp_flags=0x10),
                               "input")),
    ("smtp SYN", Case(Packet(STRANGER, T_IN_ADDR, "tcp", dport=25), "input")),
    ("dns query", Case(Packet(STRANGER, T_IN_ADDR, "udp", dport=53), "input")),
    ("ntp query", Case(Packet(STRANGER, T_IN_ADDR, "udp", dport=123), "input")),
    ("routed tcp to port 8080", Case(Packet(STRANGER, ELSEWHERE, "tcp", dport=8080), "forward")),
    ("routed tcp to port 9000", Case(Packet(STRANGER, ELSEWHERE, "tcp", dport=9000), "forward")),
    ("routed non-first fragment", Case(Packet(STRANGER, ELSEWHERE, "tcp", frag_offset=64),
                                       "forward")),
    ("sent udp to discard (9)", Case(Packet(T_IN_ADDR, ELSEWHERE, "udp", dport=9), "output")),
    ("sent udp to port 10", Case(Packet(T_IN_ADDR, ELSEWHERE, "udp", dport=10), "output")),
]


def _word(arrived: bool) -> str:
    return "passed" if arrived else "dropped"


def run(verbose: bool = False) -> int:
    print("The ruleset, loaded with iptables-legacy-restore into the kernel and into bpfilter:\n")
    print(RULESET)
    with Lab({"kernel": "kernel", "bpfilter": "bpfilter"}) as lab:
        lab.load(RULESET)
        cases = [case for _, case in TRAFFIC]
        arrived = lab.run(cases)
        print(f"{'packet':<32}{'kernel iptables':<18}bpfilter")
        for i, (what, _) in enumerate(TRAFFIC):
            k, b = arrived["kernel"][i], arrived["bpfilter"][i]
            flag = "" if k == b else "   <-- DIFFERENT"
            print(f"{what:<32}{_word(k):<18}{_word(b)}{flag}")

        loaded = lab.backend("bpfilter").loaded
        ours, theirs = lab.counters("bpfilter"), lab.counters("kernel")
        print("\nbpfilter's counters (the kernel's must be identical, entry by entry):\n")
        print(render(loaded.table, ours))
        print("The BPF programs doing the filtering:")
        for rules in loaded.hooks.values():
            print(f"  {rules.program.name}: {rules.insn_count} instructions, attached at "
                  f"{rules.hook.name} through dispatcher bpfilter_{rules.hook.chain_name}")
        if verbose:
            print(subprocess.run(["bpftool", "prog", "show"], capture_output=True,
                                 text=True).stdout)
        same = arrived["kernel"] == arrived["bpfilter"] and ours == theirs
        print("\nverdicts identical:", arrived["kernel"] == arrived["bpfilter"],
              "| counters identical:", ours == theirs)
        return 0 if same else 1
