"""Verdicts and counters of translated filter tables, feature by feature.

Each case is an iptables-restore ruleset, packets sent at a hook with the verdict
the kernel's ipt_do_table() gives them, and the counters of the entries that count
afterwards (every other entry must stay at zero). The blob is the one
iptables-legacy-restore really produces; the programs run with BPF_PROG_TEST_RUN,
where the kernel sets state->in = NULL and state->out = "lo" at every hook, so
interface tests use -o only.

The expectations are iptables semantics written down by hand. test_kernel_agrees
replays every case whose packets all go through OUTPUT against the kernel's own
legacy iptables (raw IP_HDRINCL socket in a netns routing everything out of lo), to
prove the expectations themselves.

Packet sizes (bpfilter.lab.Packet, 16 payload bytes unless said): tcp 56, udp 44, icmp 44,
non-first fragment 36, raw protocol 36.
"""
from __future__ import annotations

import re
import socket
import subprocess
import uuid
from dataclasses import dataclass, field

import pytest

from bpfilter.abi import codec, sockopt
from bpfilter.loader import load_filter_table
from bpfilter.model import Hook
from bpfilter.netns import entered
from bpfilter.scratch import replace_blob
from bpfilter.compiler import classifier, multifield
from bpfilter.lab import Packet

pytestmark = pytest.mark.kernel

IN, FWD, OUT = Hook.LOCAL_IN, Hook.FORWARD, Hook.LOCAL_OUT
DROP, ACCEPT = 0, 1
BUILTIN = ("INPUT", "FORWARD", "OUTPUT")

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

A, B = "10.1.2.3", "192.168.7.8"   # default source and destination


def tcp(dport=80, sport=40000, flags=SYN, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "tcp", sport=sport, dport=dport, tcp_flags=flags, **kw)


def udp(dport=53, sport=40000, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "udp", sport=sport, dport=dport, **kw)


def icmp(type_=8, code=0, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "icmp", icmp_type=type_, icmp_code=code, **kw)


def raw(proto: int, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, proto, **kw)


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    name: str
    rules: str                      # chain declarations (":X -", ":INPUT DROP") and -A lines
    steps: list                     # (hook, packet, expected verdict)
    counters: dict = field(default_factory=dict)   # "CHAIN n" | "CHAIN policy" | "X return"


def case(name, rules, steps, counters):
    if isinstance(steps, tuple):
        steps = [steps]
    return pytest.param(Case(name, rules, steps, counters), id=name)


# three user chains, each jumping to the next: OUTPUT -> A -> B -> C
NESTED = """
:A -
:B -
:C -
-A OUTPUT -j A
-A OUTPUT -j DROP
-A A -j B
-A A -p udp -j ACCEPT
-A B -j C
-A B -p tcp --dport 22 -j ACCEPT
-A C -s 10.0.0.0/8 -j DROP
"""

CASES = [
    # -- addresses ------------------------------------------------------------------
    case("src /8 matches", "-A OUTPUT -s 10.0.0.0/8 -j DROP",
         (OUT, udp(src="10.200.0.1"), DROP), {"OUTPUT 1": (1, 44)}),
    case("src /8 misses", "-A OUTPUT -s 10.0.0.0/8 -j DROP",
         (OUT, udp(src="11.0.0.1"), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("src /0 matches anything", "-A OUTPUT -s 0.0.0.0/0 -j DROP",
         (OUT, udp(src="203.0.113.9"), DROP), {"OUTPUT 1": (1, 44)}),
    case("dst /32", "-A OUTPUT -d 192.168.7.8/32 -j DROP",
         [(OUT, udp(dst="192.168.7.8"), DROP), (OUT, udp(dst="192.168.7.9"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("dst /27 edges", "-A OUTPUT -d 192.168.7.64/27 -j DROP",
         [(OUT, udp(dst="192.168.7.64"), DROP), (OUT, udp(dst="192.168.7.95"), DROP),
          (OUT, udp(dst="192.168.7.63"), ACCEPT), (OUT, udp(dst="192.168.7.96"), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (2, 88)}),
    case("src /27 given with host bits", "-A OUTPUT -s 10.1.2.99/27 -j DROP",
         [(OUT, udp(src="10.1.2.96"), DROP), (OUT, udp(src="10.1.2.128"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("! src /8", "-A OUTPUT ! -s 10.0.0.0/8 -j DROP",
         [(OUT, udp(src="11.0.0.1"), DROP), (OUT, udp(src="10.0.0.1"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("! src /0 never matches", "-A OUTPUT ! -s 0.0.0.0/0 -j DROP",
         (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("! dst /27", "-A OUTPUT ! -d 192.168.7.64/27 -j DROP",
         [(OUT, udp(dst="192.168.7.70"), ACCEPT), (OUT, udp(dst="192.168.7.100"), DROP)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("non-contiguous dotted mask", "-A OUTPUT -s 10.0.0.1/255.0.0.255 -j DROP",
         [(OUT, udp(src="10.9.9.1"), DROP), (OUT, udp(src="10.9.9.2"), ACCEPT),
          (OUT, udp(src="11.9.9.1"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 88)}),
    case("src and dst both needed", "-A OUTPUT -s 10.0.0.0/8 -d 192.168.0.0/16 -j DROP",
         [(OUT, udp(src="10.0.0.1", dst="192.168.1.1"), DROP),
          (OUT, udp(src="10.0.0.1", dst="172.16.0.1"), ACCEPT),
          (OUT, udp(src="11.0.0.1", dst="192.168.1.1"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 88)}),

    # -- output interface (test runs see out = lo) -----------------------------------
    case("-o lo", "-A OUTPUT -o lo -j DROP", (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("-o l+", "-A OUTPUT -o l+ -j DROP", (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("-o lo+ (prefix equal to the name)", "-A OUTPUT -o lo+ -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("! -o lo", "-A OUTPUT ! -o lo -j DROP", (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("-o eth0", "-A OUTPUT -o eth0 -j DROP", (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("-o lo0 (longer name)", "-A OUTPUT -o lo0 -j DROP",
         (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("! -o eth+", "-A OUTPUT ! -o eth+ -j DROP", (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("-o lo at FORWARD", "-A FORWARD -o lo -j DROP", (FWD, udp(), DROP),
         {"FORWARD 1": (1, 44)}),

    # -- protocol -------------------------------------------------------------------
    case("-p tcp", "-A OUTPUT -p tcp -j DROP",
         [(OUT, tcp(), DROP), (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 44)}),
    case("-p udp", "-A OUTPUT -p udp -j DROP",
         [(OUT, udp(), DROP), (OUT, icmp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("-p icmp", "-A OUTPUT -p icmp -j DROP",
         [(OUT, icmp(), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 56)}),
    case("-p all", "-A OUTPUT -p all -j DROP",
         [(OUT, raw(47), DROP), (OUT, tcp(), DROP)], {"OUTPUT 1": (2, 92)}),
    case("-p 47", "-A OUTPUT -p 47 -j DROP",
         [(OUT, raw(47), DROP), (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (1, 36), "OUTPUT policy": (1, 44)}),
    case("! -p tcp", "-A OUTPUT ! -p tcp -j DROP",
         [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT), (OUT, raw(47), DROP)],
         {"OUTPUT 1": (2, 80), "OUTPUT policy": (1, 56)}),

    # -- fragments ------------------------------------------------------------------
    case("-f: only non-first fragments", "-A OUTPUT -f -j DROP",
         [(OUT, udp(frag_offset=10), DROP),
          (OUT, udp(more_fragments=True), ACCEPT),
          (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (1, 36), "OUTPUT policy": (2, 88)}),
    case("! -f: unfragmented and first fragments", "-A OUTPUT ! -f -j DROP",
         [(OUT, udp(frag_offset=10), ACCEPT),
          (OUT, udp(more_fragments=True), DROP),
          (OUT, udp(), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (1, 36)}),
    case("-p tcp matches non-first fragments", "-A OUTPUT -p tcp -j DROP",
         (OUT, tcp(frag_offset=5), DROP), {"OUTPUT 1": (1, 36)}),
    case("port match never matches a non-first fragment (no hotdrop)",
         "-A OUTPUT -p udp --dport 53 -j DROP",
         (OUT, udp(frag_offset=5), ACCEPT), {"OUTPUT policy": (1, 36)}),
    case("tcp match hotdrops a fragment at offset 1 (8 bytes)",
         "-A OUTPUT -p tcp --dport 80 -j ACCEPT\n-A OUTPUT -j ACCEPT",
         [(OUT, tcp(frag_offset=1), DROP), (OUT, tcp(frag_offset=2), ACCEPT)],
         {"OUTPUT 2": (1, 36)}),
    case("udp and icmp matches do not hotdrop offset 1",
         "-A OUTPUT -p udp --dport 53 -j DROP\n-A OUTPUT -p icmp --icmp-type any -j DROP",
         [(OUT, udp(frag_offset=1), ACCEPT), (OUT, icmp(frag_offset=1), ACCEPT)],
         {"OUTPUT policy": (2, 72)}),

    # -- tcp ------------------------------------------------------------------------
    case("tcp --dport", "-A OUTPUT -p tcp --dport 80 -j DROP",
         [(OUT, tcp(dport=80), DROP), (OUT, tcp(dport=81), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("tcp --sport range edges", "-A OUTPUT -p tcp --sport 1000:2000 -j DROP",
         [(OUT, tcp(sport=1000), DROP), (OUT, tcp(sport=2000), DROP),
          (OUT, tcp(sport=999), ACCEPT), (OUT, tcp(sport=2001), ACCEPT)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (2, 112)}),
    case("tcp --dport :1023", "-A OUTPUT -p tcp --dport :1023 -j DROP",
         [(OUT, tcp(dport=0), DROP), (OUT, tcp(dport=1023), DROP),
          (OUT, tcp(dport=1024), ACCEPT)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (1, 56)}),
    case("tcp --dport 1024:", "-A OUTPUT -p tcp --dport 1024: -j DROP",
         [(OUT, tcp(dport=65535), DROP), (OUT, tcp(dport=1023), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("tcp ! --dport", "-A OUTPUT -p tcp ! --dport 80 -j DROP",
         [(OUT, tcp(dport=80), ACCEPT), (OUT, tcp(dport=81), DROP)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("tcp ! --sport range", "-A OUTPUT -p tcp ! --sport 1000:2000 -j DROP",
         [(OUT, tcp(sport=1500), ACCEPT), (OUT, tcp(sport=2001), DROP),
          (OUT, tcp(sport=999), DROP), (OUT, tcp(sport=1000), ACCEPT)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (2, 112)}),
    case("tcp --tcp-flags SYN,ACK SYN", "-A OUTPUT -p tcp --tcp-flags SYN,ACK SYN -j DROP",
         [(OUT, tcp(flags=SYN), DROP), (OUT, tcp(flags=SYN | PSH), DROP),
          (OUT, tcp(flags=SYN | ACK), ACCEPT), (OUT, tcp(flags=ACK), ACCEPT)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (2, 112)}),
    case("tcp ! --tcp-flags", "-A OUTPUT -p tcp ! --tcp-flags SYN,ACK SYN -j DROP",
         [(OUT, tcp(flags=SYN), ACCEPT), (OUT, tcp(flags=SYN | ACK), DROP)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("tcp --tcp-flags ALL NONE", "-A OUTPUT -p tcp --tcp-flags ALL NONE -j DROP",
         [(OUT, tcp(flags=0), DROP), (OUT, tcp(flags=FIN), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("tcp --tcp-flags ALL FIN,PSH,URG", "-A OUTPUT -p tcp --tcp-flags ALL FIN,PSH,URG -j DROP",
         [(OUT, tcp(flags=FIN | PSH | URG), DROP), (OUT, tcp(flags=FIN | PSH | URG | ACK), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("tcp --syn", "-A OUTPUT -p tcp --syn -j DROP",
         [(OUT, tcp(flags=SYN), DROP), (OUT, tcp(flags=SYN | PSH | URG), DROP),
          (OUT, tcp(flags=SYN | ACK), ACCEPT), (OUT, tcp(flags=SYN | RST), ACCEPT),
          (OUT, tcp(flags=SYN | FIN), ACCEPT)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (3, 168)}),
    case("tcp ! --syn", "-A OUTPUT -p tcp ! --syn -j DROP",
         [(OUT, tcp(flags=ACK), DROP), (OUT, tcp(flags=SYN), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("tcp ports and flags all needed",
         "-A OUTPUT -p tcp --sport 1024: --dport 22 --syn -j DROP",
         [(OUT, tcp(sport=5000, dport=22, flags=SYN), DROP),
          (OUT, tcp(sport=5000, dport=22, flags=ACK), ACCEPT),
          (OUT, tcp(sport=80, dport=22, flags=SYN), ACCEPT),
          (OUT, tcp(sport=5000, dport=23, flags=SYN), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (3, 168)}),
    case("tcp header after IP options (ihl > 5)", "-A OUTPUT -p tcp --dport 80 -j DROP",
         [(OUT, tcp(dport=80, options=b"\x01\x01\x01\x01"), DROP),
          (OUT, tcp(dport=80, options=b"\x01" * 8), DROP),
          (OUT, tcp(dport=257, options=b"\x01\x01\x01\x01"), ACCEPT)],
         {"OUTPUT 1": (2, 60 + 64), "OUTPUT policy": (1, 60)}),

    # -- udp ------------------------------------------------------------------------
    case("udp --dport", "-A OUTPUT -p udp --dport 53 -j DROP",
         [(OUT, udp(dport=53), DROP), (OUT, udp(dport=54), ACCEPT),
          (OUT, tcp(dport=53), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 100)}),
    case("udp --sport 1024:65535", "-A OUTPUT -p udp --sport 1024:65535 -j DROP",
         [(OUT, udp(sport=1023), ACCEPT), (OUT, udp(sport=1024), DROP),
          (OUT, udp(sport=65535), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (1, 44)}),
    case("udp ! --dport", "-A OUTPUT -p udp ! --dport 53 -j DROP",
         [(OUT, udp(dport=53), ACCEPT), (OUT, udp(dport=5353), DROP)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("udp ports after IP options", "-A OUTPUT -p udp --dport 53 -j DROP",
         [(OUT, udp(dport=53, options=b"\x01" * 12), DROP),
          (OUT, udp(dport=54, options=b"\x01" * 12), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),
    case("udp header exactly 8 bytes is enough", "-A OUTPUT -p udp --dport 53 -j DROP",
         (OUT, udp(dport=53, payload_len=0), DROP), {"OUTPUT 1": (1, 28)}),

    # -- icmp -----------------------------------------------------------------------
    case("icmp --icmp-type any", "-A OUTPUT -p icmp --icmp-type any -j DROP",
         [(OUT, icmp(13, 0), DROP), (OUT, icmp(255, 255), DROP)], {"OUTPUT 1": (2, 88)}),
    case("icmp echo-request: every code of type 8",
         "-A OUTPUT -p icmp --icmp-type echo-request -j DROP",
         [(OUT, icmp(8, 0), DROP), (OUT, icmp(8, 5), DROP), (OUT, icmp(0, 0), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (1, 44)}),
    case("icmp 3/1 only code 1", "-A OUTPUT -p icmp --icmp-type 3/1 -j DROP",
         [(OUT, icmp(3, 1), DROP), (OUT, icmp(3, 0), ACCEPT), (OUT, icmp(3, 2), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 88)}),
    case("icmp host-unreachable is 3/1", "-A OUTPUT -p icmp --icmp-type host-unreachable -j DROP",
         [(OUT, icmp(3, 1), DROP), (OUT, icmp(3, 3), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("icmp numeric type: codes 0-255", "-A OUTPUT -p icmp --icmp-type 11 -j DROP",
         [(OUT, icmp(11, 0), DROP), (OUT, icmp(11, 255), DROP), (OUT, icmp(12, 0), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (1, 44)}),
    case("icmp ! --icmp-type", "-A OUTPUT -p icmp ! --icmp-type echo-request -j DROP",
         [(OUT, icmp(8, 0), ACCEPT), (OUT, icmp(0, 0), DROP), (OUT, icmp(9, 8), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (1, 44)}),
    case("icmp ! any never matches", "-A OUTPUT -p icmp ! --icmp-type any -j DROP",
         (OUT, icmp(8, 0), ACCEPT), {"OUTPUT policy": (1, 44)}),

    # -- truncated transport headers: the kernel's hotdrop ----------------------------
    case("truncated tcp hotdrops: DROP, rule not counted, policy not reached",
         "-A OUTPUT -p tcp --dport 80 -j ACCEPT",
         (OUT, tcp(truncate_l4=10), DROP), {}),
    case("hotdrop after counted rules",
         "-A OUTPUT -p tcp\n-A OUTPUT -p tcp --dport 80 -j ACCEPT\n-A OUTPUT -j ACCEPT",
         (OUT, tcp(truncate_l4=19), DROP), {"OUTPUT 1": (1, 39)}),
    case("truncation is measured after the IP options",
         "-A OUTPUT -p tcp --dport 80 -j ACCEPT",
         (OUT, tcp(options=b"\x01\x01\x01\x01", truncate_l4=16), DROP), {}),
    case("tcp needs 20 bytes: 8 is not enough", "-A OUTPUT -p tcp --sport 40000 -j ACCEPT",
         (OUT, tcp(truncate_l4=8), DROP), {}),
    case("no hotdrop when the ip part does not match",
         "-A OUTPUT -s 11.0.0.0/8 -p tcp --dport 80 -j DROP",
         (OUT, tcp(truncate_l4=10), ACCEPT), {"OUTPUT policy": (1, 30)}),
    case("no hotdrop when the protocol does not match",
         "-A OUTPUT -p udp --dport 53 -j DROP",
         (OUT, tcp(truncate_l4=4), ACCEPT), {"OUTPUT policy": (1, 24)}),
    case("-p tcp without a match counts a truncated packet",
         "-A OUTPUT -p tcp\n-A OUTPUT -j ACCEPT",
         (OUT, tcp(truncate_l4=4), ACCEPT), {"OUTPUT 1": (1, 24), "OUTPUT 2": (1, 24)}),
    case("truncated udp hotdrops", "-A OUTPUT -p udp ! --dport 53 -j ACCEPT",
         (OUT, udp(truncate_l4=7), DROP), {}),
    case("truncated icmp hotdrops even for type any",
         "-A OUTPUT -p icmp --icmp-type any -j ACCEPT",
         (OUT, icmp(truncate_l4=4), DROP), {}),
    case("hotdrop inside a user chain",
         ":X -\n-A OUTPUT -j X\n-A X -p udp --dport 53 -j ACCEPT",
         (OUT, udp(truncate_l4=4), DROP), {"OUTPUT 1": (1, 24)}),

    # -- chains ---------------------------------------------------------------------
    case("rules without target only count",
         "-A OUTPUT -p udp\n-A OUTPUT -d 192.168.0.0/16\n-A OUTPUT -p tcp\n-A OUTPUT -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44), "OUTPUT 2": (1, 44), "OUTPUT 4": (1, 44)}),
    case("policy DROP", ":OUTPUT DROP", (OUT, udp(), DROP), {"OUTPUT policy": (1, 44)}),
    case("policy ACCEPT", "", (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("-j X, X accepts",
         ":X -\n-A OUTPUT -j X\n-A OUTPUT -j DROP\n-A X -p udp -j ACCEPT",
         (OUT, udp(), ACCEPT), {"OUTPUT 1": (1, 44), "X 1": (1, 44)}),
    case("-j X, X runs off its end: its RETURN counts, next rule runs",
         ":X -\n-A OUTPUT -j X\n-A OUTPUT -j DROP\n-A X -p udp -j ACCEPT",
         (OUT, tcp(), DROP), {"OUTPUT 1": (1, 56), "X return": (1, 56), "OUTPUT 2": (1, 56)}),
    case("RETURN in a user chain continues after the jump",
         ":OUTPUT DROP\n:X -\n-A OUTPUT -j X\n-A OUTPUT -p tcp -j ACCEPT\n"
         "-A X -p tcp -j RETURN\n-A X -j DROP",
         [(OUT, tcp(), ACCEPT), (OUT, udp(), DROP)],
         {"OUTPUT 1": (2, 100), "X 1": (1, 56), "OUTPUT 2": (1, 56), "X 2": (1, 44)}),
    case("RETURN in a built-in chain goes to the policy, which counts",
         ":OUTPUT DROP\n-A OUTPUT -p udp -j RETURN\n-A OUTPUT -j ACCEPT",
         [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44), "OUTPUT 2": (1, 56)}),
    case("-g X from a built-in chain: X's return goes to the policy",
         ":OUTPUT DROP\n:X -\n-A OUTPUT -g X\n-A OUTPUT -j ACCEPT\n-A X -p udp -j ACCEPT",
         [(OUT, tcp(), DROP), (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (2, 100), "X return": (1, 56), "OUTPUT policy": (1, 56), "X 1": (1, 44)}),
    case("-g B from A: B's return skips the rest of A",
         ":A -\n:B -\n-A OUTPUT -j A\n-A OUTPUT -j DROP\n"
         "-A A -g B\n-A A -j ACCEPT\n-A B -p udp -j ACCEPT",
         [(OUT, tcp(), DROP), (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (2, 100), "A 1": (2, 100), "B return": (1, 56), "OUTPUT 2": (1, 56),
          "B 1": (1, 44)}),
    case("RETURN rule in a goto'd chain also skips the rest of the caller",
         ":A -\n:B -\n-A OUTPUT -j A\n-A OUTPUT -j DROP\n"
         "-A A -g B\n-A A -j ACCEPT\n-A B -p tcp -j RETURN\n-A B -j ACCEPT",
         (OUT, tcp(), DROP),
         {"OUTPUT 1": (1, 56), "A 1": (1, 56), "B 1": (1, 56), "OUTPUT 2": (1, 56)}),
    case("-j from a goto'd chain returns into it",
         ":A -\n:B -\n:C -\n-A OUTPUT -g A\n-A A -g B\n-A B -j C\n-A B -p udp -j DROP\n-A C -p udp",
         [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (2, 100), "A 1": (2, 100), "B 1": (2, 100), "C 1": (1, 44),
          "C return": (2, 100), "B 2": (1, 44), "B return": (1, 56), "OUTPUT policy": (1, 56)}),
    case("nested 3 deep: verdict from the deepest chain",
         NESTED,
         (OUT, tcp(src="10.0.0.1"), DROP),
         {"OUTPUT 1": (1, 56), "A 1": (1, 56), "B 1": (1, 56), "C 1": (1, 56)}),
    case("nested 3 deep: verdict from the middle chain", NESTED,
         (OUT, tcp(src="11.0.0.1", dport=22), ACCEPT),
         {"OUTPUT 1": (1, 56), "A 1": (1, 56), "B 1": (1, 56), "C return": (1, 56),
          "B 2": (1, 56)}),
    case("nested 3 deep: verdict from the first chain", NESTED,
         (OUT, udp(src="11.0.0.1"), ACCEPT),
         {"OUTPUT 1": (1, 44), "A 1": (1, 44), "B 1": (1, 44), "C return": (1, 44),
          "B return": (1, 44), "A 2": (1, 44)}),
    case("nested 3 deep: every chain returns", NESTED,
         (OUT, tcp(src="11.0.0.1", dport=80), DROP),
         {"OUTPUT 1": (1, 56), "A 1": (1, 56), "B 1": (1, 56), "C return": (1, 56),
          "B return": (1, 56), "A return": (1, 56), "OUTPUT 2": (1, 56)}),
    case("7 user chains deep (the most BPF call frames allow)",
         "\n".join([f":C{i} -" for i in range(1, 8)] + ["-A OUTPUT -j C1"]
                   + [f"-A C{i} -j C{i + 1}" for i in range(1, 7)] + ["-A C7 -p udp -j DROP"]),
         [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (2, 100), **{f"C{i} 1": (2, 100) for i in range(1, 8)},
          "C7 1": (1, 44), "C7 return": (1, 56),
          **{f"C{i} return": (1, 56) for i in range(1, 7)}, "OUTPUT policy": (1, 56)}),
    case("the same chain jumped to twice in one hook",
         ":X -\n-A OUTPUT -j X\n-A OUTPUT -j X\n-A X -p udp",
         (OUT, udp(), ACCEPT),
         {"OUTPUT 1": (1, 44), "OUTPUT 2": (1, 44), "X 1": (2, 88), "X return": (2, 88),
          "OUTPUT policy": (1, 44)}),
    case("an empty user chain", ":E -\n-A OUTPUT -j E\n-A OUTPUT -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44), "E return": (1, 44), "OUTPUT 2": (1, 44)}),
    case("a big packet counts all its bytes", "-A OUTPUT -p udp",
         (OUT, udp(payload_len=1000), ACCEPT), {"OUTPUT 1": (1, 1028), "OUTPUT policy": (1, 1028)}),

    # -- other hooks ------------------------------------------------------------------
    case("INPUT", ":INPUT DROP\n-A INPUT -p tcp --dport 22 -j ACCEPT\n-A OUTPUT -j DROP",
         [(IN, tcp(dport=22), ACCEPT), (IN, tcp(dport=23), DROP)],
         {"INPUT 1": (1, 56), "INPUT policy": (1, 56)}),
    case("FORWARD", ":FORWARD DROP\n-A FORWARD -d 192.168.0.0/16 -j ACCEPT\n-A INPUT -j DROP",
         [(FWD, udp(dst="192.168.1.1"), ACCEPT), (FWD, udp(dst="172.16.1.1"), DROP)],
         {"FORWARD 1": (1, 44), "FORWARD policy": (1, 44)}),
    case("a chain used from two hooks",
         ":X -\n-A INPUT -j X\n-A OUTPUT -j X\n-A X -p udp -j DROP",
         [(IN, udp(), DROP), (OUT, tcp(), ACCEPT), (OUT, udp(), DROP)],
         {"INPUT 1": (1, 44), "OUTPUT 1": (2, 100), "X 1": (2, 88), "X return": (1, 56),
          "OUTPUT policy": (1, 56)}),
    case("each hook runs only its own chain",
         ":INPUT DROP\n:FORWARD DROP\n-A OUTPUT -p udp -j DROP",
         [(IN, udp(), DROP), (FWD, udp(), DROP), (OUT, tcp(), ACCEPT)],
         {"INPUT policy": (1, 44), "FORWARD policy": (1, 44), "OUTPUT policy": (1, 56)}),
]


# ---------------------------------------------------------------- helpers

def ruleset(rules: str) -> str:
    """The iptables-restore text: built-in chains ACCEPT unless declared."""
    lines = [line.strip() for line in rules.splitlines() if line.strip()]
    decls = {m.group(1): m.group(2) for line in lines
             if (m := re.fullmatch(r":(\S+)\s+(\S+)", line))}
    head = [f":{c} {decls.get(c, 'ACCEPT')} [0:0]" for c in BUILTIN]
    head += [f":{c} {p} [0:0]" for c, p in decls.items() if c not in BUILTIN]
    body = [line for line in lines if not line.startswith(":")]
    return "\n".join(["*filter", *head, *body, "COMMIT", ""])


def entry_index(rules: str) -> dict[str, int]:
    """Entry index of every rule, policy and user-chain RETURN, as libiptc lays them out:
    INPUT, FORWARD, OUTPUT (rules, then policy), then user chains sorted by name (ERROR
    head, rules, RETURN), then the final ERROR entry."""
    text = ruleset(rules)
    user = sorted({m.group(1) for m in re.finditer(r"^:(\S+) - ", text, re.M)})
    rules_of = {c: len(re.findall(rf"^-A {re.escape(c)} ", text, re.M)) for c in [*BUILTIN, *user]}
    index, n = {}, 0
    for chain in BUILTIN:
        for pos in range(1, rules_of[chain] + 1):
            index[f"{chain} {pos}"] = n
            n += 1
        index[f"{chain} policy"] = n
        n += 1
    for chain in user:
        n += 1                                  # ERROR head naming the chain
        for pos in range(1, rules_of[chain] + 1):
            index[f"{chain} {pos}"] = n
            n += 1
        index[f"{chain} return"] = n
        n += 1
    index["<end>"] = n                          # the final ERROR entry
    return index


def expected_counters(c: Case) -> list[tuple[int, int]]:
    index = entry_index(c.rules)
    unknown = set(c.counters) - set(index)
    assert not unknown, f"case {c.name!r} names entries that do not exist: {unknown}"
    counters = [(0, 0)] * (index["<end>"] + 1)
    for key, value in c.counters.items():
        counters[index[key]] = value
    return counters


def named(c: Case, counters) -> dict[str, tuple[int, int]]:
    """Counters keyed like the cases, non-zero ones only, for readable failures."""
    names = {i: k for k, i in entry_index(c.rules).items()}
    return {names.get(i, f"entry {i}"): tuple(v) for i, v in enumerate(counters) if any(v)}


_blobs: dict[str, bytes] = {}


def blob_of(rules: str) -> bytes:
    text = ruleset(rules)
    if text not in _blobs:
        _blobs[text] = replace_blob(text)
    return _blobs[text]


def verdict_name(v: int) -> str:
    return {DROP: "DROP", ACCEPT: "ACCEPT"}.get(v, str(v))


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("how", ["walked", "classified", "multifield"])
@pytest.mark.parametrize("c", CASES)
def test_verdicts_and_counters(c: Case, how: str, monkeypatch):
    """Each case three times: walked rule by rule, with every rule the tuple space can
    take classified (runs from one rule on), and with every such rule in multifield's
    merged tuples instead; neither must change a thing."""
    if how != "walked":
        monkeypatch.setattr(classifier, "MIN_RUN", 1)
        monkeypatch.setattr(classifier, "RULES_PER_TUPLE", 0)
    if how == "multifield":
        monkeypatch.setattr(classifier, "MAX_TUPLES", 0)
        monkeypatch.setattr(multifield, "RULES_PER_LOOKUP", 0)
    table = load_filter_table(blob_of(c.rules), attach=False)
    try:
        got = [verdict_name(table.test_run(hook, p.build(1, 0))) for hook, p, _ in c.steps]
        counters = table.counters()
    finally:
        table.close()
    assert got == [verdict_name(v) for _, _, v in c.steps]
    assert named(c, counters) == named(c, expected_counters(c))
    assert counters == expected_counters(c)


def test_entry_layout_helper_agrees_with_the_blob():
    """The helper's entry numbering is the decoder's (chain tails and rule entries)."""
    from bpfilter.abi.decode import table_from_raw
    rules = NESTED + "\n:INPUT DROP\n-A INPUT -p tcp\n-A FORWARD -j A"
    table = table_from_raw(codec.parse_replace(blob_of(rules)))
    index = entry_index(rules)
    assert table.num_entries == index["<end>"] + 1
    for chain in table.chains.values():
        tail = "policy" if chain.builtin else "return"
        assert index[f"{chain.name} {tail}"] == chain.tail_entry
        assert [index[f"{chain.name} {p}"] for p in range(1, len(chain.rules) + 1)] == \
            [r.entry for r in chain.rules]


@pytest.mark.parametrize("classified", [False, True], ids=["walked", "classified"])
def test_a_table_too_long_for_16_bit_jumps(classified, monkeypatch):
    """3000 rules. Walked, the prologue's and every rule's jumps past the end need
    gotol; classified (a blocklist is one run), the program is small. The verdicts of
    the first and last rules and of the policy, and the counters, prove both right."""
    if not classified:
        monkeypatch.setattr(classifier, "MIN_RUN", 10**9)
    n = 3000
    hosts = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(n)]
    rules = "\n".join(f"-A OUTPUT -s {h}/32 -j DROP" for h in hosts)
    table = load_filter_table(blob_of(rules), attach=False)
    try:
        assert (table.hooks[OUT].insn_count < 1000) if classified else \
            (table.hooks[OUT].insn_count > 32767)
        got = [table.test_run(OUT, udp(src=hosts[-1]).build(1, 0)),
               table.test_run(OUT, udp(src=hosts[0]).build(1, 0)),
               table.test_run(OUT, udp(src="11.0.0.1").build(1, 0))]
        counters = table.counters()
    finally:
        table.close()
    assert got == [DROP, DROP, ACCEPT]
    index = entry_index(rules)
    assert named(Case("big", rules, []), counters) == {
        "OUTPUT 1": (1, 44), f"OUTPUT {n}": (1, 44), "OUTPUT policy": (1, 44)}
    assert index["OUTPUT policy"] == 2 + n


# ---------------------------------------------------------------- against the kernel

OUTPUT_ONLY = [p for p in CASES if all(hook == OUT for hook, _, _ in p.values[0].steps)]


@pytest.fixture(scope="module")
def kernel_netns():
    """A netns whose legacy iptables sees our packets at OUTPUT with out = lo, like
    the test runs: everything routes out of lo. What lo loops back is dropped in
    raw PREROUTING so that it never reaches the filter table's INPUT."""
    name = f"bpfl-verdicts-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["ip", "link", "set", "lo", "up"],
                     ["ip", "route", "add", "default", "dev", "lo"],
                     ["iptables-legacy", "-t", "raw", "-A", "PREROUTING", "-j", "DROP"]):
            subprocess.run(["ip", "netns", "exec", name, *argv], check=True,
                           capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def kernel_run(netns: str, c: Case) -> tuple[list[str], list[tuple[int, int]]]:
    done = subprocess.run(["ip", "netns", "exec", netns, "iptables-legacy-restore"],
                          input=ruleset(c.rules), text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    verdicts = []
    with entered(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            for _, p, _ in c.steps:
                try:
                    s.sendto(p.build(1, 0), (p.dst, 0))
                    verdicts.append("ACCEPT")
                except PermissionError:       # NF_DROP at LOCAL_OUT is EPERM
                    verdicts.append("DROP")
        finally:
            s.close()
        size = codec.parse_getinfo(sockopt.get_info("filter"))["size"]
        entries = codec.parse_get_entries(sockopt.get_entries("filter", size))["entries"]
    counters, off = [], 0
    while off < len(entries):
        counters.append((int.from_bytes(entries[off + 96:off + 104], "little"),
                         int.from_bytes(entries[off + 104:off + 112], "little")))
        off += int.from_bytes(entries[off + 90:off + 92], "little")
    return verdicts, counters


def test_most_cases_are_checked_against_the_kernel():
    assert len(OUTPUT_ONLY) >= 0.8 * len(CASES)


@pytest.mark.parametrize("c", OUTPUT_ONLY)
def test_kernel_agrees(kernel_netns, c: Case):
    verdicts, counters = kernel_run(kernel_netns, c)
    assert verdicts == [verdict_name(v) for _, _, v in c.steps]
    assert named(c, counters) == named(c, expected_counters(c))
    assert counters == expected_counters(c)


def test_thousands_of_rules_with_many_conditions_pass_the_verifier():
    """2,500 rules that the classifier does not take (ranges on two ports, inverted
    tests): each rule leaves one pending branch, not one per condition, so the
    verifier's 8,192 pending branches are not exhausted (they were at ~1,500 rules)."""
    n = 2500
    rules = "\n".join(
        f"-A OUTPUT -s 10.{i % 250}.{i // 250}.0/24 ! -d 10.255.0.1 -p udp "
        f"--sport {1000 + i}:{2000 + i} ! --dport 7:9 -j DROP" for i in range(n))
    table = load_filter_table(blob_of(rules), attach=False)
    try:
        last = f"10.{(n - 1) % 250}.{(n - 1) // 250}.7"
        got = [table.test_run(OUT, udp(src="10.0.0.9", sport=1000, dport=53).build(1, 0)),
               table.test_run(OUT, udp(src=last, sport=2000 + n - 1, dport=53).build(1, 0)),
               table.test_run(OUT, udp(src=last, sport=2000 + n - 1, dport=8).build(1, 0))]
        counters = table.counters()
    finally:
        table.close()
    assert got == [DROP, DROP, ACCEPT]
    assert named(Case("many", rules, []), counters) == {
        "OUTPUT 1": (1, 44), f"OUTPUT {n}": (1, 44), "OUTPUT policy": (1, 44)}
