"""`python3 -m bpfilter_lab demo`: the unmodified iptables and ip6tables drive
bpfilter, next to the kernel's own.

A sender namespace sends the same real packets over veth to two identically wired
namespaces. In one, the kernel's legacy iptables and ip6tables filter. In the other,
the same rulesets go in with the unmodified `iptables-legacy-restore` and
`ip6tables-legacy-restore` run under `bpfilter exec`, so BPF programs filter. The demo
shows what arrived where and both namespaces' `-L -v` listings, and fails if they
differ.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from bpfilter.daemon import flush

from bpfilter.model import Family

from .backends import ServiceBackend
from .lab import S_IN6_ADDR, T_IN6_ADDR, T_IN_ADDR, Case, Lab
from .packets import DestinationOptions, Fragment, HopByHop, Packet, Routing, icmpv6_error

RULESET = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SERVICES - [0:0]
:ADMIN - [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
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
    ("our dns query to the admin host", Case(Packet(T_IN_ADDR, ADMIN_HOST, "udp", sport=40000,
                                                    dport=53), "output")),
    ("its answer", Case(Packet(ADMIN_HOST, T_IN_ADDR, "udp", sport=53, dport=40000), "input")),
    ("an 'answer' nobody asked for", Case(Packet(ADMIN_HOST, T_IN_ADDR, "udp", sport=53,
                                                 dport=40001), "input")),
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


# A host that is also a router, as a distribution's IPv6 firewall sets it up: type 0
# routing headers refused (ufw), replies and ICMPv6 errors about its own flows let in,
# neighbour discovery and ping allowed, ssh from the admin network only.
RULESET6 = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SERVICES - [0:0]
-A INPUT -m rt --rt-type 0 -j DROP
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT
-A INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j SERVICES
-A SERVICES -s 2001:db8:1::/64 -p tcp -m tcp --dport 22 -j ACCEPT
-A SERVICES -p tcp -m multiport --dports 80,443 -j ACCEPT
-A FORWARD -m rt --rt-type 0 -j DROP
-A FORWARD -i vin0 -o vout0 -p udp -m udp --dport 5000:5099 -j ACCEPT
-A OUTPUT -p udp -m udp --dport 9 -j DROP
COMMIT
"""

STRANGER6, ELSEWHERE6 = "2001:db8:9::7", "2001:db8:2::77"

TRAFFIC6 = [
    ("our dns query to the admin host", Case(Packet(T_IN6_ADDR, S_IN6_ADDR, "udp",
                                                     sport=40000, dport=53), "output")),
    ("its answer", Case(Packet(S_IN6_ADDR, T_IN6_ADDR, "udp", sport=53, dport=40000),
                        "input")),
    ("an 'answer' nobody asked for", Case(Packet(S_IN6_ADDR, T_IN6_ADDR, "udp", sport=53,
                                                 dport=40001), "input")),
    ("an ICMPv6 error about our query", Case(icmpv6_error(S_IN6_ADDR, T_IN6_ADDR, Packet(
        T_IN6_ADDR, S_IN6_ADDR, "udp", sport=40000, dport=53)), "input")),
    ("ping", Case(Packet(STRANGER6, T_IN6_ADDR, "icmpv6", icmp_type=128), "input")),
    ("node information query", Case(Packet(STRANGER6, T_IN6_ADDR, "icmpv6", icmp_type=139),
                                    "input")),
    ("ssh SYN from the admin net", Case(Packet(S_IN6_ADDR, T_IN6_ADDR, "tcp", dport=22),
                                        "input")),
    ("ssh SYN from elsewhere", Case(Packet(STRANGER6, T_IN6_ADDR, "tcp", dport=22), "input")),
    ("https SYN past a hop-by-hop header", Case(Packet(STRANGER6, T_IN6_ADDR, "tcp", dport=443,
                                                       ext=(HopByHop(),)), "input")),
    ("https SYN via a type 0 routing header", Case(Packet(
        STRANGER6, T_IN6_ADDR, "tcp", dport=443, ext=(Routing(type=0),)), "input")),
    ("smtp SYN", Case(Packet(STRANGER6, T_IN6_ADDR, "tcp", dport=25), "input")),
    ("routed udp to port 5001", Case(Packet(STRANGER6, ELSEWHERE6, "udp", dport=5001),
                                     "forward")),
    ("... past destination options", Case(Packet(
        STRANGER6, ELSEWHERE6, "udp", dport=5001, ext=(DestinationOptions(),)), "forward")),
    ("routed udp to port 6000", Case(Packet(STRANGER6, ELSEWHERE6, "udp", dport=6000),
                                     "forward")),
    ("routed later fragment", Case(Packet(STRANGER6, ELSEWHERE6, "udp", dport=5001,
                                          ext=(Fragment(offset=8),)), "forward")),
    ("sent udp to discard (9)", Case(Packet(T_IN6_ADDR, ELSEWHERE6, "udp", dport=9),
                                     "output")),
]

FAMILIES = {Family.IPV4: ("iptables-legacy", RULESET, TRAFFIC),
            Family.IPV6: ("ip6tables-legacy", RULESET6, TRAFFIC6)}


def _word(arrived: bool) -> str:
    return "passed" if arrived else "dropped"


def _listing(lab: Lab, target: str, backend, family: Family) -> str:
    argv = [FAMILIES[family][0], "-L", "-v", "-n", "-x"]
    if target == "bpfilter":
        done = backend.exec(lab, target, argv)
    else:
        done = subprocess.run(["ip", "netns", "exec", lab.netns(target), *argv],
                              capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} in {target}: {done.stderr.strip()}")
    return done.stdout


def _bpf_programs(bpffs: str) -> str:
    """The programs behind the demo's table, found from its pins as `bpftool prog
    show id N` would list them."""
    from bpfilter.bpf import syscall as bpf
    from bpfilter.store import Store

    lines = []
    store = Store(bpffs)
    for key in store.keys():
        _, _, ruleset, slots = store.load(key)
        try:
            for hook, slot in slots.items():
                link = bpf.link_info(slot.link_fd)
                rules = bpf.prog_info(ruleset.hooks[hook].prog_fd)
                lines.append(f"  {key.family.name.lower()} {hook.chain_name:<8} netfilter link "
                             f"{link['id']} (hook "
                             f"{link['hooknum']}, priority {link['priority']}) -> dispatcher "
                             f"prog {link['prog_id']} -> prog {rules['id']} {rules['name']} "
                             f"({rules['xlated_prog_len'] // 8} insns, "
                             f"{rules['jited_prog_len']} bytes jited)")
        finally:
            for slot in slots.values():
                slot.close()
            ruleset.close()
    return "\n".join(lines)


def run(verbose: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="bpfilter-demo-") as private:
        socket_path, bpffs = os.path.join(private, "bpfilter.sock"), os.path.join(private, "bpffs")
        service = ServiceBackend(socket_path, bpffs)
        try:
            with Lab({"kernel": "kernel", "bpfilter": service}) as lab:
                return _show(lab, service, verbose)
        finally:
            flush(socket_path, bpffs)
            subprocess.run(["umount", bpffs], capture_output=True)


def _show(lab: Lab, service: ServiceBackend, verbose: bool) -> int:
    same = True
    for family, (command, ruleset, traffic) in FAMILIES.items():
        print(f"The ruleset, given to the unmodified {command}-restore in both namespaces:\n")
        print(ruleset)
        same &= _compare(lab, service, family, traffic)
        print()
    print("The BPF programs doing the filtering, attached with netfilter links:")
    print(_bpf_programs(service.bpffs))
    if verbose:
        print(subprocess.run([sys.executable, "-m", "bpfilter", "show", "--bpf",
                              "--bpffs", service.bpffs], capture_output=True, text=True).stdout)
    return 0 if same else 1


def _compare(lab: Lab, service: ServiceBackend, family: Family, traffic: list) -> bool:
    command = FAMILIES[family][0]
    lab.load(FAMILIES[family][1], family)
    arrived = lab.run([case for _, case in traffic])
    print(f"{'packet':<40}{'kernel ' + command.split('-')[0]:<22}bpfilter")
    for i, (what, _) in enumerate(traffic):
        k, b = arrived["kernel"][i], arrived["bpfilter"][i]
        flag = "" if k == b else "   <-- DIFFERENT"
        print(f"{what:<40}{_word(k):<22}{_word(b)}{flag}")
    ours = _listing(lab, "bpfilter", service, family)
    theirs = _listing(lab, "kernel", service, family)
    print(f"\n$ bpfilter exec -- {command} -L -v -n -x    (bpfilter's namespace)\n")
    print(ours)
    if ours != theirs:
        print(f"$ {command} -L -v -n -x    (the kernel's namespace: DIFFERENT)\n")
        print(theirs)
    same_verdicts = arrived["kernel"] == arrived["bpfilter"]
    same_counters = lab.counters("kernel", family) == lab.counters("bpfilter", family)
    print(f"{command}: verdicts identical to the kernel's: {same_verdicts} | "
          f"-L -v identical: {ours == theirs} | per-entry counters identical: {same_counters}")
    return same_verdicts and same_counters and ours == theirs
