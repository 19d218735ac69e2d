"""Verdicts and counters of translated IPv6 filter tables (ip6_tables.c's semantics),
feature by feature; the machinery, and what a case is: verdicts.py.

The rule's ip part (ip6_packet_match()): addresses compared as ((packet ^ addr) &
mask), so address bits outside the mask do not matter (unlike IPv4); interfaces; and
`-p`, which walks the extension headers to the upper-layer protocol as
ipv6_find_hdr() does and drops the packet (uncounted) when the walk fails.

Long lists (LONG_LISTS): every case runs walked and classified (runs of one rule on,
verdicts.run_case); those cases aim at the tuple space's corners, each of which
the walked code and the kernel decide too.

Packet sizes (bpfilter_lab.packets.Packet, 16 payload bytes unless said): tcp 76,
udp 64, icmpv6 64; each extension header adds its bytes.
"""
from __future__ import annotations

import pytest

from bpfilter.model import Family
from bpfilter.packet import ipv6_probe
from bpfilter.packet.ipv6_probe import walk_bounded_by_packet
from bpfilter_lab.packets import (AuthenticationHeader, DestinationOptions, Fragment, HopByHop,
                                  Packet, Routing)
from verdicts import (ACCEPT, DROP, OUT, case, kernel_agrees, listing_agrees, output_only,
                      run_case)

pytestmark = pytest.mark.kernel

A, B = "2001:db8:1::3", "2001:db8:7::8"   # default source and destination
SYN = 0x02


def tcp(dport=80, sport=40000, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "tcp", sport=sport, dport=dport, tcp_flags=SYN, **kw)


def udp(dport=53, sport=40000, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "udp", sport=sport, dport=dport, **kw)


def icmp6(type_=128, code=0, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "icmpv6", icmp_type=type_, icmp_code=code, **kw)


def raw(proto: int, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, proto, **kw)


def v6case(name, rules, steps, counters, crafted=()):
    return case(name, rules, steps, counters, crafted, family=Family.IPV6)


HBH, DST, RT0 = HopByHop(), DestinationOptions(), Routing(type=0)
FIRST, LATER = Fragment(offset=0, more=True), Fragment(offset=8)
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

CASES = [
    # -- addresses and interfaces ---------------------------------------------------
    v6case("-s with a prefix", "-A OUTPUT -s 2001:db8:1::/48 -j DROP",
           [(OUT, udp(), DROP), (OUT, udp(src="2001:db8:2::3"), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("! -d", "-A OUTPUT ! -d 2001:db8:7::8 -j DROP",
           [(OUT, udp(), ACCEPT), (OUT, udp(dst="2001:db8:7::9"), DROP)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("-o with +", "-A OUTPUT -o l+ -j DROP", (OUT, udp(), DROP), {"OUTPUT 1": (1, 64)}),
    # -- -p and the extension headers ---------------------------------------------
    v6case("-p udp past hop-by-hop, destination options and routing headers",
           "-A OUTPUT -p udp -j DROP",
           [(OUT, udp(ext=(HBH, DST, RT0)), DROP), (OUT, tcp(ext=(HBH,)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT policy": (1, 84)}),
    v6case("-p tcp --dport past AH", "-A OUTPUT -p tcp --dport 22 -j DROP",
           [(OUT, tcp(dport=22, ext=(AuthenticationHeader(),)), DROP),
            (OUT, tcp(dport=23, ext=(AuthenticationHeader(),)), ACCEPT)],
           {"OUTPUT 1": (1, 100), "OUTPUT policy": (1, 100)}),
    v6case("-p ipv6-nonxt", "-A OUTPUT -p ipv6-nonxt -j DROP",
           [(OUT, raw(59, ext=(DST,)), DROP), (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("! -p tcp", "-A OUTPUT ! -p tcp -j DROP",
           [(OUT, tcp(), ACCEPT), (OUT, udp(ext=(HBH,)), DROP)],
           {"OUTPUT 1": (1, 72), "OUTPUT policy": (1, 76)}),
    v6case("-p all drops what cannot be walked, uncounted",
           "-A OUTPUT -p all -j ACCEPT\n:OUTPUT DROP",
           [(OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), DROP),
            (OUT, udp(ext=(HBH,)), ACCEPT)],
           {"OUTPUT 1": (1, 72)}),
    v6case("a rule without -p does not walk", "-A OUTPUT -j ACCEPT\n:OUTPUT DROP",
           (OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), ACCEPT),
           {"OUTPUT 1": (1, 41)}),
    v6case("an unwalkable chain drops only where the addresses matched",
           "-A OUTPUT -d 2001:db8:9::/48 -p udp -j ACCEPT\n-A OUTPUT -j DROP",
           [(OUT, udp(ext=(HBH,), truncate_ext=1, payload_len=0), DROP),
            (OUT, udp(dst="2001:db8:9::1", ext=(HBH,), truncate_ext=1, payload_len=0), DROP)],
           {"OUTPUT 2": (1, 41)}),
    overrun_case(walk_bounded_by_packet()),
    v6case("a first fragment carries its transport header",
           "-A OUTPUT -p udp --dport 53 -j DROP",
           [(OUT, udp(ext=(FIRST,)), DROP)], {"OUTPUT 1": (1, 72)}),
    v6case("a later fragment: the protocol, but no ports",
           "-A OUTPUT -p udp --dport 53 -j DROP\n-A OUTPUT -p udp -j ACCEPT\n:OUTPUT DROP",
           [(OUT, udp(ext=(LATER,)), ACCEPT)], {"OUTPUT 2": (1, 64)}),
    v6case("a later fragment followed by an extension header cannot be walked",
           "-A OUTPUT -p udp -j ACCEPT",
           [(OUT, udp(ext=(Fragment(offset=8, next_header=60),)), DROP)], {}),
    # -- transport matches ---------------------------------------------------------
    v6case("udp with a truncated header is dropped by its match",
           "-A OUTPUT -p udp --dport 53 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, udp(truncate_l4=4, payload_len=0), DROP)], {}),
    v6case("icmp6 type and code", "-A OUTPUT -p ipv6-icmp --icmpv6-type 1/4 -j DROP",
           [(OUT, icmp6(1, 4), DROP), (OUT, icmp6(1, 3), ACCEPT), (OUT, icmp6(128), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (2, 128)}),
    v6case("icmp6 has no 'any' type 255", "-A OUTPUT -p ipv6-icmp --icmpv6-type 255 -j DROP",
           [(OUT, icmp6(255), DROP), (OUT, icmp6(1), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("hl", "-A OUTPUT -m hl --hl-lt 10 -j DROP",
           [(OUT, udp(ttl=9), DROP), (OUT, udp(ttl=10), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
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


@pytest.mark.parametrize("how", ["walked", "classified", "multifield"])
@pytest.mark.parametrize("c", CASES)
def test_verdicts_and_counters(c, how, monkeypatch):
    run_case(c, how, monkeypatch)


@pytest.mark.parametrize("c", OUTPUT_ONLY)
def test_kernel_agrees(kernel_netns, c):
    kernel_agrees(kernel_netns, c)


@pytest.mark.parametrize("c", OUTPUT_ONLY)
def test_listing_agrees(kernel_netns, c):
    listing_agrees(kernel_netns, c)


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded"])
def test_either_kernel_s_walk(bounded, monkeypatch):
    """Both ends of an overrunning header, whichever the running kernel has (the
    kernel itself checks its own through test_kernel_agrees)."""
    monkeypatch.setattr(ipv6_probe, "walk_bounded_by_packet", lambda: bounded)
    monkeypatch.setattr("bpfilter.packet.ipv6.walk_bounded_by_packet", lambda: bounded)
    run_case(overrun_case(bounded).values[0], "walked", monkeypatch)
