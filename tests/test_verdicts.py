"""Verdicts and counters of translated IPv4 filter tables, feature by feature (the
machinery, and what a case is: verdicts.py).

The expectations are iptables semantics written down by hand; test_kernel_agrees
replays every case whose packets all go through OUTPUT against the kernel's own
legacy iptables, to prove the expectations themselves.

Packet sizes (bpfilter_lab.packets.Packet, 16 payload bytes unless said): tcp 56, udp 44, icmp 44,
non-first fragment 36, raw protocol 36.
"""
from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from bpfilter.abi import codec
from bpfilter.decode import table_from_raw
from bpfilter.loader import load_filter_table
from bpfilter.compiler import classifier
from bpfilter_lab.packets import Packet
from verdicts import (ACCEPT, DROP, FWD, IN, OUT, TEMPLATED, Case, blob_of, case, entry_index,
                      kernel_agrees, listing_agrees, named, output_only, payload_agrees,
                      run_case, templated_case)

pytestmark = pytest.mark.kernel


FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

A, B = "10.1.2.3", "192.168.7.8"   # default source and destination
MSS = b"\x02\x04\x05\xb4"              # tcp option 2 (maximum segment size), 4 bytes


def tcp(dport=80, sport=40000, flags=SYN, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "tcp", sport=sport, dport=dport, tcp_flags=flags, **kw)


def udp(dport=53, sport=40000, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "udp", sport=sport, dport=dport, **kw)


def icmp(type_=8, code=0, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "icmp", icmp_type=type_, icmp_code=code, **kw)


def raw(proto: int, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, proto, **kw)


# ---------------------------------------------------------------- the cases

# a run of jumps in three tuples (-d/32 with a port, -d/24, a port alone); C1 and C2
# return for port 53
JUMP_RUN = """
:OUTPUT DROP
:C1 -
:C2 -
-A OUTPUT -d 10.0.0.1 -p udp --dport 53 -j C1
-A OUTPUT -d 10.0.0.2 -p udp --dport 54 -j C2
-A OUTPUT -d 10.0.0.0/24 -j C2
-A OUTPUT -p udp --dport 53 -j ACCEPT
-A C1 -s 1.1.1.1 -j DROP
-A C2 -p udp --dport 54 -j DROP
"""

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

    # -- tcp --tcp-option (tcp_find_option's walk) ----------------------------------------
    case("--tcp-option 2 finds MSS", "-A OUTPUT -p tcp --tcp-option 2 -j DROP",
         [(OUT, tcp(tcp_options=MSS), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (1, 60), "OUTPUT policy": (1, 56)}),
    case("an option's length byte is not a kind", "-A OUTPUT -p tcp --tcp-option 4 -j DROP",
         (OUT, tcp(tcp_options=MSS), ACCEPT), {"OUTPUT policy": (1, 60)}),
    case("NOP and EOL are one byte, and EOL does not end the walk",
         "-A OUTPUT -p tcp --tcp-option 8 -j DROP",
         [(OUT, tcp(tcp_options=b"\x01\x00\x08\x0a" + bytes(8)), DROP),
          (OUT, tcp(tcp_options=b"\x00\x00\x00\x08"), DROP)],
         {"OUTPUT 1": (2, 128)}),
    case("a length of 0 steps one byte", "-A OUTPUT -p tcp --tcp-option 6 -j DROP",
         (OUT, tcp(tcp_options=b"\x05\x00\x06\x02"), DROP), {"OUTPUT 1": (1, 60)}),
    case("a length of 1 steps onto the length byte", "-A OUTPUT -p tcp --tcp-option 1 -j DROP",
         (OUT, tcp(tcp_options=b"\x09\x01\x03\x02"), DROP), {"OUTPUT 1": (1, 60)}),
    case("a length past the options ends the walk", "-A OUTPUT -p tcp --tcp-option 8 -j DROP",
         (OUT, tcp(tcp_options=b"\x03\x10\x08\x02"), ACCEPT), {"OUTPUT policy": (1, 60)}),
    case("an option in the 40th byte", "-A OUTPUT -p tcp --tcp-option 200 -j DROP",
         [(OUT, tcp(tcp_options=b"\x01" * 39 + b"\xc8"), DROP),
          (OUT, tcp(tcp_options=b"\x01" * 38 + b"\xc8\x01"), DROP),
          (OUT, tcp(tcp_options=b"\x02\x28" + b"\xc8" * 38), ACCEPT)],
         {"OUTPUT 1": (2, 192), "OUTPUT policy": (1, 96)}),
    case("option 255", "-A OUTPUT -p tcp --tcp-option 255 -j DROP",
         [(OUT, tcp(tcp_options=b"\x01\xff\x00\x00"), DROP),
          (OUT, tcp(tcp_options=b"\x01\xfe\x00\x00"), ACCEPT)],
         {"OUTPUT 1": (1, 60), "OUTPUT policy": (1, 60)}),
    case("! --tcp-option", "-A OUTPUT -p tcp ! --tcp-option 2 -j DROP",
         [(OUT, tcp(tcp_options=MSS), ACCEPT), (OUT, tcp(), DROP),
          (OUT, tcp(tcp_options=b"\x03\x03\x02\x00"), DROP)],
         {"OUTPUT 1": (2, 116), "OUTPUT policy": (1, 60)}),
    case("a data offset under 5 words hotdrops, inverted or not",
         "-A OUTPUT -p tcp ! --tcp-option 2 -j ACCEPT\n-A OUTPUT -j ACCEPT",
         [(OUT, tcp(tcp_doff=4), DROP), (OUT, tcp(tcp_doff=0), DROP)], {}),
    case("options cut short by the packet's end hotdrop",
         "-A OUTPUT -p tcp --tcp-option 2 -j ACCEPT",
         [(OUT, tcp(tcp_doff=15, payload_len=39), DROP),
          (OUT, tcp(tcp_doff=15, payload_len=40), ACCEPT)],
         {"OUTPUT policy": (1, 80)}),
    case("no hotdrop when the ports already failed",
         "-A OUTPUT -p tcp --dport 81 --tcp-option 2 -j ACCEPT",
         (OUT, tcp(dport=80, tcp_doff=4), ACCEPT), {"OUTPUT policy": (1, 56)}),
    case("ports, flags and option all needed",
         "-A OUTPUT -p tcp --dport 80 --syn --tcp-option 2 -j DROP",
         [(OUT, tcp(tcp_options=MSS), DROP), (OUT, tcp(tcp_options=MSS, flags=ACK), ACCEPT),
          (OUT, tcp(dport=81, tcp_options=MSS), ACCEPT), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (1, 60), "OUTPUT policy": (3, 176)}),

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

    # -- mark (test runs and the kernel's raw socket send with mark 0) -----------------
    case("--mark 0 matches an unmarked packet", "-A OUTPUT -m mark --mark 0 -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("--mark 1 misses it", "-A OUTPUT -m mark --mark 1 -j DROP",
         (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("! --mark 0xffffffff", "-A OUTPUT -m mark ! --mark 0xffffffff -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("--mark 0/0xff0", "-A OUTPUT -m mark --mark 0x0/0xff0 -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("--mark with bits outside its mask never matches",
         "-A OUTPUT -m mark --mark 0x100/0xff -j DROP\n-A OUTPUT -m mark ! --mark 0x100/0xff",
         (OUT, udp(), ACCEPT), {"OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),

    # -- pkttype (locally sent packets are PACKET_HOST) ---------------------------------
    case("--pkt-type unicast", "-A OUTPUT -m pkttype --pkt-type unicast -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("--pkt-type broadcast misses a unicast packet",
         "-A OUTPUT -m pkttype --pkt-type broadcast -j DROP",
         (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 44)}),
    case("! --pkt-type multicast", "-A OUTPUT -m pkttype ! --pkt-type multicast -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 1": (1, 44)}),
    case("a multicast destination sent by this host is not PACKET_MULTICAST at OUTPUT",
         "-A OUTPUT -m pkttype --pkt-type multicast -j DROP\n"
         "-A OUTPUT -m pkttype --pkt-type host",
         (OUT, udp(dst="224.0.0.5"), ACCEPT), {"OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("--pkt-type at INPUT: a frame to our MAC is unicast",
         "-A INPUT -m pkttype --pkt-type unicast -j DROP",
         [(IN, udp(), DROP)], {"INPUT 1": (1, 44)}),

    # -- mac (test runs see the loopback device, not Ethernet: see test_differential) ----
    case("--mac-source never matches on a non-Ethernet device, inverted or not",
         "-A INPUT -m mac --mac-source 00:00:00:00:00:00 -j DROP\n"
         "-A INPUT -m mac ! --mac-source 00:00:00:00:00:01 -j DROP",
         (IN, udp(), ACCEPT), {"INPUT policy": (1, 44)}),

    # -- multiport (revision 1) -------------------------------------------------------
    case("multiport --dports: ports and ranges, edges",
         "-A OUTPUT -p tcp -m multiport --dports 22,80:90,443 -j DROP",
         [(OUT, tcp(dport=22), DROP), (OUT, tcp(dport=80), DROP), (OUT, tcp(dport=90), DROP),
          (OUT, tcp(dport=443), DROP), (OUT, tcp(dport=21), ACCEPT), (OUT, tcp(dport=79), ACCEPT),
          (OUT, tcp(dport=91), ACCEPT), (OUT, tcp(sport=22, dport=1000), ACCEPT)],
         {"OUTPUT 1": (4, 224), "OUTPUT policy": (4, 224)}),
    case("multiport --sports", "-A OUTPUT -p udp -m multiport --sports 53,1000:2000 -j DROP",
         [(OUT, udp(sport=53), DROP), (OUT, udp(sport=2000), DROP), (OUT, udp(sport=999), ACCEPT),
          (OUT, udp(sport=40000, dport=53), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (2, 88)}),
    case("multiport --ports: source or destination",
         "-A OUTPUT -p tcp -m multiport --ports 22,8000:8080 -j DROP",
         [(OUT, tcp(sport=22, dport=1234), DROP), (OUT, tcp(sport=5000, dport=8080), DROP),
          (OUT, tcp(sport=8000, dport=1), DROP), (OUT, tcp(sport=23, dport=8081), ACCEPT)],
         {"OUTPUT 1": (3, 168), "OUTPUT policy": (1, 56)}),
    case("multiport ! --dports", "-A OUTPUT -p tcp -m multiport ! --dports 22,80 -j DROP",
         [(OUT, tcp(dport=22), ACCEPT), (OUT, tcp(dport=80), ACCEPT), (OUT, tcp(dport=81), DROP)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (2, 112)}),
    case("multiport ! --ports: neither port listed",
         "-A OUTPUT -p udp -m multiport ! --ports 53,5353 -j DROP",
         [(OUT, udp(sport=53, dport=1), ACCEPT), (OUT, udp(sport=1, dport=5353), ACCEPT),
          (OUT, udp(sport=1, dport=2), DROP)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 88)}),
    case("multiport ! --sports with a range",
         "-A OUTPUT -p udp -m multiport ! --sports 1:1023 -j DROP",
         [(OUT, udp(sport=1), ACCEPT), (OUT, udp(sport=1023), ACCEPT), (OUT, udp(sport=1024), DROP),
          (OUT, udp(sport=0), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (2, 88)}),
    case("multiport: the 15 ports iptables allows",
         "-A OUTPUT -p tcp -m multiport --dports 1,2,3,4,6,7,8,9,10,11,12,13,14,15,16 -j DROP",
         [(OUT, tcp(dport=1), DROP), (OUT, tcp(dport=16), DROP), (OUT, tcp(dport=5), ACCEPT)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (1, 56)}),
    case("multiport never matches a non-first fragment, not even with !, and never "
         "hotdrops offset 1",
         "-A OUTPUT -p tcp -m multiport ! --dports 22 -j DROP\n"
         "-A OUTPUT -p tcp -m multiport --dports 80 -j DROP",
         [(OUT, tcp(frag_offset=1), ACCEPT), (OUT, tcp(frag_offset=100), ACCEPT),
          (OUT, tcp(dport=80, more_fragments=True), DROP)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (2, 72)}),
    case("multiport reads only the ports: 4 bytes of tcp are enough",
         "-A OUTPUT -p tcp -m multiport --dports 80 -j DROP",
         [(OUT, tcp(dport=80, truncate_l4=4), DROP), (OUT, tcp(dport=81, truncate_l4=19), ACCEPT)],
         {"OUTPUT 1": (1, 24), "OUTPUT policy": (1, 39)}),
    case("multiport hotdrops fewer than 4 bytes, even with !",
         "-A OUTPUT -p udp -m multiport ! --dports 53 -j ACCEPT\n-A OUTPUT -j ACCEPT",
         (OUT, udp(truncate_l4=3), DROP), {}),
    case("multiport: no hotdrop when the ip part fails first",
         "-A OUTPUT -d 10.0.0.0/8 -p tcp -m multiport --dports 80 -j DROP",
         (OUT, tcp(truncate_l4=2), ACCEPT), {"OUTPUT policy": (1, 22)}),
    case("multiport on sctp reads the same two ports",
         "-A OUTPUT -p sctp -m multiport --sports 1 -j DROP\n"
         "-A OUTPUT -p sctp -m multiport --dports 0 -j DROP",
         [(OUT, raw(132), DROP), (OUT, raw(132, payload_len=3), DROP)],
         {"OUTPUT 2": (1, 36)}),
    case("multiport with tcp flags", "-A OUTPUT -p tcp --syn -m multiport --dports 22,80 -j DROP",
         [(OUT, tcp(dport=80, flags=SYN), DROP), (OUT, tcp(dport=80, flags=ACK), ACCEPT),
          (OUT, tcp(dport=81, flags=SYN), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (2, 112)}),

    # -- comment ----------------------------------------------------------------------
    case("comment changes nothing",
         '-A OUTPUT -p udp -m comment --comment "no dns out" -j DROP\n'
         "-A OUTPUT -m comment --comment counted",
         [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT 2": (1, 56), "OUTPUT policy": (1, 56)}),
    case("comment between matches",
         "-A OUTPUT -p tcp -m comment --comment ssh -m tcp --dport 22 -j DROP",
         [(OUT, tcp(dport=22), DROP), (OUT, tcp(dport=23), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)}),

    # -- iprange ----------------------------------------------------------------------
    case("iprange --src-range edges", "-A OUTPUT -m iprange --src-range 10.1.2.0-10.1.2.9 -j DROP",
         [(OUT, udp(src="10.1.2.0"), DROP), (OUT, udp(src="10.1.2.9"), DROP),
          (OUT, udp(src="10.1.2.10"), ACCEPT), (OUT, udp(src="10.1.1.255"), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (2, 88)}),
    case("iprange --dst-range across an octet",
         "-A OUTPUT -m iprange --dst-range 192.168.7.250-192.168.8.5 -j DROP",
         [(OUT, udp(dst="192.168.7.255"), DROP), (OUT, udp(dst="192.168.8.0"), DROP),
          (OUT, udp(dst="192.168.8.6"), ACCEPT), (OUT, udp(dst="192.168.7.249"), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (2, 88)}),
    case("iprange compares addresses as numbers, across 128.0.0.0",
         "-A OUTPUT -m iprange --src-range 127.255.255.254-128.0.0.1 -j DROP",
         [(OUT, udp(src="127.255.255.254"), DROP), (OUT, udp(src="128.0.0.1"), DROP),
          (OUT, udp(src="127.255.255.253"), ACCEPT), (OUT, udp(src="128.0.0.2"), ACCEPT),
          (OUT, udp(src="0.0.0.128"), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (3, 132)}),
    case("iprange up to 255.255.255.255",
         "-A OUTPUT -m iprange --src-range 240.0.0.0-255.255.255.255 -j DROP",
         [(OUT, udp(src="255.255.255.255"), DROP), (OUT, udp(src="240.0.0.0"), DROP),
          (OUT, udp(src="239.255.255.255"), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (1, 44)}),
    case("iprange ! --src-range", "-A OUTPUT -m iprange ! --src-range 10.0.0.1-10.0.0.5 -j DROP",
         [(OUT, udp(src="10.0.0.3"), ACCEPT), (OUT, udp(src="10.0.0.6"), DROP)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("iprange source and ! destination both needed",
         "-A OUTPUT -m iprange --src-range 10.0.0.0-10.0.0.255 "
         "! --dst-range 192.168.7.0-192.168.7.9 -j DROP",
         [(OUT, udp(src="10.0.0.1", dst="192.168.7.10"), DROP),
          (OUT, udp(src="10.0.0.1", dst="192.168.7.9"), ACCEPT),
          (OUT, udp(src="10.0.1.1", dst="192.168.7.10"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 88)}),
    case("iprange of one address", "-A OUTPUT -m iprange --dst-range 192.168.7.8 -j DROP",
         [(OUT, udp(dst="192.168.7.8"), DROP), (OUT, udp(dst="192.168.7.9"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("iprange reversed never matches, its inversion always does",
         "-A OUTPUT -m iprange --src-range 10.1.2.9-10.1.2.1 -j DROP\n"
         "-A OUTPUT -m iprange ! --src-range 10.1.2.9-10.1.2.1",
         (OUT, udp(src="10.1.2.5"), ACCEPT), {"OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("iprange of everything, and ! of everything",
         "-A OUTPUT -m iprange ! --dst-range 0.0.0.0-255.255.255.255 -j DROP\n"
         "-A OUTPUT -m iprange --dst-range 0.0.0.0-255.255.255.255",
         (OUT, udp(), ACCEPT), {"OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),

    # -- length: the IP header's total length -----------------------------------------
    case("length exact", "-A OUTPUT -m length --length 44 -j DROP",
         [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT), (OUT, udp(payload_len=17), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 101)}),
    case("length range edges", "-A OUTPUT -m length --length 37:56 -j DROP",
         [(OUT, udp(), DROP), (OUT, tcp(), DROP), (OUT, raw(47), ACCEPT),
          (OUT, raw(47, payload_len=17), DROP), (OUT, tcp(payload_len=17), ACCEPT)],
         {"OUTPUT 1": (3, 137), "OUTPUT policy": (2, 93)}),
    case("length ! range", "-A OUTPUT -m length ! --length 0:43 -j DROP",
         [(OUT, udp(), DROP), (OUT, raw(47), ACCEPT), (OUT, udp(payload_len=1400), DROP)],
         {"OUTPUT 1": (2, 1472), "OUTPUT policy": (1, 36)}),
    case("length of non-first fragments too", "-A OUTPUT -m length --length 36 -j DROP",
         [(OUT, udp(frag_offset=3), DROP)], {"OUTPUT 1": (1, 36)}),
    case("length: min above max never matches, inverted always",
         "-A OUTPUT -m length --length 60:40 -j DROP\n-A OUTPUT -m length ! --length 60:40",
         (OUT, udp(), ACCEPT), {"OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("length 0:65535 and its inversion",
         "-A OUTPUT -m length ! --length 0:65535 -j DROP\n-A OUTPUT -m length --length 0:65535",
         (OUT, udp(), ACCEPT), {"OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),

    # -- ttl ----------------------------------------------------------------------------
    case("ttl --ttl-eq", "-A OUTPUT -m ttl --ttl-eq 64 -j DROP",
         [(OUT, udp(ttl=64), DROP), (OUT, udp(ttl=63), ACCEPT), (OUT, udp(ttl=65), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (2, 88)}),
    case("ttl ! --ttl-eq", "-A OUTPUT -m ttl ! --ttl-eq 64 -j DROP",
         [(OUT, udp(ttl=64), ACCEPT), (OUT, udp(ttl=1), DROP)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("ttl --ttl-lt", "-A OUTPUT -m ttl --ttl-lt 10 -j DROP",
         [(OUT, udp(ttl=9), DROP), (OUT, udp(ttl=0), DROP), (OUT, udp(ttl=10), ACCEPT),
          (OUT, udp(ttl=255), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (2, 88)}),
    case("ttl --ttl-gt", "-A OUTPUT -m ttl --ttl-gt 254 -j DROP",
         [(OUT, udp(ttl=255), DROP), (OUT, udp(ttl=254), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)}),
    case("ttl edges: --ttl-eq 0, --ttl-gt 0",
         "-A OUTPUT -m ttl --ttl-eq 0\n-A OUTPUT -m ttl --ttl-gt 0",
         [(OUT, udp(ttl=0), ACCEPT), (OUT, udp(ttl=1), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT 2": (1, 44), "OUTPUT policy": (2, 88)}),
    case("ttl --ttl-lt 0 and --ttl-gt 255 never match",
         "-A OUTPUT -m ttl --ttl-lt 0 -j DROP\n-A OUTPUT -m ttl --ttl-gt 255 -j DROP",
         [(OUT, udp(ttl=0), ACCEPT), (OUT, udp(ttl=255), ACCEPT)],
         {"OUTPUT policy": (2, 88)}),

    # -- the new matches together -------------------------------------------------------
    case("multiport, iprange, length, ttl and a comment in one rule",
         "-A OUTPUT -p udp -m multiport --dports 53,5353 -m iprange --src-range "
         "10.1.2.0-10.1.2.255 -m length --length :100 -m ttl --ttl-gt 1 "
         "-m comment --comment all -j DROP",
         [(OUT, udp(dport=53), DROP), (OUT, udp(dport=54), ACCEPT),
          (OUT, udp(dport=53, src="10.1.3.3"), ACCEPT),
          (OUT, udp(dport=53, payload_len=73), ACCEPT),
          (OUT, udp(dport=53, ttl=1), ACCEPT), (OUT, udp(dport=5353, payload_len=72), DROP),
          (OUT, udp(dport=53, truncate_l4=3), DROP)],
         {"OUTPUT 1": (2, 144), "OUTPUT policy": (4, 233)}),

    # -- payloads iptables never writes, which the kernel takes ----------------------
    case("multiport: an invert byte of 2 holds whatever the ports (a bool of true ^ 2)",
         "-A OUTPUT -p udp -m multiport --dports 53 -j DROP",
         [(OUT, udp(dport=53), DROP), (OUT, udp(dport=54), DROP),
          (OUT, udp(frag_offset=3), ACCEPT), (OUT, udp(truncate_l4=2), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (1, 36)},
         crafted=[("OUTPUT 1", 0, 47, b"\x02")]),
    case("multiport: no ports never match, ! no ports always",
         "-A OUTPUT -p udp -m multiport --dports 53 -j DROP\n"
         "-A OUTPUT -p udp -m multiport ! --dports 53",
         (OUT, udp(dport=53), ACCEPT), {"OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)},
         crafted=[("OUTPUT 1", 0, 1, b"\x00"), ("OUTPUT 2", 0, 1, b"\x00")]),
    case("multiport: any non-zero pflag starts a range",
         "-A OUTPUT -p tcp -m multiport --dports 100,200 -j DROP",
         [(OUT, tcp(dport=150), DROP), (OUT, tcp(dport=201), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT policy": (1, 56)},
         crafted=[("OUTPUT 1", 0, 32, b"\x02")]),
    case("length: an invert byte of 2 holds whatever the length",
         "-A OUTPUT -m length --length 44 -j DROP",
         [(OUT, udp(), DROP), (OUT, tcp(), DROP)], {"OUTPUT 1": (2, 100)},
         crafted=[("OUTPUT 1", 0, 4, b"\x02")]),
    case("ttl: a mode Linux does not know never matches",
         "-A OUTPUT -m ttl --ttl-eq 64 -j DROP",
         [(OUT, udp(ttl=64), ACCEPT), (OUT, udp(ttl=3), ACCEPT)], {"OUTPUT policy": (2, 88)},
         crafted=[("OUTPUT 1", 0, 0, b"\x04")]),
    case("iprange: an inversion flag without its range flag tests nothing",
         "-A OUTPUT -m iprange --src-range 10.1.2.0-10.1.2.9 -j DROP",
         [(OUT, udp(src="11.0.0.1"), DROP), (OUT, udp(src="10.1.2.5"), DROP)],
         {"OUTPUT 1": (2, 88)}, crafted=[("OUTPUT 1", 0, 64, b"\x10")]),
    case("iprange: unknown flags and the IPv6 part of the addresses are ignored",
         "-A OUTPUT -m iprange --src-range 10.1.2.0-10.1.2.9 -j DROP",
         [(OUT, udp(src="10.1.2.5"), DROP), (OUT, udp(src="10.1.2.10"), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 44)},
         crafted=[("OUTPUT 1", 0, 64, b"\xc1"), ("OUTPUT 1", 0, 4, b"\xff" * 12),
                  ("OUTPUT 1", 0, 20, b"\xff" * 12)]),
    case("comment: a text without its NUL is still only a comment",
         "-A OUTPUT -p udp -m comment --comment x -j DROP",
         [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (1, 56)}, crafted=[("OUTPUT 1", 0, 0, b"y" * 256)]),

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
    case("-g X with matches", ":OUTPUT DROP\n:X -\n-A OUTPUT -p udp --dport 53 -m comment "
         "--comment dns -g X\n-A X -j ACCEPT",
         [(OUT, udp(dport=53), ACCEPT), (OUT, udp(dport=54), DROP)],
         {"OUTPUT 1": (1, 44), "X 1": (1, 44), "OUTPUT policy": (1, 44)}),
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
    # Runs of jumps (classified: a dispatch, lookups again past a -j that returned)
    case("a run of jumps: a returning chain's rule, then the next rule of another tuple",
         JUMP_RUN, [(OUT, udp(dst="10.0.0.1"), ACCEPT), (OUT, udp(dst="10.0.0.2", dport=54), DROP),
                    (OUT, udp(dst="10.0.0.9"), ACCEPT), (OUT, tcp(dst="10.0.0.1", dport=53), DROP)],
         {"OUTPUT 1": (1, 44), "C1 return": (1, 44), "OUTPUT 3": (3, 144), "C2 return": (3, 144),
          "OUTPUT 4": (2, 88), "OUTPUT 2": (1, 44), "C2 1": (1, 44), "OUTPUT policy": (1, 56)}),
    case("a run of jumps: a rule sharing a -j rule's key comes after it returns",
         ":OUTPUT DROP\n:C1 -\n:C2 -\n" + "\n".join(
             [f"-A OUTPUT -d 10.0.0.{i} -p udp --dport 53 -j C{1 + i % 2}" for i in range(1, 5)]
             + ["-A OUTPUT -d 10.0.0.1 -p udp --dport 53 -j ACCEPT",
                "-A OUTPUT -d 10.0.0.2 -p udp --dport 53 -j C1",
                "-A C2 -p udp --dport 54 -j DROP"]),
         [(OUT, udp(dst="10.0.0.1"), ACCEPT), (OUT, udp(dst="10.0.0.2"), DROP),
          (OUT, udp(dst="10.0.0.3"), DROP)],
         {"OUTPUT 1": (1, 44), "C2 return": (2, 88), "OUTPUT 5": (1, 44), "OUTPUT 2": (1, 44),
          "C1 return": (2, 88), "OUTPUT 6": (1, 44), "OUTPUT policy": (2, 88),
          "OUTPUT 3": (1, 44)}),
    case("a run of jumps: -g's chain returns, and so does the run's chain",
         ":OUTPUT DROP\n:A -\n:G -\n-A OUTPUT -j A\n-A OUTPUT -j ACCEPT\n"
         "-A A -d 10.0.0.1 -g G\n-A A -d 10.0.0.2 -j G\n-A A -d 10.0.0.0/24 -j DROP\n"
         "-A G -p tcp -j ACCEPT",
         [(OUT, udp(dst="10.0.0.1"), ACCEPT), (OUT, udp(dst="10.0.0.2"), DROP),
          (OUT, tcp(dst="10.0.0.1"), ACCEPT)],
         {"OUTPUT 1": (3, 144), "A 1": (2, 100), "G return": (2, 88), "OUTPUT 2": (1, 44),
          "A 2": (1, 44), "A 3": (1, 44), "G 1": (1, 56)}),
    case("300 user chains, each jumped to from one rule (BPF allows 256 subprograms)",
         "\n".join([f":C{i} -" for i in range(300)]
                   + [f"-A OUTPUT -p udp --dport {1000 + i} -j C{i}" for i in range(300)]
                   + [f"-A C{i} -s {'10.1.2.3' if i == 299 else '10.9.9.9'} -j DROP"
                      for i in range(300)]),
         [(OUT, udp(dport=1299), DROP), (OUT, udp(dport=1005), ACCEPT)],
         {"OUTPUT 300": (1, 44), "C299 1": (1, 44), "OUTPUT 6": (1, 44), "C5 return": (1, 44),
          "OUTPUT policy": (1, 44)}),
    # chain templates (compiler/templates.py): 10 chains of each shape, their
    # addresses, ports, probability and the instance they jump to read from a record
    templated_case(case, tcp, TEMPLATED, "192.168.7.{}", "10.1.2.4", 56),
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

    # -- the DS field, ECN bits and flags, the CPU -------------------------------------
    case("dscp: the DS field's upper 6 bits, whatever the ECN bits",
         "-A OUTPUT -m dscp --dscp 0x2e -j DROP\n-A OUTPUT -m dscp ! --dscp 0 -j DROP",
         [(OUT, udp(tos=0xB8), DROP), (OUT, udp(tos=0xBB), DROP), (OUT, udp(tos=0x04), DROP),
          (OUT, udp(tos=0x03), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("tos: the byte under a mask, inverted",
         "-A OUTPUT -m tos --tos 0x10/0x3f -j DROP\n-A OUTPUT -m tos ! --tos 0x08 -j DROP",
         [(OUT, udp(tos=0x10), DROP), (OUT, udp(tos=0x90), DROP), (OUT, udp(tos=0x18), DROP),
          (OUT, udp(tos=0x08), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("ecn: the IP header's ECT codepoint",
         "-A OUTPUT -m ecn --ecn-ip-ect 1 -j DROP\n-A OUTPUT -m ecn ! --ecn-ip-ect 0 -j DROP",
         [(OUT, udp(tos=0xB9), DROP), (OUT, udp(tos=0x03), DROP), (OUT, udp(tos=0xB8), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("ecn: ECE and CWR, read afresh; a short tcp header fails the match, no drop",
         "-A OUTPUT -p tcp -m ecn --ecn-tcp-ece ! --ecn-tcp-cwr -j DROP\n"
         "-A OUTPUT -p tcp -m ecn --ecn-tcp-cwr --ecn-ip-ect 2 -j DROP",
         [(OUT, tcp(flags=SYN | 0x40), DROP), (OUT, tcp(flags=SYN | 0xC0), ACCEPT),
          (OUT, tcp(flags=0x80, tos=0x02), DROP), (OUT, tcp(flags=0x40, truncate_l4=19), ACCEPT)],
         {"OUTPUT 1": (1, 56), "OUTPUT 2": (1, 56), "OUTPUT policy": (2, 95)}),
    case("cpu: no CPU 4095 here",
         "-A OUTPUT -m cpu --cpu 4095 -j ACCEPT\n-A OUTPUT -m cpu ! --cpu 4095 -j DROP",
         (OUT, udp(), DROP), {"OUTPUT 2": (1, 44)}),

    # -- tcpmss: the first MSS option the walk steps on, read as the rule meets it ----
    case("tcpmss: the MSS in range; none, cut short, or out of range fails",
         "-A OUTPUT -p tcp -m tcpmss --mss 1000:1500 -j DROP",
         [(OUT, tcp(tcp_options=MSS), DROP),
          (OUT, tcp(tcp_options=b"\x01\x01" + MSS + b"\x00\x00"), DROP),
          (OUT, tcp(tcp_options=b"\x02\x04\x02\x18"), ACCEPT),
          (OUT, tcp(tcp_options=b"\x01\x01\x02\x04"), ACCEPT),
          (OUT, tcp(tcp_options=b"\x08\x06\x02\x04\x05\xb4\x00\x00"), ACCEPT),
          (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (2, 124), "OUTPUT policy": (4, 240)}),
    case("tcpmss: inverted, no MSS option matches",
         "-A OUTPUT -p tcp -m tcpmss ! --mss 1460 -j DROP",
         [(OUT, tcp(), DROP), (OUT, tcp(tcp_options=MSS), ACCEPT),
          (OUT, tcp(tcp_options=b"\x00\x00" + MSS[:2]), DROP)],
         {"OUTPUT 1": (2, 116), "OUTPUT policy": (1, 60)}),
    case("tcpmss: a header, a data offset or options it cannot read drop the packet; a "
         "later fragment's bytes are read as a header (data offset 0 here)",
         "-A OUTPUT -p tcp -m tcpmss --mss 0:65535 -j ACCEPT\n-A OUTPUT -p tcp -j ACCEPT\n"
         ":OUTPUT DROP",
         [(OUT, tcp(truncate_l4=19), DROP), (OUT, tcp(tcp_doff=4), DROP),
          (OUT, tcp(tcp_doff=15, payload_len=39), DROP),
          (OUT, tcp(tcp_doff=15, payload_len=40), ACCEPT),
          (OUT, tcp(frag_offset=100), DROP), (OUT, tcp(frag_offset=100, payload_len=20), DROP)],
         {"OUTPUT 2": (1, 80)}),

    # -- limit (1/hour: no token comes back during a test) -------------------------
    case("limit: the burst passes, then the bucket is empty",
         "-A OUTPUT -m limit --limit 1/hour --limit-burst 3 -j DROP",
         [(OUT, udp(), DROP)] * 3 + [(OUT, udp(), ACCEPT)] * 2,
         {"OUTPUT 1": (3, 132), "OUTPUT policy": (2, 88)}),
    case("limit: a packet an earlier test of the rule fails takes no token",
         "-A OUTPUT -p tcp -m limit --limit 1/hour --limit-burst 2 -j DROP",
         [(OUT, udp(), ACCEPT)] * 3 + [(OUT, tcp(), DROP)] * 2 + [(OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (4, 188)}),
    case("limit: a packet an earlier rule decides takes no token",
         "-A OUTPUT -p udp -j ACCEPT\n-A OUTPUT -m limit --limit 1/hour --limit-burst 1 -j DROP",
         [(OUT, udp(), ACCEPT), (OUT, udp(), ACCEPT), (OUT, tcp(), DROP), (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT 2": (1, 56), "OUTPUT policy": (1, 56)}),
    case("limit: a later test of the rule failing still took the token",
         "-A OUTPUT -p udp -m limit --limit 1/hour --limit-burst 2 -m udp --dport 53 -j DROP",
         [(OUT, udp(dport=54), ACCEPT), (OUT, udp(dport=54), ACCEPT), (OUT, udp(), ACCEPT)],
         {"OUTPUT policy": (3, 132)}),
    case("limit: a hotdrop before the limit takes no token",
         "-A OUTPUT -p tcp -m tcp --dport 80 -m limit --limit 1/hour --limit-burst 1 -j ACCEPT\n"
         "-A OUTPUT -j DROP",
         [(OUT, tcp(truncate_l4=10), DROP), (OUT, tcp(), ACCEPT), (OUT, tcp(), DROP)],
         {"OUTPUT 1": (1, 56), "OUTPUT 2": (1, 56)}),
    case("limit: each limit rule has its own bucket",
         "-A OUTPUT -p udp -m limit --limit 1/hour --limit-burst 1 -j DROP\n"
         "-A OUTPUT -m limit --limit 1/hour --limit-burst 1 -j DROP",
         [(OUT, udp(), DROP), (OUT, udp(), DROP), (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("limit: two limits in one rule, two buckets",
         "-A OUTPUT -m limit --limit 1/hour --limit-burst 3 -m limit --limit 1/hour "
         "--limit-burst 1 -j DROP",
         [(OUT, udp(), DROP), (OUT, udp(), ACCEPT), (OUT, udp(), ACCEPT), (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT policy": (3, 132)}),
    case("limit: one bucket for a chain reached twice",
         ":X -\n-A OUTPUT -j X\n-A OUTPUT -j X\n"
         "-A X -m limit --limit 1/hour --limit-burst 3 -j RETURN\n-A X -j DROP",
         [(OUT, udp(), ACCEPT), (OUT, udp(), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT 2": (2, 88), "X 1": (3, 132), "X 2": (1, 44),
          "OUTPUT policy": (1, 44)}),

    # -- quota ----------------------------------------------------------------------
    case("quota: packets the remaining bytes cover pass; one they do not empties it",
         "-A OUTPUT -m quota --quota 150 -j ACCEPT\n-A OUTPUT -j DROP",
         [(OUT, udp(), ACCEPT), (OUT, tcp(), ACCEPT), (OUT, tcp(), DROP), (OUT, udp(), DROP)],
         {"OUTPUT 1": (2, 100), "OUTPUT 2": (2, 100)}),
    case("quota: inverted, counted alike; a packet an earlier test fails takes nothing",
         "-A OUTPUT -p udp -m quota ! --quota 100 -j DROP\n"
         "-A OUTPUT -m quota --quota 56 -j DROP",
         [(OUT, tcp(), DROP), (OUT, udp(), ACCEPT), (OUT, udp(), ACCEPT), (OUT, udp(), DROP),
          (OUT, tcp(), ACCEPT)],
         {"OUTPUT 1": (1, 44), "OUTPUT 2": (1, 56), "OUTPUT policy": (3, 144)}),
    case("quota: each rule has its own count, a chain reached twice one",
         ":X -\n-A OUTPUT -j X\n-A OUTPUT -j X\n-A X -m quota --quota 100 -j RETURN\n"
         "-A X -j DROP",
         [(OUT, udp(), ACCEPT), (OUT, udp(), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT 2": (1, 44), "X 1": (2, 88), "X 2": (1, 44),
          "OUTPUT policy": (1, 44)}),

    # -- statistic ------------------------------------------------------------------
    case("statistic nth: every third packet, from the first",
         "-A OUTPUT -m statistic --mode nth --every 3 --packet 0 -j DROP",
         [(OUT, udp(), DROP), (OUT, udp(), ACCEPT), (OUT, udp(), ACCEPT)] * 2 + [(OUT, udp(), DROP)],
         {"OUTPUT 1": (3, 132), "OUTPUT policy": (4, 176)}),
    case("statistic nth: --packet starts later; inverted",
         "-A OUTPUT -m statistic --mode nth ! --every 2 --packet 1 -j DROP",
         [(OUT, udp(), DROP), (OUT, udp(), ACCEPT), (OUT, udp(), DROP), (OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (2, 88), "OUTPUT policy": (2, 88)}),
    case("statistic nth: inverted, every third packet let through",
         "-A OUTPUT -m statistic --mode nth ! --every 3 --packet 0 -j DROP",
         [(OUT, udp(), ACCEPT), (OUT, udp(), DROP), (OUT, udp(), DROP)] * 2 + [(OUT, udp(), ACCEPT)],
         {"OUTPUT 1": (4, 176), "OUTPUT policy": (3, 132)}),
    case("statistic nth: a packet an earlier test of the rule fails does not count",
         "-A OUTPUT -p tcp -m statistic --mode nth --every 2 --packet 0 -j DROP",
         [(OUT, tcp(), DROP), (OUT, udp(), ACCEPT), (OUT, tcp(), ACCEPT), (OUT, tcp(), DROP)],
         {"OUTPUT 1": (2, 112), "OUTPUT policy": (2, 100)}),
    case("statistic nth: two rules, two counters",
         "-A OUTPUT -p udp -m statistic --mode nth --every 2 --packet 1 -j DROP\n"
         "-A OUTPUT -m statistic --mode nth --every 2 --packet 0 -j DROP",
         [(OUT, udp(), DROP), (OUT, udp(), DROP), (OUT, udp(), ACCEPT), (OUT, udp(), DROP)],
         {"OUTPUT 1": (2, 88), "OUTPUT 2": (1, 44), "OUTPUT policy": (1, 44)}),
    case("statistic random: probability 0 and 1 (kube-proxy's last endpoint has none)",
         "-A OUTPUT -p udp -m statistic --mode random --probability 0 -j DROP\n"
         "-A OUTPUT -p udp -m statistic --mode random --probability 1 -j ACCEPT\n"
         "-A OUTPUT -m statistic --mode random ! --probability 1 -j ACCEPT\n-A OUTPUT -j DROP",
         [(OUT, udp(), ACCEPT), (OUT, tcp(), DROP)],
         {"OUTPUT 2": (1, 44), "OUTPUT 4": (1, 56)}),

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

# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("how", ["walked", "classified", "multifield"])
@pytest.mark.parametrize("c", CASES)
def test_verdicts_and_counters(c: Case, how: str, monkeypatch):
    run_case(c, how, monkeypatch)


def test_entry_layout_helper_agrees_with_the_blob():
    """The helper's entry numbering is the decoder's (chain tails and rule entries)."""
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


def test_counters_add_and_wrap_as_the_kernels_u64():
    """Counters are u64 in the kernel: what IPT_SO_SET_ADD_COUNTERS adds and what the
    programs count (per CPU) sum modulo 2^64, entry by entry."""
    table = load_filter_table(blob_of("-A OUTPUT -p udp -j ACCEPT\n-A OUTPUT -j DROP"),
                              attach=False)
    try:
        n = table.ruleset.table.num_entries
        near = (1 << 64) - 3
        table.ruleset.add_counters([(near - i, i) for i in range(n)])
        table.ruleset.add_counters([(2, near)] * n)
        assert table.test_run(OUT, udp().build(1, 0)) == ACCEPT
        assert table.test_run(OUT, udp().build(1, 0)) == ACCEPT
        counters = table.counters()
    finally:
        table.close()
    udp_rule = entry_index("-A OUTPUT -p udp -j ACCEPT")["OUTPUT 1"]
    u64 = (1 << 64) - 1
    assert counters == [((near - i + 2 + (2 if i == udp_rule else 0)) & u64,
                         (i + near + (2 * 44 if i == udp_rule else 0)) & u64)
                        for i in range(n)]


# ---------------------------------------------------------------- against the kernel

OUTPUT_ONLY = output_only(CASES)


def test_most_cases_are_checked_against_the_kernel():
    assert len(OUTPUT_ONLY) >= 0.8 * len(CASES)


@pytest.mark.parametrize("c", OUTPUT_ONLY)
def test_kernel_agrees(kernel_netns, c: Case):
    kernel_agrees(kernel_netns, c)


@pytest.mark.parametrize("c", OUTPUT_ONLY)
def test_listing_agrees(kernel_netns, c: Case):
    listing_agrees(kernel_netns, c)


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


# ---------------------------------------------------------------- random payloads

def _random_payload_case(rng: random.Random) -> tuple[Case, list]:
    """One OUTPUT rule whose match payload is random bytes (some the kernel refuses),
    and packets aimed at what it says."""
    kind = rng.choice(["multiport", "multiport", "length", "ttl", "iprange"])
    if kind == "multiport":
        proto = rng.choice(["tcp", "udp", "sctp"])
        rule = f"-p {proto} -m multiport --dports 1"
        count = rng.choice([0, 1, 2, 3, 5, 15, 16])
        ports = [rng.choice([0, 1, 80, 81, 1000, 65535, rng.randrange(65536)]) for _ in range(15)]
        pflags = [int(rng.random() < 0.3) * rng.choice([1, 2, 255]) for _ in range(15)]
        data = bytes([rng.choice([0, 1, 2, 2, 3]), count]) + \
            struct.pack("<15H", *ports) + bytes(pflags) + bytes([rng.choice([0, 1, 1, 2])])
        make = {"tcp": tcp, "udp": udp, "sctp": lambda **kw: raw(132, **kw)}[proto]
        packets = []
        for _ in range(8):
            sport, dport = (max(0, min(65535, rng.choice(ports) + rng.choice([-1, 0, 1])))
                            for _ in range(2))
            kw = dict(sport=sport, dport=dport) if proto != "sctp" else {}
            r = rng.random()
            if r < 0.1:
                kw["frag_offset"] = rng.choice([1, 9])
            elif r < 0.2 and proto != "sctp":
                kw["truncate_l4"] = rng.randrange(8)
            packets.append(make(**kw))
    elif kind == "length":
        rule = "-m length --length 1"
        lo, hi = (rng.randrange(20, 90) for _ in range(2))
        data = struct.pack("<HHB", lo, hi, rng.choice([0, 1, 2, 255])) + bytes(3)
        packets = [udp(payload_len=max(0, rng.choice([lo, hi]) - 28 + rng.choice([-1, 0, 1])))
                   for _ in range(6)]
    elif kind == "ttl":
        rule = "-m ttl --ttl-eq 1"
        value = rng.choice([0, 1, 64, 254, 255, rng.randrange(256)])
        data = bytes([rng.choice([0, 1, 2, 3, 4, 255]), value]) + bytes(6)
        packets = [udp(ttl=max(0, min(255, value + rng.choice([-1, 0, 1])))) for _ in range(6)]
    else:
        rule = "-m iprange --src-range 1.1.1.1-1.1.1.2"
        bounds = [int(ipaddress.IPv4Address(A)) + rng.randrange(-3, 4) for _ in range(2)] + \
            [int(ipaddress.IPv4Address(B)) + rng.randrange(-3, 4) for _ in range(2)]
        data = b"".join(struct.pack(">I", a) + rng.randbytes(12) for a in bounds) + \
            bytes([rng.randrange(256)]) + bytes(7)
        def near(addresses) -> str:
            return str(ipaddress.IPv4Address(rng.choice(addresses) + rng.randrange(-1, 2)))
        packets = [udp(src=near(bounds[:2]), dst=near(bounds[2:])) for _ in range(6)]
    rules = f"-A OUTPUT {rule} -j DROP"
    return Case(f"{kind} {data.hex()}", rules, [], crafted=(("OUTPUT 1", 0, 0, data),)), packets


@pytest.mark.parametrize("seed", range(8))
def test_random_payloads_as_the_kernel_takes_them(kernel_netns, seed):
    """Random payloads the kernel refuses are refused with its errno; those it takes
    give its verdicts and counters, packet by packet."""
    rng = random.Random(seed)
    taken = 0
    for _ in range(25):
        c, packets = _random_payload_case(rng)
        taken += payload_agrees(kernel_netns, c, packets)
    assert taken >= 10
