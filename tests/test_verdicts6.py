"""Verdicts and counters of translated IPv6 filter tables (ip6_tables.c's semantics),
feature by feature; the machinery, and what a case is: verdicts.py.

The rule's ip part (ip6_packet_match()): addresses compared as ((packet ^ addr) &
mask), so address bits outside the mask do not matter (unlike IPv4); interfaces; and
`-p`, which walks the extension headers to the upper-layer protocol as
ipv6_find_hdr() does and drops the packet (uncounted) when the walk fails. Then the
matches as ip6tables has them: tcp, udp, multiport, icmp6 and the others read the
transport header where the walk found it (par->thoff), and a non-first fragment's
offset in bytes (par->fragoff), never in IPv4's 8-byte units.

Every case whose packets all go through OUTPUT is replayed against the kernel's own
ip6tables, which proves the expectations, and its `-L -n` text compared with
ip6tables'. Not here: -i (test runs have no input device) and what only real frames
and sockets have (mac, pkttype of received frames and looped-back multicast, owner):
test_differential.py, test_pkttype.py and test_owner.py compare those with the kernel.

Long lists (LONG_LISTS): every case runs walked and classified (runs of one rule on,
verdicts.run_case); those cases aim at the tuple space's corners, each of which
the walked code and the kernel decide too.

Packet sizes (bpfilter_lab.packets.Packet, 16 payload bytes unless said): tcp 76,
udp 64, icmpv6 64, a protocol without a header 56; each extension header adds its
bytes: hop-by-hop, destination options, routing and fragment headers 8 here, AH 24.
"""
from __future__ import annotations

import socket

import pytest

from bpfilter.model import Family
from bpfilter.packet import ipv6_probe
from bpfilter.packet.ipv6_probe import walk_bounded_by_packet
from bpfilter_lab.packets import (AuthenticationHeader, DestinationOptions, Fragment, HopByHop,
                                  Packet, Routing, icmpv6_error, mld_query,
                                  neighbour_solicitation)
from verdicts import (ACCEPT, DROP, FWD, IN, OUT, TEMPLATED6, case, kernel_agrees,
                      listing_agrees, output_only, run_case, templated_case)

pytestmark = pytest.mark.kernel

A, B = "2001:db8:1::3", "2001:db8:7::8"   # default source and destination
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
MSS = b"\x02\x04\x05\xb4"              # tcp option 2 (maximum segment size), 4 bytes


def tcp(dport=80, sport=40000, flags=SYN, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "tcp", sport=sport, dport=dport, tcp_flags=flags, **kw)


def udp(dport=53, sport=40000, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "udp", sport=sport, dport=dport, **kw)


def icmp6(type_=128, code=0, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "icmpv6", icmp_type=type_, icmp_code=code, **kw)


def raw(proto: int, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, proto, **kw)


def v6case(name, rules, steps, counters, crafted=()):
    return case(name, rules, steps, counters, crafted, family=Family.IPV6)


HBH, DST, RT0, AH = HopByHop(), DestinationOptions(), Routing(type=0), AuthenticationHeader()
FIRST, LATER = Fragment(offset=0, more=True), Fragment(offset=8)
EIGHT_BYTES_ON = Fragment(offset=1)   # IPv4's "evil" tcp offset, but IPv6 counts bytes
EVERY_HEADER = (HBH, DST, RT0, FIRST, AH, DST)   # 64 bytes
OVERRUN = DestinationOptions(ext_len=9)   # claims 80 bytes; 24 follow


def overrun_case(bounded: bool):
    """An extension header longer than the rest of the packet: a kernel with the stable
    fix fails the walk there (-p drops the packet), an older one steps past the end and
    takes the next header for the protocol."""
    walk = "bounded" if bounded else "unbounded"
    return v6case(f"an extension header overrunning the packet ({walk} walk)",
                  "-A OUTPUT -p udp -j ACCEPT\n:OUTPUT DROP",
                  (OUT, udp(ext=(OVERRUN,)), DROP if bounded else ACCEPT),
                  {} if bounded else {"OUTPUT 1": (1, 72)})

def addr(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


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
-A C -s 2001:db8:1::/48 -j DROP
"""

CASES = [
    # -- addresses: ((packet ^ address) & mask) != 0 fails ---------------------------
    v6case("-s with a prefix", "-A OUTPUT -s 2001:db8:1::/48 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(src="2001:db8:2::3"), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("a prefix off a byte boundary: /45 edges", "-A OUTPUT -d 2001:db8:8::/45 -j DROP",
           [(OUT, udp(dst="2001:db8:8::"), DROP), (OUT, udp(dst="2001:db8:f:ffff::1"), DROP),
            (OUT, udp(dst="2001:db8:7:ffff::1"), ACCEPT), (OUT, udp(dst="2001:db8:10::"), ACCEPT)],
           {"OUTPUT 1": (2, 128), "OUTPUT policy": (2, 128)}),
    v6case("-d /128 and its inversion",
           "-A OUTPUT -d 2001:db8:7::8/128 -j DROP\n-A OUTPUT ! -d 2001:db8:7::9 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(dst="2001:db8:7::9"), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("::/0 matches anything, ! ::/0 nothing",
           "-A OUTPUT ! -s ::/0 -j DROP\n-A OUTPUT -d ::/0 -j DROP",
           (OUT, udp(dst="fe80::1"), DROP), {"OUTPUT 2": (1, 64)}),
    v6case("a mask of any shape: only its bits are compared",
           "-A OUTPUT -d 2001:db8::8/ffff:ffff::ffff -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(dst="2001:db8:1234::8"), DROP),
            (OUT, udp(dst="2001:db8:7::9"), ACCEPT), (OUT, udp(dst="2001:db9:7::8"), ACCEPT)],
           {"OUTPUT 1": (2, 128), "OUTPUT policy": (2, 128)}),
    v6case("address bits outside the mask are ignored (ip6tables clears them; the blob "
           "need not)",
           "-A OUTPUT -s 2001:db8:1::/48 -j DROP\n-A OUTPUT ! -d 2001:db8:7::/48 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(src="2001:db8:2::3"), ACCEPT),
            (OUT, udp(src="2001:db8:2::3", dst="2001:db8:8::8"), DROP)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 64), "OUTPUT policy": (1, 64)},
           crafted=[("OUTPUT 1", None, 0, addr("2001:db8:1:ff::3")),
                    ("OUTPUT 2", None, 16, addr("2001:db8:7:ffff::1"))]),
    v6case("source and destination both needed",
           "-A OUTPUT -s 2001:db8:1::/48 -d 2001:db8:7::/48 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(dst="2001:db8:8::8"), ACCEPT),
            (OUT, udp(src="2001:db8:2::3"), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (2, 128)}),
    # -- interfaces (test runs see out = lo at every hook) -----------------------------
    v6case("-o with +", "-A OUTPUT -o l+ -j DROP", (OUT, udp(), DROP), {"OUTPUT 1": (1, 64)}),
    v6case("-o lo, ! -o lo", "-A OUTPUT ! -o lo -j DROP\n-A OUTPUT -o lo",
           (OUT, udp(), ACCEPT), {"OUTPUT 2": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("-o lo0 (longer) and -o lo+ (prefix equal to the name)",
           "-A OUTPUT -o lo0 -j DROP\n-A OUTPUT -o lo+",
           (OUT, udp(), ACCEPT), {"OUTPUT 2": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("! -o eth+", "-A OUTPUT ! -o eth+ -j DROP", (OUT, udp(), DROP),
           {"OUTPUT 1": (1, 64)}),
    v6case("-o lo at FORWARD", "-A FORWARD -o lo -j DROP", (FWD, udp(), DROP),
           {"FORWARD 1": (1, 64)}),
    # -- -p: names, numbers, all, and the extension headers -------------------------
    v6case("-p by number", "-A OUTPUT -p 17 -j DROP",
           [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 76)}),
    v6case("-p icmpv6, ipv6-icmp and 58 are one protocol",
           "-A OUTPUT -p icmpv6\n-A OUTPUT -p ipv6-icmp\n-A OUTPUT -p 58 -j DROP",
           [(OUT, icmp6(), DROP), (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 64), "OUTPUT 3": (1, 64),
            "OUTPUT policy": (1, 64)}),
    v6case("-p all matches whatever can be walked, no next header included",
           "-A OUTPUT -p all -j DROP",
           [(OUT, raw(59, ext=(DST,)), DROP), (OUT, raw(47), DROP), (OUT, tcp(ext=(LATER,)), DROP)],
           {"OUTPUT 1": (3, 64 + 56 + 64)}),
    v6case("-p 0 is -p all, not hop-by-hop", "-A OUTPUT -p 0 -j DROP",
           [(OUT, udp(ext=(HBH,)), DROP), (OUT, udp(), DROP)], {"OUTPUT 1": (2, 136)}),
    v6case("-p of an extension header never matches, its inversion always does",
           "-A OUTPUT -p 44 -j DROP\n-A OUTPUT ! -p 43",
           [(OUT, udp(ext=(FIRST,)), ACCEPT), (OUT, udp(ext=(RT0,)), ACCEPT),
            (OUT, udp(ext=(LATER,)), ACCEPT)],
           {"OUTPUT 2": (3, 72 + 72 + 64), "OUTPUT policy": (3, 72 + 72 + 64)}),
    v6case("-p 47: a protocol without a header", "-A OUTPUT -p 47 -j DROP",
           [(OUT, raw(47, ext=(HBH, DST)), DROP), (OUT, raw(48), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT policy": (1, 56)}),
    v6case("-p udp past hop-by-hop, destination options and routing headers",
           "-A OUTPUT -p udp -j DROP",
           [(OUT, udp(ext=(HBH, DST, RT0)), DROP), (OUT, tcp(ext=(HBH,)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT policy": (1, 84)}),
    v6case("-p tcp --dport past AH", "-A OUTPUT -p tcp --dport 22 -j DROP",
           [(OUT, tcp(dport=22, ext=(AH,)), DROP), (OUT, tcp(dport=23, ext=(AH,)), ACCEPT)],
           {"OUTPUT 1": (1, 100), "OUTPUT policy": (1, 100)}),
    v6case("AH counts its length in 4-byte words, the others in 8-byte ones",
           "-A OUTPUT -p udp --dport 53 -j DROP",
           [(OUT, udp(ext=(AuthenticationHeader(icv=bytes(4)), DST)), DROP),
            (OUT, udp(dport=54, ext=(AuthenticationHeader(icv=bytes(20)),)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT policy": (1, 96)}),
    v6case("a transport header past every kind of extension header",
           "-A OUTPUT -p tcp --dport 80 --tcp-flags SYN,ACK SYN -j DROP",
           [(OUT, tcp(ext=EVERY_HEADER), DROP), (OUT, tcp(dport=81, ext=EVERY_HEADER), ACCEPT)],
           {"OUTPUT 1": (1, 140), "OUTPUT policy": (1, 140)}),
    v6case("-p ipv6-nonxt", "-A OUTPUT -p ipv6-nonxt -j DROP",
           [(OUT, raw(59, ext=(DST,)), DROP), (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("! -p tcp", "-A OUTPUT ! -p tcp -j DROP",
           [(OUT, tcp(), ACCEPT), (OUT, udp(ext=(HBH,)), DROP)],
           {"OUTPUT 1": (1, 72), "OUTPUT policy": (1, 76)}),
    v6case("! -p tcp drops what cannot be walked too, uncounted",
           "-A OUTPUT ! -p tcp -j ACCEPT",
           (OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), DROP), {}),
    v6case("-p all drops what cannot be walked, uncounted",
           "-A OUTPUT -p all -j ACCEPT\n:OUTPUT DROP",
           [(OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), DROP),
            (OUT, udp(ext=(HBH,)), ACCEPT)],
           {"OUTPUT 1": (1, 72)}),
    v6case("a routing header cut short cannot be walked (it needs 4 bytes)",
           "-A OUTPUT -p all -j ACCEPT",
           (OUT, udp(ext=(RT0,), truncate_ext=3, payload_len=0), DROP), {}),
    v6case("a rule without -p does not walk", "-A OUTPUT -j ACCEPT\n:OUTPUT DROP",
           (OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), ACCEPT),
           {"OUTPUT 1": (1, 41)}),
    v6case("an unwalkable chain drops only where the addresses matched",
           "-A OUTPUT -d 2001:db8:9::/48 -p udp -j ACCEPT\n-A OUTPUT -j DROP",
           [(OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), DROP),
            (OUT, udp(dst="2001:db8:9::1", ext=(HBH,), truncate_ext=1, payload_len=0), DROP)],
           {"OUTPUT 2": (1, 41)}),
    overrun_case(walk_bounded_by_packet()),
    v6case("a udp header past an overrunning header is not there, on either walk",
           "-A OUTPUT -p udp --dport 53 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           (OUT, udp(ext=(OVERRUN,)), DROP), {}),
    # -- fragments: a later one has its protocol, at a byte offset, and no header ------
    v6case("a first fragment carries its transport header",
           "-A OUTPUT -p udp --dport 53 -j DROP",
           [(OUT, udp(ext=(FIRST,)), DROP)], {"OUTPUT 1": (1, 72)}),
    v6case("a later fragment: the protocol, but no ports",
           "-A OUTPUT -p udp --dport 53 -j DROP\n-A OUTPUT -p udp -j ACCEPT\n:OUTPUT DROP",
           [(OUT, udp(ext=(LATER,)), ACCEPT)], {"OUTPUT 2": (1, 64)}),
    v6case("a later fragment followed by an extension header cannot be walked",
           "-A OUTPUT -p udp -j ACCEPT",
           [(OUT, udp(ext=(Fragment(offset=8, next_header=60),)), DROP)], {}),
    v6case("tcp 8 bytes on is no 'evil' fragment in IPv6 (offsets count bytes)",
           "-A OUTPUT -p tcp --dport 80 -j ACCEPT\n-A OUTPUT -p tcp -j DROP",
           (OUT, tcp(ext=(EIGHT_BYTES_ON,)), DROP), {"OUTPUT 2": (1, 64)}),
    v6case("later fragments match neither multiport nor icmp6, and are not dropped",
           "-A OUTPUT -p udp -m multiport --ports 53\n"
           "-A OUTPUT -p udp -m multiport ! --ports 53\n"
           "-A OUTPUT -p icmpv6 ! --icmpv6-type 1\n-A OUTPUT -j DROP",
           [(OUT, udp(ext=(LATER,)), DROP), (OUT, icmp6(ext=(LATER,)), DROP)],
           {"OUTPUT 4": (2, 128)}),
    # -- truncated transport headers: the match's hotdrop ------------------------------
    v6case("udp with a truncated header is dropped by its match",
           "-A OUTPUT -p udp --dport 53 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, udp(truncate_l4=4, payload_len=0), DROP)], {}),
    v6case("truncated tcp past extension headers: dropped, counted where no match read it",
           "-A OUTPUT -p tcp\n-A OUTPUT -p tcp --dport 80 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           (OUT, tcp(ext=(HBH, DST), truncate_l4=19, payload_len=0), DROP),
           {"OUTPUT 1": (1, 75)}),
    v6case("no hotdrop when the addresses fail first",
           "-A OUTPUT -s 2001:db8:2::/48 -p tcp --dport 80 -j DROP",
           (OUT, tcp(truncate_l4=10, payload_len=0), ACCEPT), {"OUTPUT policy": (1, 50)}),
    v6case("no hotdrop when the protocol fails first", "-A OUTPUT -p udp --dport 53 -j DROP",
           (OUT, tcp(truncate_l4=4, payload_len=0), ACCEPT), {"OUTPUT policy": (1, 44)}),
    v6case("truncated icmpv6 hotdrops", "-A OUTPUT -p icmpv6 ! --icmpv6-type 1 -j ACCEPT",
           (OUT, icmp6(truncate_l4=2, payload_len=0), DROP), {}),
    v6case("a hotdrop inside a user chain", ":X -\n-A OUTPUT -j X\n-A X -p udp --dport 53",
           (OUT, udp(ext=(DST,), truncate_l4=7, payload_len=0), DROP), {"OUTPUT 1": (1, 55)}),
    # -- tcp --------------------------------------------------------------------------
    v6case("tcp ports: a range, and an inverted one",
           "-A OUTPUT -p tcp --sport 1000:2000 -j DROP\n-A OUTPUT -p tcp ! --dport 80 -j DROP",
           [(OUT, tcp(sport=1000), DROP), (OUT, tcp(sport=2001), ACCEPT),
            (OUT, tcp(sport=2001, dport=81), DROP)],
           {"OUTPUT 1": (1, 76), "OUTPUT 2": (1, 76), "OUTPUT policy": (1, 76)}),
    v6case("tcp --tcp-flags and its inversion",
           "-A OUTPUT -p tcp --tcp-flags SYN,ACK SYN -j DROP\n"
           "-A OUTPUT -p tcp ! --tcp-flags ALL FIN,PSH,URG -j ACCEPT\n:OUTPUT DROP",
           [(OUT, tcp(flags=SYN | PSH), DROP), (OUT, tcp(flags=SYN | ACK), ACCEPT),
            (OUT, tcp(flags=FIN | PSH | URG), DROP)],
           {"OUTPUT 1": (1, 76), "OUTPUT 2": (1, 76), "OUTPUT policy": (1, 76)}),
    v6case("tcp --syn and ! --syn",
           "-A OUTPUT -p tcp --syn -j DROP\n-A OUTPUT -p tcp ! --syn -j ACCEPT\n:OUTPUT DROP",
           [(OUT, tcp(), DROP), (OUT, tcp(flags=SYN | ACK), ACCEPT),
            (OUT, tcp(flags=SYN | RST), ACCEPT)],
           {"OUTPUT 1": (1, 76), "OUTPUT 2": (2, 152)}),
    v6case("--tcp-option finds an option past extension headers (read at thoff)",
           "-A OUTPUT -p tcp --tcp-option 2 -j DROP\n-A OUTPUT -p tcp ! --tcp-option 8",
           [(OUT, tcp(ext=(HBH, DST), tcp_options=MSS), DROP),
            (OUT, tcp(ext=(AH,), tcp_options=b"\x01\x08\x0a\x00"), ACCEPT)],
           {"OUTPUT 1": (1, 96), "OUTPUT policy": (1, 104)}),
    v6case("--tcp-option hotdrops a data offset under 5 words, past AH",
           "-A OUTPUT -p tcp --tcp-option 2 -j ACCEPT",
           (OUT, tcp(ext=(AH,), tcp_doff=4), DROP), {}),
    v6case("--tcp-option hotdrops options cut short by the packet's end",
           "-A OUTPUT -p tcp ! --tcp-option 3 -j ACCEPT",
           (OUT, tcp(ext=(HBH,), tcp_doff=15, payload_len=8), DROP), {}),
    # -- udp --------------------------------------------------------------------------
    v6case("udp ports past a routing header with segments left",
           "-A OUTPUT -p udp --sport 1024:65535 ! --dport 53 -j DROP",
           [(OUT, udp(dport=54, ext=(Routing(0, 1, (B,)),)), DROP),
            (OUT, udp(ext=(Routing(0, 1, (B,)),)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT policy": (1, 88)}),
    # -- multiport --------------------------------------------------------------------
    v6case("multiport --dports and --ports past extension headers",
           "-A OUTPUT -p tcp -m multiport --dports 22,80:90 -j DROP\n"
           "-A OUTPUT -p udp -m multiport --ports 53,123 -j DROP",
           [(OUT, tcp(dport=85, ext=(HBH,)), DROP), (OUT, tcp(dport=91), ACCEPT),
            (OUT, udp(dport=9, sport=123, ext=(DST, AH)), DROP), (OUT, udp(dport=54), ACCEPT)],
           {"OUTPUT 1": (1, 84), "OUTPUT 2": (1, 96), "OUTPUT policy": (2, 140)}),
    v6case("multiport ! --sports", "-A OUTPUT -p udp -m multiport ! --sports 1:1023 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(sport=53), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("multiport reads 4 bytes of tcp, and drops fewer",
           "-A OUTPUT -p tcp -m multiport --dports 80 -j DROP\n-A OUTPUT -j ACCEPT",
           [(OUT, tcp(ext=(HBH,), truncate_l4=4, payload_len=0), DROP),
            (OUT, tcp(ext=(HBH,), truncate_l4=3, payload_len=0), DROP)],
           {"OUTPUT 1": (1, 52)}),
    v6case("multiport on sctp reads its two ports",
           "-A OUTPUT -p sctp -m multiport --sports 0 -j DROP",
           (OUT, raw(132), DROP), {"OUTPUT 1": (1, 56)}),
    # -- icmp6: iptables' names, type and codes ---------------------------------------
    v6case("icmp6 type and code", "-A OUTPUT -p ipv6-icmp --icmpv6-type 1/4 -j DROP",
           [(OUT, icmp6(1, 4), DROP), (OUT, icmp6(1, 3), ACCEPT), (OUT, icmp6(128), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (2, 128)}),
    v6case("icmp6 has no 'any' type 255", "-A OUTPUT -p ipv6-icmp --icmpv6-type 255 -j DROP",
           [(OUT, icmp6(255), DROP), (OUT, icmp6(1), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("icmp6 names: a type is every code, a code name one code",
           "-A OUTPUT -p icmpv6 --icmpv6-type echo-request\n"
           "-A OUTPUT -p icmpv6 --icmpv6-type port-unreachable\n"
           "-A OUTPUT -p icmpv6 --icmpv6-type destination-unreachable\n"
           "-A OUTPUT -p icmpv6 --icmpv6-type neighbour-solicitation -j DROP\n"
           "-A OUTPUT -p icmpv6 ! --icmpv6-type packet-too-big -j ACCEPT\n:OUTPUT DROP",
           [(OUT, icmp6(128, 9), ACCEPT), (OUT, icmp6(1, 4), ACCEPT), (OUT, icmp6(1, 6), ACCEPT),
            (OUT, neighbour_solicitation(A, B, B, "02:bf:00:00:01:02"), DROP),
            (OUT, icmp6(2), DROP)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 64), "OUTPUT 3": (2, 128),
            "OUTPUT 4": (1, 72), "OUTPUT 5": (3, 192), "OUTPUT policy": (1, 64)}),
    v6case("an ICMPv6 error quoting a packet is its own type",
           "-A OUTPUT -p icmpv6 --icmpv6-type time-exceeded -j DROP\n"
           "-A OUTPUT -p udp -j DROP",
           [(OUT, icmpv6_error(A, B, udp(src=B, dst=A), icmp_type=3), DROP),
            (OUT, icmpv6_error(A, B, udp(src=B, dst=A)), ACCEPT)],
           {"OUTPUT 1": (1, 112), "OUTPUT policy": (1, 112)}),
    v6case("an MLD query's type past its hop-by-hop router alert",
           "-A OUTPUT -p icmpv6 --icmpv6-type 130 -m hl --hl-eq 1 -j DROP",
           (OUT, mld_query(A, B), DROP), {"OUTPUT 1": (1, 72)}),
    # -- hl ---------------------------------------------------------------------------
    v6case("hl", "-A OUTPUT -m hl --hl-lt 10 -j DROP",
           [(OUT, udp(ttl=9), DROP), (OUT, udp(ttl=10), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("hl --hl-eq, ! --hl-eq, --hl-gt",
           "-A OUTPUT -m hl --hl-eq 0\n-A OUTPUT -m hl ! --hl-eq 64\n"
           "-A OUTPUT -m hl --hl-gt 254 -j DROP",
           [(OUT, udp(ttl=0), ACCEPT), (OUT, udp(ttl=64), ACCEPT), (OUT, udp(ttl=255), DROP)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (2, 128), "OUTPUT 3": (1, 64),
            "OUTPUT policy": (2, 128)}),
    # -- the traffic class: dscp, tos, ecn -------------------------------------------
    v6case("dscp and tos read the traffic class, across the version and flow label",
           "-A OUTPUT -m dscp --dscp 0x2e -j DROP\n-A OUTPUT -m tos --tos 0x03/0x03 -j DROP",
           [(OUT, udp(tos=0xB9), DROP), (OUT, udp(tos=0x03, flow_label=0xFFFFF), DROP),
            (OUT, udp(tos=0x02, flow_label=0xFFFFF), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("ecn: the ECT codepoint, and ECE read from the tcp header",
           "-A OUTPUT -m ecn ! --ecn-ip-ect 0 -j DROP\n"
           "-A OUTPUT -p tcp -m ecn --ecn-tcp-ece -j DROP",
           [(OUT, udp(tos=0x01), DROP), (OUT, tcp(flags=SYN | 0x40), DROP),
            (OUT, tcp(flags=SYN), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 76), "OUTPUT policy": (1, 76)}),

    v6case("tcpmss past extension headers; a short header drops",
           "-A OUTPUT -p tcp -m tcpmss --mss 1460 -j DROP\n-A OUTPUT -p tcp -j ACCEPT\n"
           ":OUTPUT DROP",
           [(OUT, tcp(tcp_options=MSS, ext=(HBH, DST)), DROP), (OUT, tcp(), ACCEPT),
            (OUT, tcp(truncate_l4=19), DROP)],
           {"OUTPUT 1": (1, 96), "OUTPUT 2": (1, 76)}),

    # -- mark (test runs and the kernel's raw socket send with mark 0) ----------------
    v6case("mark: values, masks, inversion",
           "-A OUTPUT -m mark --mark 1\n-A OUTPUT -m mark ! --mark 0xffffffff\n"
           "-A OUTPUT -m mark --mark 0x10/0x10\n-A OUTPUT -m mark --mark 0/0xff0 -j DROP",
           (OUT, udp(), DROP), {"OUTPUT 2": (1, 64), "OUTPUT 4": (1, 64)}),
    # -- pkttype (locally sent packets are PACKET_HOST, multicast or not) -------------
    v6case("pkttype at OUTPUT", "-A OUTPUT -m pkttype --pkt-type multicast\n"
           "-A OUTPUT -m pkttype ! --pkt-type broadcast\n"
           "-A OUTPUT -m pkttype --pkt-type unicast -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(dst="ff0e::1"), DROP)],
           {"OUTPUT 2": (2, 128), "OUTPUT 3": (2, 128)}),
    v6case("pkttype at INPUT: a frame to our MAC is unicast",
           "-A INPUT -m pkttype --pkt-type unicast -j DROP", (IN, udp(), DROP),
           {"INPUT 1": (1, 64)}),
    # -- mac (test runs see the loopback device, not Ethernet: see test_differential) -
    v6case("--mac-source never matches on a non-Ethernet device, inverted or not",
           "-A INPUT -m mac --mac-source 02:bf:00:00:01:02 -j DROP\n"
           "-A INPUT -m mac ! --mac-source 02:bf:00:00:01:02 -j DROP",
           (IN, udp(), ACCEPT), {"INPUT policy": (1, 64)}),
    # -- comment, limit ---------------------------------------------------------------
    v6case("comment changes nothing", "-A OUTPUT -p udp -m comment --comment \"v6 dns\" -j DROP",
           [(OUT, udp(), DROP), (OUT, tcp(), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 76)}),
    v6case("limit: the burst passes, then the bucket is empty",
           "-A OUTPUT -p udp -m limit --limit 1/hour --limit-burst 2 -j DROP",
           [(OUT, udp(), DROP)] * 2 + [(OUT, tcp(), ACCEPT), (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (2, 128), "OUTPUT policy": (2, 140)}),
    # -- iprange: 128-bit numbers, compared word by word ------------------------------
    v6case("iprange --src-range edges",
           "-A OUTPUT -m iprange --src-range 2001:db8:1::3-2001:db8:1::1:0 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(src="2001:db8:1::1:0"), DROP),
            (OUT, udp(src="2001:db8:1::ffff"), DROP), (OUT, udp(src="2001:db8:1::2"), ACCEPT),
            (OUT, udp(src="2001:db8:1::1:1"), ACCEPT)],
           {"OUTPUT 1": (3, 192), "OUTPUT policy": (2, 128)}),
    v6case("iprange across 32-bit words: the first word that differs decides",
           "-A OUTPUT -m iprange --dst-range 2001:db8:7::ffff:fff0-2001:db8:7:0:1::f -j DROP",
           [(OUT, udp(dst="2001:db8:7::ffff:ffff"), DROP),
            (OUT, udp(dst="2001:db8:7::1:0:0"), DROP), (OUT, udp(dst="2001:db8:7:0:1::"), DROP),
            (OUT, udp(dst="2001:db8:7:0:1::10"), ACCEPT),
            (OUT, udp(dst="2001:db8:7::ffff:ffef"), ACCEPT),
            (OUT, udp(dst="2001:db8:6:ffff:ffff::"), ACCEPT)],
           {"OUTPUT 1": (3, 192), "OUTPUT policy": (3, 192)}),
    v6case("iprange above 8000:: (words with their top bit set)",
           "-A OUTPUT -m iprange --src-range fe80::1-fe80::ffff:ffff:ffff:ffff -j DROP",
           [(OUT, udp(src="fe80::1"), DROP), (OUT, udp(src="fe80::8000:0:0:0"), DROP),
            (OUT, udp(src="fe80::"), ACCEPT), (OUT, udp(src="fe80:0:0:1::"), ACCEPT),
            (OUT, udp(src="7e80::1"), ACCEPT)],
           {"OUTPUT 1": (2, 128), "OUTPUT policy": (3, 192)}),
    v6case("iprange ! --src-range with --dst-range, both needed",
           "-A OUTPUT -m iprange ! --src-range 2001:db8:1::-2001:db8:1::ff "
           "--dst-range 2001:db8:7::-2001:db8:7::ffff -j DROP",
           [(OUT, udp(src="2001:db8:1::100"), DROP), (OUT, udp(), ACCEPT),
            (OUT, udp(src="2001:db8:1::100", dst="2001:db8:8::8"), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (2, 128)}),
    v6case("iprange reversed never matches, its inversion always; one address; everything",
           "-A OUTPUT -m iprange --src-range 2001:db8:1::9-2001:db8:1::1 -j DROP\n"
           "-A OUTPUT -m iprange ! --src-range 2001:db8:1::9-2001:db8:1::1\n"
           "-A OUTPUT -m iprange --dst-range 2001:db8:7::8\n"
           "-A OUTPUT -m iprange --dst-range ::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff\n"
           "-A OUTPUT -m iprange ! --dst-range ::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
           (OUT, udp(src="2001:db8:1::5"), ACCEPT),
           {"OUTPUT 2": (1, 64), "OUTPUT 3": (1, 64), "OUTPUT 4": (1, 64),
            "OUTPUT policy": (1, 64)}),
    v6case("iprange as ip6tables spells addresses (inet_ntop: IPv4-mapped, ...)",
           "-A OUTPUT -m iprange --dst-range ::ffff:10.0.0.1-::ffff:10.0.0.9 -j DROP\n"
           "-A OUTPUT -m iprange --src-range ::1.2.3.4-::2 -j DROP",
           (OUT, udp(), ACCEPT), {"OUTPUT policy": (1, 64)}),
    # -- length: skb->len (length_mt6), not the header's payload length ----------------
    v6case("length: edges of a range, and its inversion",
           "-A OUTPUT -m length --length 64:75 -j DROP\n-A OUTPUT -m length ! --length 0:76",
           [(OUT, udp(), DROP), (OUT, udp(payload_len=27), DROP), (OUT, tcp(), ACCEPT),
            (OUT, udp(payload_len=15), ACCEPT), (OUT, udp(payload_len=29), ACCEPT)],
           {"OUTPUT 1": (2, 139), "OUTPUT 2": (1, 77), "OUTPUT policy": (3, 216)}),
    v6case("length is the packet's, whatever its header says",
           "-A OUTPUT -m length --length 48\n-A OUTPUT -m length --length 1040\n"
           "-A OUTPUT -m length --length 64 -j DROP",
           [(OUT, udp(stated_length=8), DROP), (OUT, udp(stated_length=1000), DROP)],
           {"OUTPUT 3": (2, 128)}),
    v6case("length of later fragments and unwalkable packets too (no walk)",
           "-A OUTPUT -m length --length 41 -j DROP\n-A OUTPUT -m length --length 64 -j DROP",
           [(OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), DROP),
            (OUT, udp(ext=(LATER,)), DROP)],
           {"OUTPUT 1": (1, 41), "OUTPUT 2": (1, 64)}),
    # -- chains -----------------------------------------------------------------------
    v6case("nested 3 deep: verdict from the deepest chain", NESTED,
           (OUT, tcp(), DROP),
           {"OUTPUT 1": (1, 76), "A 1": (1, 76), "B 1": (1, 76), "C 1": (1, 76)}),
    v6case("nested 3 deep: verdict from the middle chain, past extension headers", NESTED,
           (OUT, tcp(src="2001:db8:2::3", dport=22, ext=(HBH, AH)), ACCEPT),
           {"OUTPUT 1": (1, 108), "A 1": (1, 108), "B 1": (1, 108), "C return": (1, 108),
            "B 2": (1, 108)}),
    v6case("nested 3 deep: every chain returns", NESTED,
           (OUT, tcp(src="2001:db8:2::3", dport=80), DROP),
           {"OUTPUT 1": (1, 76), "A 1": (1, 76), "B 1": (1, 76), "C return": (1, 76),
            "B return": (1, 76), "A return": (1, 76), "OUTPUT 2": (1, 76)}),
    v6case("-g B from A: B's return skips the rest of A; RETURN in a built-in chain",
           ":OUTPUT DROP\n:A -\n:B -\n-A OUTPUT -p icmpv6 -j RETURN\n-A OUTPUT -j A\n"
           "-A OUTPUT -j ACCEPT\n-A A -g B\n-A A -j DROP\n-A B -p udp -j DROP",
           [(OUT, icmp6(), DROP), (OUT, tcp(), ACCEPT), (OUT, udp(), DROP)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64), "OUTPUT 2": (2, 140),
            "A 1": (2, 140), "B return": (1, 76), "OUTPUT 3": (1, 76), "B 1": (1, 64)}),
    v6case("a chain's walk fails where its rule first names a protocol",
           ":X -\n-A OUTPUT -j X\n-A OUTPUT -j ACCEPT\n-A X -s 2001:db8:1::/48\n"
           "-A X -p all -j RETURN",
           (OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), DROP),
           {"OUTPUT 1": (1, 41), "X 1": (1, 41)}),
    # -- other hooks ------------------------------------------------------------------
    v6case("INPUT and FORWARD",
           ":INPUT DROP\n-A INPUT -p tcp --dport 22 -j ACCEPT\n"
           "-A FORWARD -d 2001:db8:7::/48 -p udp -j DROP",
           [(IN, tcp(dport=22, ext=(HBH,)), ACCEPT), (IN, tcp(dport=23), DROP),
            (FWD, udp(), DROP), (FWD, udp(dst="2001:db8:8::1"), ACCEPT)],
           {"INPUT 1": (1, 84), "INPUT policy": (1, 76), "FORWARD 1": (1, 64),
            "FORWARD policy": (1, 64)}),
    # chain templates (compiler/templates.py): 10 chains of each shape, their IPv6
    # addresses, ports, probability and the instance they jump to read from a record
    templated_case(v6case, tcp, TEMPLATED6, "2001:db8:7::{}", "2001:db8:1::4", 76),
]

# A packet whose extension headers cannot be walked: 41 bytes, a hop-by-hop header
# cut after its first byte.
def unwalkable(dst=B) -> Packet:
    return udp(dst=dst, ext=(HBH,), truncate_ext=1, payload_len=0)


IP6_PROTO, IP6_FLAGS = 128, 131   # offsets of ip6t_ip6's proto and flags

LONG_LISTS = [
    v6case("a run: the first prefix that matches, /32 to /128, not the longest",
           """-A OUTPUT -d 2001:db8:7::8/128 -j ACCEPT
              -A OUTPUT -d 2001:db8::/32 -j DROP
              -A OUTPUT -d 2001:db8:7::/48 -j ACCEPT
              -A OUTPUT -s 2001:db8:1::/64 -d 2001:db9::/56 -j DROP
              -A OUTPUT -d 2001:db9::/127 -j DROP""",
           [(OUT, udp(), ACCEPT), (OUT, udp(dst="2001:db8:7::9"), DROP),
            (OUT, udp(dst="2001:db9::1"), DROP), (OUT, udp(dst="2001:db9:0:100::1"), ACCEPT),
            (OUT, udp(src="2001:db8:2::3", dst="2001:db9::1"), DROP)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 64), "OUTPUT 4": (1, 64), "OUTPUT 5": (1, 64),
            "OUTPUT policy": (1, 64)}),
    v6case("a run: address bits outside the mask do not count",
           "-A OUTPUT -s 2001:db8:1::/48 -j DROP\n-A OUTPUT -d 2001:db8:5::/48 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(src="2001:db8:2::3"), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)},
           crafted=[("OUTPUT 1", None, 15, b"\x01")]),
    v6case("a run: a rule without -p looks at no protocol, whatever its field holds",
           "-A OUTPUT -d 2001:db8:7::/48 -j DROP\n-A OUTPUT -p udp -j ACCEPT",
           [(OUT, udp(), DROP), (OUT, unwalkable(), DROP),
            (OUT, udp(dst="2001:db8:6::1"), ACCEPT)],
           {"OUTPUT 1": (2, 105), "OUTPUT 2": (1, 64)},
           crafted=[("OUTPUT 1", None, IP6_PROTO, b"\x06\x00")]),
    v6case("a run: what cannot be walked is dropped by the first rule with -p whose "
           "addresses match, and matched by a rule without",
           """-A OUTPUT -d 2001:db8:9::/48 -j ACCEPT
              -A OUTPUT -d 2001:db8:7::/48 -p udp --dport 53 -j ACCEPT
              -A OUTPUT -d 2001:db8:8::/48 -p all -j ACCEPT
              -A OUTPUT -d 2001:db8:5::/48 -j DROP""",
           [(OUT, unwalkable("2001:db8:9::1"), ACCEPT), (OUT, unwalkable(), DROP),
            (OUT, unwalkable("2001:db8:8::1"), DROP), (OUT, unwalkable("2001:db8:5::1"), DROP),
            (OUT, unwalkable("2001:db8:6::1"), ACCEPT), (OUT, udp(dport=53), ACCEPT)],
           {"OUTPUT 1": (1, 41), "OUTPUT 2": (1, 64), "OUTPUT 4": (1, 41),
            "OUTPUT policy": (1, 41)}),
    v6case("a run: a short transport header is dropped by the first port rule whose ip "
           "part matches",
           """-A OUTPUT -d 2001:db8:5::/48 -p udp --dport 53 -j ACCEPT
              -A OUTPUT -s 2001:db8:1::3/128 -p tcp -j ACCEPT
              -A OUTPUT -p udp --dport 53 -j ACCEPT
              -A OUTPUT -p tcp --sport 1024:65535 --dport 80:89 -j DROP
              :OUTPUT DROP""",
           [(OUT, udp(truncate_l4=4, payload_len=0), DROP),
            (OUT, tcp(truncate_l4=12, payload_len=0), ACCEPT),
            (OUT, tcp(truncate_l4=12, payload_len=0, src="2001:db8:2::3"), DROP),
            (OUT, tcp(dport=81, src="2001:db8:2::3", ext=(FIRST,)), DROP)],
           {"OUTPUT 2": (1, 52), "OUTPUT 4": (1, 84)}),
    v6case("a run: a later fragment has the protocol but no ports, and offset 1 is "
           "8 bytes (no evil fragment)",
           """-A OUTPUT -p udp --dport 53 -j DROP
              -A OUTPUT -p tcp --dport 80 -j DROP
              -A OUTPUT -p tcp -j ACCEPT
              :OUTPUT DROP""",
           [(OUT, udp(ext=(LATER,)), DROP), (OUT, tcp(ext=(Fragment(offset=1),)), ACCEPT)],
           {"OUTPUT 3": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("a run in a user chain",
           """:blk -
              -A OUTPUT -j blk
              -A blk -d 2001:db8:7::/48 -p udp --dport 53 -j DROP
              -A blk -d 2001:db8:7::/48 -p udp --dport 54 -j ACCEPT
              -A blk -s 2001:db8:1::/48 -p tcp -j DROP""",
           [(OUT, udp(dport=53), DROP), (OUT, udp(dport=54), ACCEPT),
            (OUT, udp(dport=55), ACCEPT), (OUT, unwalkable(), DROP)],
           {"OUTPUT 1": (4, 233), "blk 1": (1, 64), "blk 2": (1, 64), "blk return": (1, 64),
            "OUTPUT policy": (1, 64)}),
    # every frame builds its lookup key in the main frame's: BPF's 512 bytes of stack
    # are shared by all 8 frames
    v6case("runs in user chains nested as deep as BPF allows",
           "\n".join([*(f":c{i} -" for i in range(1, 8)), "-A OUTPUT -j c1",
                      *(f"-A c{i} -d 2001:db8:9::/48 -j DROP\n-A c{i} -j c{i + 1}"
                        for i in range(1, 7)),
                      "-A c7 -d 2001:db8:9::/48 -j DROP", "-A c7 -p udp --dport 53 -j DROP"]),
           [(OUT, udp(dport=53), DROP), (OUT, udp(dport=54), ACCEPT)],
           {"OUTPUT 1": (2, 128), **{f"c{i} 2": (2, 128) for i in range(1, 7)},
            **{f"c{i} return": (1, 64) for i in range(1, 8)}, "c7 2": (1, 64),
            "OUTPUT policy": (1, 64)}),
]
CASES += LONG_LISTS

OUTPUT_ONLY = output_only(CASES)

# Rules only listed: what the cases above cannot send packets through (mac, owner)
# and more spellings.
LISTED = [
    v6case("listed as ip6tables lists them",
           "-A INPUT -m mac --mac-source 02:BF:00:00:01:02\n"
           "-A INPUT -m mac ! --mac-source 02:bf:00:00:01:03 -m pkttype ! --pkt-type otherhost\n"
           "-A INPUT -p tcp -m multiport ! --ports 22,1000:2000 -m length ! --length 80\n"
           "-A INPUT -p ipv6-icmp ! --icmpv6-type router-advertisement -m hl ! --hl-eq 255\n"
           "-A OUTPUT -m owner --uid-owner 0-99 --gid-owner 7 --socket-exists\n"
           "-A OUTPUT -m owner ! --uid-owner 1000 ! --socket-exists\n"
           "-A OUTPUT -p tcp ! --tcp-option 8 --tcp-flags ALL NONE -m limit --limit 5/sec\n"
           "-A OUTPUT -m iprange ! --dst-range ::-::ffff:0.0.0.1 -m mark ! --mark 0x10/0xf0",
           [], {}),
]


@pytest.mark.parametrize("how", ["walked", "classified", "multifield"])
@pytest.mark.parametrize("c", CASES)
def test_verdicts_and_counters(c, how, monkeypatch):
    run_case(c, how, monkeypatch)


@pytest.mark.parametrize("c", OUTPUT_ONLY)
def test_kernel_agrees(kernel_netns, c):
    kernel_agrees(kernel_netns, c)


@pytest.mark.parametrize("c", OUTPUT_ONLY + LISTED)
def test_listing_agrees(kernel_netns, c):
    listing_agrees(kernel_netns, c)


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded"])
def test_either_kernel_s_walk(bounded, monkeypatch):
    """Both ends of an overrunning header, whichever the running kernel has (the
    kernel itself checks its own through test_kernel_agrees)."""
    monkeypatch.setattr(ipv6_probe, "walk_bounded_by_packet", lambda: bounded)
    monkeypatch.setattr("bpfilter.packet.ipv6.walk_bounded_by_packet", lambda: bounded)
    run_case(overrun_case(bounded).values[0], "walked", monkeypatch)
