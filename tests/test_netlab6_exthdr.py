"""The extension-header matches (rt, frag, hbh, dst, ipv6header, ah), esp, mh and eui64
on real packets between namespaces: the same ruleset in ip6tables-legacy and in
bpfilter, frames sent over veth into INPUT, through FORWARD (both ways) and out of
OUTPUT; arrivals and every counter must be identical (assert_identical), and the
arrivals are the ones written here.

Each hook's rules drop what one match says; every case is a packet one rule drops
(counted by it) or a packet that passes every rule (counted by the policy), plus
packets whose headers are cut short, which a match drops uncounted.
"""
from __future__ import annotations

import pytest

from bpfilter.model import Family
from bpfilter_lab.lab import S_IN6_ADDR as S
from bpfilter_lab.lab import T_IN6_ADDR as T
from bpfilter_lab.lab import S_IN_ADDR, T_IN_ADDR, Case, Lab
from bpfilter_lab.packets import (ROUTER_ALERT_MLD, AuthenticationHeader, DestinationOptions,
                                  Fragment, HopByHop, Option, Packet, Routing)
from test_differential import assert_identical
from test_ipv6_exthdr import NONE, Upper

pytestmark = pytest.mark.kernel

FAR, FARTHER = "2001:db8:7::7", "2001:db8:8::8"
# The modified EUI-64 of the sender's MACs (02:bf:00:00:01:02 on the way in,
# 02:bf:00:00:02:02 on the way back): ff:fe in the middle, the U/L bit flipped.
EUI_IN, EUI_OUT = "2001:db8:1:0:bf:ff:fe00:102", "2001:db8:1:0:bf:ff:fe00:202"

HBH, DST = HopByHop(), DestinationOptions()      # each a PadN of 4 bytes, 8 in all
DST16 = DestinationOptions((Option(30, bytes(10)),))
HBH16 = HopByHop((Option(30, bytes(10)),))
RA = HopByHop((ROUTER_ALERT_MLD,))               # options 5:2, then PadN 1:0


def udp(src=S, dst=T, **kw) -> Packet:
    return Packet(src, dst, "udp", dport=9, **kw)


def esp(spi: int, src=S, dst=T, **kw) -> Packet:
    return Upper(src, dst, 50, header=spi.to_bytes(4, "big") + bytes(4), **kw)


def mobility(mh_type: int, src=S, dst=T, **kw) -> Packet:
    return Upper(src, dst, 135, header=bytes([NONE, 0, mh_type, 0, 0, 0]), checksum_at=4, **kw)


# (rule, a packet it drops, a packet that passes the hook's every rule), per hook
INPUT = [
    ("-m rt --rt-type 0 --rt-segsleft 0", udp(ext=(Routing(0, 0, (FAR,)),)),
     udp(ext=(Routing(2, 0, (FAR,)),))),
    ("-m frag --fragfirst", udp(ext=(Fragment(more=True),)), udp(ext=(Fragment(offset=5),))),
    ("-m hbh --hbh-opts 5:2", udp(ext=(RA,)), udp(ext=(HBH,))),
    ("-m dst --dst-len 16", udp(ext=(DST16,)), udp(ext=(DST,))),
    ("-m ah --ahspi 9", udp(ext=(AuthenticationHeader(spi=9),)),
     udp(ext=(AuthenticationHeader(spi=10),))),
    ("-p esp -m esp --espspi 5", esp(5), esp(6)),
    ("-p mobility-header -m mh --mh-type 5", mobility(5), mobility(4)),
    ("-m ipv6header --header hop,route,prot", udp(ext=(HBH, Routing(2, 0, (FAR,)))),
     udp(ext=(HBH, DST))),
    ("-m eui64", udp(src=EUI_IN), udp()),
]
FORWARD = [
    (f"-m rt --rt-type 0 --rt-0-addrs {FAR},{FARTHER}",
     udp(dst=FAR, ext=(Routing(0, 2, (FAR, FARTHER)),)),
     udp(dst=FAR, ext=(Routing(0, 2, (FARTHER, FAR)),))),
    ("-m frag --fragid 7 --fraglast", udp(dst=FAR, ext=(Fragment(offset=8, ident=7),)),
     udp(dst=FAR, ext=(Fragment(offset=8, more=True, ident=7),))),
    ("-m hbh --hbh-len 16", udp(dst=FAR, ext=(HBH16,)), udp(dst=FAR, ext=(HBH,))),
    ("-m dst ! --dst-len 8", udp(dst=FAR, ext=(DST16,)), udp(dst=FAR, ext=(DST,))),
    ("-m ah ! --ahspi 9", udp(dst=FAR, ext=(AuthenticationHeader(spi=10),)),
     udp(dst=FAR, ext=(AuthenticationHeader(spi=9),))),
    ("-p esp -m esp --espspi 6:7", esp(7, dst=FAR), esp(8, dst=FAR)),
    ("-p mobility-header -m mh ! --mh-type 1:5", mobility(6, dst=FAR), mobility(2, dst=FAR)),
    ("-m ipv6header --header auth,dst --soft",
     udp(dst=FAR, ext=(DST, AuthenticationHeader(spi=9))), udp(dst=FAR)),
    ("-m eui64", udp(src=EUI_IN, dst=FAR), udp(dst=FAR)),
]
OUTPUT = [
    ("-m rt --rt-type 2", udp(T, FAR, ext=(Routing(2, 1, (FAR,)),)),
     udp(T, FAR, ext=(Routing(0, 0, (FAR,)),))),
    ("-m frag --fragmore", udp(T, FAR, ext=(Fragment(more=True),)),
     udp(T, FAR, ext=(Fragment(offset=8),))),
    ("-m hbh --hbh-opts 1:4", udp(T, FAR, ext=(HBH,)), udp(T, FAR, ext=(RA,))),
    ("-m dst --dst-opts 30:10", udp(T, FAR, ext=(DST16,)), udp(T, FAR, ext=(DST,))),
    ("-m ah --ahlen 24", udp(T, FAR, ext=(AuthenticationHeader(),)),
     udp(T, FAR, ext=(AuthenticationHeader(icv=bytes(4)),))),
    ("-p esp -m esp ! --espspi 5", esp(6, T, FAR), esp(5, T, FAR)),
    ("-p mobility-header -m mh --mh-type 0:3", mobility(3, T, FAR), mobility(4, T, FAR)),
    ("-m ipv6header --header none", Packet(T, FAR, NONE), Packet(T, FAR, NONE, ext=(DST,))),
]
PATHS = {"INPUT": ("input", INPUT), "FORWARD": ("forward", FORWARD), "OUTPUT": ("output", OUTPUT)}

RULESET = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                     ":OUTPUT ACCEPT [0:0]",
                     *(f"-A {chain} {rule} -j DROP" for chain, (_, rules) in PATHS.items()
                       for rule, _, _ in rules),
                     "COMMIT", ""])

# Packets a match drops without counting them: headers cut short, or claiming more
# than the packet holds; the rules before the one that drops them do not match.
HOTDROPS = [
    # hbh's header runs past the packet: the first rule's search for a routing
    # header fails reading past the end
    Case(udp(ext=(HopByHop(ext_len=9), DST)), "input"),
    # the routing header is cut inside its first four bytes
    Case(udp(dst=FAR, ext=(HBH, Routing(0, 2, (FAR, FARTHER))), truncate_ext=11), "forward"),
    # the fragment header is readable to its offset, not to its identification
    Case(udp(dst=FAR, ext=(Fragment(offset=8, ident=7),), truncate_ext=5), "forward"),
    # an authentication header claiming 56 bytes where 48 follow
    Case(udp(T, FAR, ext=(AuthenticationHeader(ext_len=12),)), "output"),
    # ESP cut inside its 8 bytes
    Case(Upper(T, FAR, 50, header=bytes(5), payload_len=0), "output"),
]


def cases() -> list[tuple[Case, bool]]:
    out = []
    for path, rules in PATHS.values():
        for _, dropped, passed in rules:
            out += [(Case(dropped, path), False), (Case(passed, path), True)]
    # eui64 the other way through FORWARD, from the other interface's MAC
    out.append((Case(udp(EUI_OUT, S), "reverse"), False))
    out += [(c, False) for c in HOTDROPS]
    return out


@pytest.fixture(scope="module")
def lab():
    with Lab({"kernel": "kernel", "bpfilter": "bpfilter"}) as lab:
        yield lab


def test_each_match_on_every_path(lab):
    both = cases()
    arrived = assert_identical(lab, RULESET, [c for c, _ in both], family=Family.IPV6)
    assert arrived["bpfilter"] == [a for _, a in both]


def test_cut_headers_are_dropped_uncounted(lab):
    lab.load(RULESET, Family.IPV6)
    arrived = lab.run(HOTDROPS)
    for target in lab.targets:
        assert arrived[target] == [False] * len(HOTDROPS), target
        assert set(lab.counters(target, Family.IPV6)) == {(0, 0)}, target


# esp and ah in IPv4, where they read the header at the transport offset (-p needed)
RULESET4 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p esp -m esp --espspi 5 -j DROP
-A INPUT -p ah -m ah --ahspi 9 -j DROP
-A FORWARD -p esp -m esp ! --espspi 5 -j DROP
-A FORWARD -p ah -m ah --ahspi 8:9 -j DROP
-A OUTPUT -p esp -m esp --espspi 6:7 -j DROP
-A OUTPUT -p ah -m ah ! --ahspi 9 -j DROP
COMMIT
"""


def test_esp_and_ah_in_ipv4(lab):
    far = "198.19.5.5"

    def esp4(spi, src=S_IN_ADDR, dst=T_IN_ADDR, **kw):
        return Upper(src, dst, 50, header=spi.to_bytes(4, "big") + bytes(4), **kw)

    def ah4(spi, src=S_IN_ADDR, dst=T_IN_ADDR, **kw):
        return Upper(src, dst, 51, header=bytes([17, 4, 0, 0]) + spi.to_bytes(4, "big") +
                     bytes(16), **kw)

    both = [(Case(esp4(5), "input"), False), (Case(esp4(6), "input"), True),
            (Case(ah4(9), "input"), False), (Case(ah4(10), "input"), True),
            (Case(esp4(6, dst=far), "forward"), False), (Case(esp4(5, dst=far), "forward"), True),
            (Case(ah4(8, dst=far), "forward"), False), (Case(ah4(10, dst=far), "forward"), True),
            # a later fragment is no match; one cut inside the header is dropped uncounted
            (Case(esp4(6, dst=far, frag_offset=4), "forward"), True),
            (Case(Upper(S_IN_ADDR, far, 50, header=bytes(6), payload_len=0), "forward"), False),
            (Case(esp4(7, T_IN_ADDR, far), "output"), False),
            (Case(esp4(8, T_IN_ADDR, far), "output"), True),
            (Case(ah4(8, T_IN_ADDR, far), "output"), False),
            (Case(ah4(9, T_IN_ADDR, far), "output"), True)]
    arrived = assert_identical(lab, RULESET4, [c for c, _ in both], family=Family.IPV4)
    assert arrived["bpfilter"] == [a for _, a in both]
