"""Verdicts and counters of the matches on IPv6 extension headers (rt, frag, hbh, dst,
ipv6header, ah), on ESP (both families) and mobility headers (mh), IPv4's ah, and
eui64; the machinery, and what a case is: verdicts.py. Every case at OUTPUT is
replayed against the kernel's own ip6tables (iptables for IPv4), and its `-L -n`
text compared with theirs.

How rt, frag, hbh, dst and ah find their header (ipv6_find_hdr(skb, &ptr, TYPE, NULL,
NULL)): the first one of the type on the chain of extension headers; the search
stops at the upper-layer protocol and at a later fragment's header (not found: the
match fails), and a header it cannot read (truncated) makes the match drop the
packet, uncounted ("hotdrop"). Each match then reads its header, which must be whole
(else hotdrop) and, for rt, hbh, dst and ah, as long as its length says.

Packet sizes (16 payload bytes unless said): udp 64; a hop-by-hop or destination
options header with no options adds 8, a routing header 8 plus 16 an address, a
fragment header 8, an authentication header 24; a later fragment carries its 16
payload bytes and no transport header.
"""
from __future__ import annotations

import errno
import random
import socket
import struct
from dataclasses import dataclass

import pytest

from bpfilter.errors import BpfilterError
from bpfilter.loader import load_filter_table
from bpfilter.model import Family
from bpfilter.packet import ipv6_probe
from bpfilter.packet.ipv6_probe import walk_bounded_by_packet
from bpfilter_lab.scratch import replace_blob
from bpfilter_lab.packets import (ROUTER_ALERT_MLD, AuthenticationHeader, DestinationOptions,
                                  Fragment, HopByHop, Option, Packet, Pad1, Routing, checksum)
from verdicts import (ACCEPT, DROP, IN, OUT, Case, case, kernel_agrees, payload_agrees,
                      listing_agrees, output_only, run_case)

pytestmark = pytest.mark.kernel

A, B = "2001:db8:1::3", "2001:db8:7::8"     # default source and destination
C, D, E = "2001:db8:9::1", "2001:db8:9::2", "2001:db8:9::3"   # routing header addresses
A4, B4 = "10.1.2.3", "192.168.7.8"
ESP, MOBILITY, NONE, COMP, DCCP, SCTP = 50, 135, 59, 108, 33, 132
DATA, INIT, SACK, ABORT = (0, 0, b"\x01" * 12), (1, 0, bytes(16)), (3, 0, bytes(12)), (6, 0, b"")
EMPTY = (3, 0, b"", 0)     # a chunk whose length says 0


@dataclass(frozen=True)
class Upper(Packet):
    """A packet whose upper-layer header is written byte for byte (ESP's SPI and
    sequence number, a mobility header), before the payload; with `checksum_at`, the
    16-bit checksum there covers the IPv6 pseudo-header and everything after it (a
    mobility header's, which raw sockets check)."""
    header: bytes = b""
    checksum_at: "int | None" = None

    def _transport(self, body: bytes, pseudo) -> bytes:
        seg = self.header + body
        if self.checksum_at is None or len(seg) < self.checksum_at + 2:
            return seg
        at = self.checksum_at
        return seg[:at] + checksum(pseudo(len(seg)) + seg).to_bytes(2, "big") + seg[at + 2:]


@dataclass(frozen=True)
class RawHeader:
    """An extension header written byte for byte after its next-header byte (reserved
    bits set, options of any shape)."""
    number: int
    data: bytes
    next_header: "int | None" = None

    def encode(self, next_header: int, ident: int) -> bytes:
        return bytes([next_header]) + self.data


def udp(dport=53, src=A, dst=B, **kw) -> Packet:
    return Packet(src, dst, "udp", dport=dport, **kw)


def esp(spi: int, src=A, dst=B, header_len=8, **kw) -> Packet:
    """ESP: SPI, sequence number 1, then the payload; `header_len` cuts the header."""
    return Upper(src, dst, ESP, header=(spi.to_bytes(4, "big") + bytes([0, 0, 0, 1]))[:header_len],
                 **kw)


def ipcomp(cpi: int, src=A, dst=B, header_len=4, **kw) -> Packet:
    """IPComp: next header (udp), flags 0, the 16-bit CPI; `header_len` cuts it."""
    return Upper(src, dst, COMP, header=(bytes([17, 0]) + cpi.to_bytes(2, "big"))[:header_len],
                 **kw)


def dccp(sport=1500, dport=6, type_=2, x=1, part=b"", options=b"", doff=None, cut=None,
         src=A, dst=B, **kw) -> Packet:
    """DCCP: ports, data offset (default: the header and options, in words), type and
    X bit, a 48-bit (X) or 24-bit sequence number, the type's own part, the options;
    `cut` keeps only that many bytes of it all."""
    fixed = 16 if x else 12
    hdr = (sport.to_bytes(2, "big") + dport.to_bytes(2, "big") +
           bytes([doff if doff is not None else (fixed + len(part) + len(options)) // 4, 0, 0, 0,
                  type_ << 1 | x]) + bytes(fixed - 9) + part + options)
    return Upper(src, dst, DCCP, header=hdr[:cut], **kw)


def sctp(*chunks, sport=1500, dport=6, src=A, dst=B, **kw) -> Packet:
    """SCTP: ports, verification tag, checksum (zero), then chunks (type, flags, value,
    and the length it states if not its own), each padded to 4 bytes; no payload unless
    asked (the walk would read it as chunks)."""
    body = b"".join(bytes([t, f]) + (c[0] if c else 4 + len(v)).to_bytes(2, "big")
                    + v + bytes(-len(v) % 4) for t, f, v, *c in chunks)
    hdr = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + body
    return Upper(src, dst, SCTP, header=hdr, **{"payload_len": 0, **kw})


def srh(segments_left: int, *segments: str, last_entry=None, tag=b"\0\0", type_=4,
        hdrlen=None) -> RawHeader:
    """A segment routing header (routing type 4): length, type, segments left, last
    entry (default: the last index), flags, tag as its two bytes, the segments."""
    sids = b"".join(socket.inet_pton(socket.AF_INET6, a) for a in segments)
    last = len(segments) - 1 if last_entry is None else last_entry
    return RawHeader(43, bytes([2 * len(segments) if hdrlen is None else hdrlen, type_,
                                segments_left, last, 0]) + tag + sids)


def mobility(mh_type: int, proto=NONE, header_len=6, **kw) -> Packet:
    """A mobility header: payload proto, length 0 (8 bytes), type, reserved, checksum."""
    return Upper(A, B, MOBILITY, header=bytes([proto, 0, mh_type, 0, 0, 0])[:header_len],
                 checksum_at=4, **kw)


def v6case(name, rules, steps, counters, crafted=()):
    return case(name, rules, steps, counters, crafted, family=Family.IPV6)


def v4case(name, rules, steps, counters, crafted=()):
    return case(name, rules, steps, counters, crafted, family=Family.IPV4)


HBH, DST = HopByHop(), DestinationOptions()
RT0 = Routing(0, 1, (C,))                        # 24 bytes
FIRST, LATER = Fragment(offset=0, more=True), Fragment(offset=8)
AH = AuthenticationHeader(spi=0x1234)            # 24 bytes


def later_fragment(*ext) -> Packet:
    """A later fragment whose fragment header names `ext` (written whole into its data,
    as a later fragment has no headers of its own beyond the fragment header)."""
    return udp(ext=(Fragment(offset=8, next_header=ext[0].number), *ext))


RT_CASES = [
    v6case("rt --rt-type 0 (ufw's rule)", "-A OUTPUT -m rt --rt-type 0 -j DROP",
           [(OUT, udp(ext=(RT0,)), DROP), (OUT, udp(ext=(Routing(2, 1, (C,)),)), ACCEPT),
            (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT policy": (2, 152)}),
    v6case("! --rt-type", "-A OUTPUT -m rt ! --rt-type 0 -j DROP",
           [(OUT, udp(ext=(RT0,)), ACCEPT), (OUT, udp(ext=(Routing(4, 0),)), DROP),
            (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT policy": (2, 152)}),
    v6case("--rt-segsleft range and its inversion",
           "-A OUTPUT -m rt --rt-segsleft 2:3 -j DROP\n-A OUTPUT -m rt ! --rt-segsleft 1 -j ACCEPT",
           [(OUT, udp(ext=(Routing(0, 3, (C, D, E)),)), DROP),
            (OUT, udp(ext=(Routing(0, 1, (C, D, E)),)), ACCEPT),
            (OUT, udp(ext=(Routing(0, 0, (C, D, E)),)), ACCEPT)],
           {"OUTPUT 1": (1, 120), "OUTPUT 2": (1, 120), "OUTPUT policy": (1, 120)}),
    v6case("--rt-len counts bytes, ! too",
           "-A OUTPUT -m rt --rt-len 24 -j DROP\n-A OUTPUT -m rt ! --rt-len 40 -j ACCEPT",
           [(OUT, udp(ext=(RT0,)), DROP), (OUT, udp(ext=(Routing(0, 2, (C, D)),)), ACCEPT),
            (OUT, udp(ext=(Routing(0, 0),)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT 2": (1, 72), "OUTPUT policy": (1, 104)}),
    v6case("--rt-0-res: the reserved word zero",
           "-A OUTPUT -m rt --rt-type 0 --rt-0-res -j DROP",
           [(OUT, udp(ext=(RT0,)), DROP),
            (OUT, udp(ext=(Routing(0, 1, (C,), type_data=b"\0\0\0\1"),)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT policy": (1, 88)}),
    v6case("--rt-0-addrs: exactly the header's addresses, in order",
           f"-A OUTPUT -m rt --rt-type 0 --rt-0-addrs {C},{D} -j DROP",
           [(OUT, udp(ext=(Routing(0, 2, (C, D)),)), DROP),
            (OUT, udp(ext=(Routing(0, 2, (D, C)),)), ACCEPT),
            (OUT, udp(ext=(Routing(0, 3, (C, D, E)),)), ACCEPT),
            (OUT, udp(ext=(RT0,)), ACCEPT)],
           {"OUTPUT 1": (1, 104), "OUTPUT policy": (3, 312)}),
    v6case("--rt-0-not-strict: the rule's addresses among the header's, in order",
           f"-A OUTPUT -m rt --rt-type 0 --rt-0-addrs {C},{E} --rt-0-not-strict -j DROP",
           [(OUT, udp(ext=(Routing(0, 3, (C, D, E)),)), DROP),
            (OUT, udp(ext=(Routing(0, 3, (D, C, E)),)), DROP),
            (OUT, udp(ext=(Routing(0, 3, (E, D, C)),)), ACCEPT),
            (OUT, udp(ext=(RT0,)), ACCEPT)],
           {"OUTPUT 1": (2, 240), "OUTPUT policy": (2, 208)}),
    v6case("rt finds its header past others, and tests the first of two",
           "-A OUTPUT -m rt --rt-segsleft 5 -j DROP",
           [(OUT, udp(ext=(HBH, DST, Routing(0, 5, (C,)), Routing(0, 1, (D,)))), DROP),
            (OUT, udp(ext=(HBH, DST, Routing(0, 1, (C,)), Routing(0, 5, (D,)))), ACCEPT)],
           {"OUTPUT 1": (1, 128), "OUTPUT policy": (1, 128)}),
    v6case("rt after a first fragment's header is found, after a later one's is not",
           "-A OUTPUT -m rt --rt-type 0 -j DROP",
           [(OUT, udp(ext=(FIRST, RT0)), DROP), (OUT, later_fragment(RT0), ACCEPT)],
           {"OUTPUT 1": (1, 96), "OUTPUT policy": (1, 88)}),
    v6case("rt: a routing header too short to read drops the packet, uncounted",
           "-A OUTPUT -m rt --rt-type 2 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, udp(ext=(HBH, RT0), truncate_ext=11), DROP),
            (OUT, udp(ext=(HBH, RT0), truncate_ext=12), DROP),
            (OUT, udp(ext=(HBH, RT0), truncate_ext=7), DROP)],
           {}),
    v6case("rt: a header longer than the packet drops it, a later match notwithstanding",
           "-A OUTPUT -m rt --rt-type 2 -m rt --rt-type 0 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, udp(ext=(Routing(0, 1, (C,), ext_len=9),)), DROP)], {}),
    v6case("rt: an earlier failing test of the rule keeps the packet",
           "-A OUTPUT -d 2001:db8:5::/48 -m rt -j ACCEPT\n-A OUTPUT -j DROP",
           [(OUT, udp(ext=(HBH, RT0), truncate_ext=11), DROP),
            (OUT, udp(ext=(HBH, RT0), truncate_ext=7), DROP)],
           {"OUTPUT 2": (2, 98)}),
    v6case("rt absent, after the protocol or after 'no next header': no match",
           "-A OUTPUT -m rt -j DROP",
           [(OUT, udp(), ACCEPT), (OUT, udp(ext=(HBH,)), ACCEPT),
            (OUT, Packet(A, B, NONE, ext=(DestinationOptions(next_header=NONE), RT0)), ACCEPT)],
           {"OUTPUT policy": (3, 224)}),
]


def rt_overrun_case(bounded: bool):
    """Destination options claiming more than the packet holds, then udp: a walk
    bounded by the packet (kernels with the stable fix) fails there, and rt drops the
    packet; one that steps past the end finds udp, and rt just fails."""
    walk = "bounded" if bounded else "unbounded"
    return v6case(f"rt past an overrunning header ({walk} walk)",
                  "-A OUTPUT -m rt -j ACCEPT\n-A OUTPUT -j ACCEPT",
                  [(OUT, udp(ext=(DestinationOptions(ext_len=9),)), DROP if bounded else ACCEPT)],
                  {} if bounded else {"OUTPUT 2": (1, 72)})


FRAG_CASES = [
    v6case("--fragid range, its inversion",
           "-A OUTPUT -m frag --fragid 7:9 -j DROP\n-A OUTPUT -m frag ! --fragid 100 -j ACCEPT",
           [(OUT, udp(ext=(Fragment(ident=8, more=True),)), DROP),
            (OUT, udp(ext=(Fragment(ident=10, more=True),)), ACCEPT),
            (OUT, udp(ext=(Fragment(ident=100, more=True),)), ACCEPT),
            (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT 2": (1, 72), "OUTPUT policy": (2, 136)}),
    v6case("--fragfirst, --fragmore, --fraglast",
           "-A OUTPUT -m frag --fragfirst --fragmore -j DROP\n"
           "-A OUTPUT -m frag --fraglast -j DROP\n-A OUTPUT -m frag -j ACCEPT",
           [(OUT, udp(ext=(FIRST,)), DROP),
            (OUT, udp(ext=(Fragment(offset=8, more=True),)), ACCEPT),
            (OUT, udp(ext=(LATER,)), DROP),
            (OUT, udp(ext=(Fragment(offset=0, more=False),)), DROP)],
           {"OUTPUT 1": (1, 72), "OUTPUT 2": (2, 136), "OUTPUT 3": (1, 64)}),
    v6case("--fragres: the reserved byte and the two reserved bits",
           "-A OUTPUT -m frag --fragres -j ACCEPT\n-A OUTPUT -j DROP",
           [(OUT, udp(ext=(FIRST,)), ACCEPT),
            (OUT, udp(ext=(RawHeader(44, bytes([1, 0, 1, 0, 0, 0, 7])),)), DROP),
            (OUT, udp(ext=(RawHeader(44, bytes([0, 0, 3, 0, 0, 0, 7])),)), DROP),
            (OUT, udp(ext=(RawHeader(44, bytes([0, 0, 5, 0, 0, 0, 7])),)), DROP)],
           {"OUTPUT 1": (1, 72), "OUTPUT 2": (3, 216)}),
    v6case("--fraglen is stored, never tested",
           "-A OUTPUT -m frag --fraglen 99 -j DROP",
           [(OUT, udp(ext=(FIRST,)), DROP), (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT policy": (1, 64)}),
    v6case("frag finds the header past others; none after a later fragment's",
           "-A OUTPUT -m frag --fragid 5 -j DROP",
           [(OUT, udp(ext=(HBH, RT0, Fragment(ident=5, more=True))), DROP),
            (OUT, udp(ext=(LATER, Fragment(ident=5))), ACCEPT)],
           {"OUTPUT 1": (1, 104), "OUTPUT policy": (1, 72)}),
    v6case("frag: a header cut short drops the packet, uncounted",
           "-A OUTPUT -m frag --fragid 9 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, udp(ext=(FIRST,), truncate_ext=5), DROP),      # frag_off readable
            (OUT, udp(ext=(FIRST,), truncate_ext=3), DROP),      # it is not
            (OUT, udp(ext=(FIRST,), truncate_ext=8), ACCEPT)],
           {"OUTPUT 2": (1, 48)}),
]

OPTS = HopByHop((ROUTER_ALERT_MLD,))   # router alert (5, 2 bytes), then PadN (1, 0 bytes)
# two options, the second running past the header's end
RUNNING_OVER = RawHeader(0, bytes([0, 5, 2, 0, 0, 7, 16]))

HBH_CASES = [
    v6case("--hbh-len in bytes, and !",
           "-A OUTPUT -m hbh --hbh-len 8 -j DROP\n-A OUTPUT -m hbh ! --hbh-len 16 -j ACCEPT",
           [(OUT, udp(ext=(HBH,)), DROP), (OUT, udp(ext=(HopByHop((Option(3, bytes(10)),)),)),
                                           ACCEPT),
            (OUT, udp(ext=(HopByHop((Option(3, bytes(4)),)),)), DROP), (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (2, 144), "OUTPUT policy": (2, 144)}),
    v6case("--hbh-opts: types and lengths, in order",
           "-A OUTPUT -m hbh --hbh-opts 5:2,1:0 -j DROP\n"
           "-A OUTPUT -m hbh --hbh-opts 5 -j DROP\n"
           "-A OUTPUT -m hbh --hbh-opts 5:3 -j DROP\n-A OUTPUT -m hbh --hbh-opts 1 -j DROP",
           [(OUT, udp(ext=(OPTS,)), DROP),
            (OUT, udp(ext=(HopByHop((Option(5, b"\0\0\0\0\0\0\0\0\0\0"),)),)), DROP),
            (OUT, udp(ext=(HopByHop((Option(6, b"\0\0"),)),)), ACCEPT),
            (OUT, udp(ext=(HopByHop((Pad1(), Pad1(), ROUTER_ALERT_MLD)),)), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT 2": (1, 80), "OUTPUT policy": (2, 144)}),
    v6case("--hbh-opts: Pad1 has no length",
           "-A OUTPUT -m hbh --hbh-opts 0,0,5:2 -j DROP",
           [(OUT, udp(ext=(HopByHop((Pad1(), Pad1(), ROUTER_ALERT_MLD)),)), DROP),
            (OUT, udp(ext=(OPTS,)), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT policy": (1, 72)}),
    v6case("--hbh-opts: more options than the header holds",
           "-A OUTPUT -m hbh --hbh-opts 5:2,1:0,1 -j DROP\n"
           "-A OUTPUT -m hbh --hbh-opts 5:2,1 -j ACCEPT",
           [(OUT, udp(ext=(OPTS,)), ACCEPT)], {"OUTPUT 2": (1, 72)}),
    # (past the header come the udp header's bytes, then the payload's zeros: Pad1s
    # to a walk that would not stop)
    v6case("--hbh-opts: only the last option may run past the header",
           "-A OUTPUT -m hbh --hbh-opts 5:2,7:16,0 -j DROP\n"
           "-A OUTPUT -m hbh --hbh-opts 5:2,7:16 -j ACCEPT\n-A OUTPUT -j DROP",
           [(OUT, udp(ext=(RUNNING_OVER,)), ACCEPT)], {"OUTPUT 2": (1, 72)}),
    v6case("hbh: cut short, or longer than the packet, drops it uncounted",
           "-A OUTPUT -m hbh --hbh-len 99 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, udp(ext=(OPTS,), truncate_ext=1), DROP),
            (OUT, udp(ext=(HopByHop(ext_len=9),)), DROP),
            (OUT, udp(ext=(OPTS,), truncate_ext=2), DROP)],
           {}),
    v6case("dst: the first destination options header, not past a later fragment",
           "-A OUTPUT -m dst --dst-len 16 -j DROP\n-A OUTPUT -m dst -j ACCEPT",
           [(OUT, udp(ext=(DestinationOptions((Option(3, bytes(10)),)), RT0, DST)), DROP),
            (OUT, udp(ext=(DST, RT0, DestinationOptions((Option(3, bytes(10)),)))), ACCEPT),
            (OUT, later_fragment(DST), ACCEPT), (OUT, udp(ext=(HBH,)), ACCEPT)],
           {"OUTPUT 1": (1, 112), "OUTPUT 2": (1, 112), "OUTPUT policy": (2, 144)}),
    v6case("dst --dst-opts",
           "-A OUTPUT -m dst --dst-opts 201:16 -j DROP",
           [(OUT, udp(ext=(DestinationOptions((Option(201, bytes(16)),)),)), DROP),
            (OUT, udp(ext=(DestinationOptions((Option(201, bytes(8)),)),)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT policy": (1, 80)}),
    v6case("hbh and dst do not take each other's header",
           "-A OUTPUT -m hbh -j DROP\n-A OUTPUT -m dst -j ACCEPT",
           [(OUT, udp(ext=(DST,)), ACCEPT), (OUT, udp(ext=(HBH,)), DROP)],
           {"OUTPUT 1": (1, 72), "OUTPUT 2": (1, 72)}),
]

IPV6HEADER_CASES = [
    v6case("ipv6header: exactly the headers named, the protocol included",
           "-A OUTPUT -m ipv6header --header hop-by-hop -j DROP\n"
           "-A OUTPUT -m ipv6header --header hop-by-hop,protocol -j ACCEPT",
           [(OUT, udp(ext=(HBH,)), ACCEPT), (OUT, udp(ext=(HBH, DST)), ACCEPT),
            (OUT, Packet(A, B, NONE, ext=(HBH,)), ACCEPT)],
           {"OUTPUT 2": (1, 72), "OUTPUT policy": (2, 144)}),
    v6case("ipv6header --soft: every header named",
           "-A OUTPUT -m ipv6header --header dst,route --soft -j DROP",
           [(OUT, udp(ext=(HBH, DST, RT0)), DROP), (OUT, udp(ext=(DST,)), ACCEPT)],
           {"OUTPUT 1": (1, 104), "OUTPUT policy": (1, 72)}),
    v6case("ipv6header ! --soft: none of the headers named",
           "-A OUTPUT -m ipv6header ! --header frag,auth --soft -j DROP",
           [(OUT, udp(ext=(DST,)), DROP), (OUT, udp(ext=(AH,)), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT policy": (1, 88)}),
    v6case("ipv6header !: anything but exactly these",
           "-A OUTPUT -m ipv6header ! --header frag,prot -j DROP",
           [(OUT, udp(ext=(FIRST,)), ACCEPT), (OUT, udp(ext=(FIRST, DST)), DROP)],
           {"OUTPUT 1": (1, 80), "OUTPUT policy": (1, 72)}),
    v6case("ipv6header: ESP and 'no next header' end the walk, without the protocol",
           "-A OUTPUT -m ipv6header --header esp -j DROP\n"
           "-A OUTPUT -m ipv6header --header dst,none -j DROP",
           [(OUT, esp(7), DROP), (OUT, Packet(A, B, NONE, ext=(DST,)), DROP),
            (OUT, Packet(A, B, NONE), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 64), "OUTPUT policy": (1, 56)}),
    v6case("ipv6header: fewer than 2 bytes left before a header fails the match",
           "-A OUTPUT -m ipv6header ! --header hop --soft -j ACCEPT\n-A OUTPUT -j DROP",
           [(OUT, esp(7, header_len=1, payload_len=0), DROP),
            (OUT, udp(ext=(DST, HBH), truncate_ext=9), DROP),
            (OUT, udp(ext=(DST, HBH), truncate_ext=10), DROP)],
           {"OUTPUT 2": (3, 140)}),
    v6case("ipv6header walks on into a later fragment's data",
           "-A OUTPUT -m ipv6header --header frag,prot -j DROP\n"
           "-A OUTPUT -m ipv6header --header frag,dst,prot -j ACCEPT",
           [(OUT, udp(ext=(LATER,)), DROP), (OUT, later_fragment(DST), ACCEPT)],
           {"OUTPUT 1": (1, 64), "OUTPUT 2": (1, 72)}),
    v6case("ipv6header: a header past the packet's end stops the walk; what it names counts",
           "-A OUTPUT -m ipv6header --header dst,prot -j DROP\n"
           "-A OUTPUT -m ipv6header --header dst -j ACCEPT",
           [(OUT, udp(ext=(DestinationOptions(ext_len=9),)), DROP),
            (OUT, Packet(A, B, NONE, ext=(DestinationOptions(ext_len=9),)), ACCEPT)],
           {"OUTPUT 1": (1, 72), "OUTPUT 2": (1, 64)}),
]

AH_CASES = [
    v6case("ah --ahspi, a range, !",
           "-A OUTPUT -m ah --ahspi 0x1234 -j DROP\n"
           "-A OUTPUT -m ah --ahspi 0x1000:0x1100 -j DROP\n-A OUTPUT -m ah ! --ahspi 9 -j ACCEPT",
           [(OUT, udp(ext=(AH,)), DROP),
            (OUT, udp(ext=(AuthenticationHeader(spi=0x1000),)), DROP),
            (OUT, udp(ext=(AuthenticationHeader(spi=9),)), ACCEPT),
            (OUT, udp(ext=(AuthenticationHeader(spi=0),)), ACCEPT), (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT 2": (1, 88), "OUTPUT 3": (1, 88),
            "OUTPUT policy": (2, 152)}),
    v6case("ah --ahlen in bytes, !, and --ahres",
           "-A OUTPUT -m ah --ahlen 24 --ahres -j DROP\n-A OUTPUT -m ah ! --ahlen 24 -j DROP",
           [(OUT, udp(ext=(AH,)), DROP),
            (OUT, udp(ext=(AuthenticationHeader(icv=bytes(4)),)), DROP),
            (OUT, udp(ext=(RawHeader(51, bytes([4, 0, 1]) + bytes(20)),)), ACCEPT)],
           {"OUTPUT 1": (1, 88), "OUTPUT 2": (1, 80), "OUTPUT policy": (1, 88)}),
    v6case("ah past a routing header, not past a later fragment's",
           "-A OUTPUT -m ah -j DROP",
           [(OUT, udp(ext=(HBH, RT0, AH)), DROP), (OUT, later_fragment(AH), ACCEPT)],
           {"OUTPUT 1": (1, 120), "OUTPUT policy": (1, 88)}),
    v6case("ah: cut inside its 12 bytes, or longer than the packet: dropped uncounted",
           "-A OUTPUT -m ah --ahspi 1 -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, udp(ext=(AH,), truncate_ext=11), DROP),
            (OUT, udp(ext=(AuthenticationHeader(ext_len=20),)), DROP),
            (OUT, udp(ext=(AH,), truncate_ext=12), DROP)],
           {}),
]

ESP_MH_CASES = [
    v6case("esp --espspi", "-A OUTPUT -p esp -m esp --espspi 5:6 -j DROP",
           [(OUT, esp(5), DROP), (OUT, esp(7), ACCEPT), (OUT, esp(6, ext=(HBH, DST)), DROP)],
           {"OUTPUT 1": (2, 144), "OUTPUT policy": (1, 64)}),
    v6case("esp ! --espspi", "-A OUTPUT -p esp -m esp ! --espspi 5 -j DROP",
           [(OUT, esp(5), ACCEPT), (OUT, esp(0xFFFFFFFF), DROP)],
           {"OUTPUT 1": (1, 64), "OUTPUT policy": (1, 64)}),
    v6case("esp: cut inside its 8 bytes: dropped; a later fragment: no match",
           "-A OUTPUT -p esp -m esp --espspi 5 -j ACCEPT\n-A OUTPUT -p esp -j ACCEPT\n:OUTPUT DROP",
           [(OUT, esp(5, header_len=7, payload_len=0), DROP),
            (OUT, esp(5, ext=(Fragment(offset=8),)), ACCEPT)],
           {"OUTPUT 2": (1, 64)}),
    v6case("ipcomp --ipcompspi: the 16-bit CPI against a 32-bit range",
           "-A OUTPUT -p ipcomp -m ipcomp --ipcompspi 5:70000 -j DROP\n"
           "-A OUTPUT -p ipcomp -m ipcomp ! --ipcompspi 0:4 -j ACCEPT\n:OUTPUT DROP",
           [(OUT, ipcomp(0xFFFF), DROP), (OUT, ipcomp(4), DROP),
            (OUT, ipcomp(5, header_len=3, payload_len=0), DROP),
            (OUT, ipcomp(5, ext=(Fragment(offset=8),)), DROP)],
           {"OUTPUT 1": (1, 60), "OUTPUT policy": (2, 124)}),
    v6case("dccp: ports, then types (REQUEST, DATA)",
           "-A OUTPUT -p dccp -m dccp --sport 1000:2000 ! --dport 5 --dccp-types REQUEST,DATA "
           "-j DROP",
           [(OUT, dccp(), DROP), (OUT, dccp(type_=0, x=0, part=bytes(4)), DROP),
            (OUT, dccp(type_=3, part=bytes(8)), ACCEPT), (OUT, dccp(dport=5), ACCEPT),
            (OUT, dccp(sport=999), ACCEPT), (OUT, dccp(ext=(HBH,)), DROP)],
           {"OUTPUT 1": (3, 224), "OUTPUT policy": (3, 224)}),
    v6case("dccp --dccp-option: a kind the walk steps on, past the type's part",
           "-A OUTPUT -p dccp -m dccp --dccp-option 32 -j DROP\n"
           "-A OUTPUT -p dccp -m dccp ! --dccp-types RESET --dccp-option 33 -j DROP",
           [(OUT, dccp(options=b"\x01\x20\x03\x00" + bytes(4)), DROP),
            (OUT, dccp(options=b"\x21\x04\x20\x00" + bytes(4)), DROP),
            (OUT, dccp(type_=7, part=b"\x20" * 12, options=b"\x21\x02\x00\x00"), ACCEPT),
            (OUT, dccp(options=b"\x00\x00\x00\x20"), DROP),
            (OUT, dccp(options=b"\x02\x00\x20\x00"), DROP),
            (OUT, dccp(options=b"\x22\x00\x00\x21"), DROP),
            (OUT, dccp(options=b"\x22\x06\x00\x21\x00\x00\x00\x00"), ACCEPT)],
           {"OUTPUT 1": (3, 232), "OUTPUT 2": (2, 156), "OUTPUT policy": (2, 168)}),
    v6case("dccp: a short header, a data offset short of the fixed part, options cut: "
           "dropped; a later fragment: no match",
           "-A OUTPUT -p dccp -m dccp --dccp-option 1 -j ACCEPT\n"
           "-A OUTPUT -p dccp -m dccp --sport 1500 -j ACCEPT\n:OUTPUT DROP",
           [(OUT, dccp(cut=11, payload_len=0), DROP), (OUT, dccp(doff=3), DROP),
            (OUT, dccp(type_=3, doff=6, part=bytes(8)), ACCEPT),
            (OUT, dccp(doff=20, payload_len=16), DROP),
            (OUT, dccp(doff=20, payload_len=64), ACCEPT),
            (OUT, dccp(doff=20, options=b"\x01" + bytes(63), payload_len=0), ACCEPT),
            (OUT, dccp(ext=(Fragment(offset=8),)), DROP)],
           {"OUTPUT 1": (1, 120), "OUTPUT 2": (2, 200), "OUTPUT policy": (1, 64)}),
    v6case("sctp: ports; any chunk of a type, its flags as asked",
           "-A OUTPUT -p sctp -m sctp --sport 1000:2000 ! --dport 5 -j DROP\n"
           "-A OUTPUT -p sctp -m sctp --chunk-types any DATA:Be,INIT -j DROP",
           [(OUT, sctp(SACK), DROP), (OUT, sctp(SACK, dport=5), ACCEPT),
            (OUT, sctp(SACK, INIT, sport=1), DROP), (OUT, sctp((0, 0x02, b"x"), sport=1), DROP),
            (OUT, sctp((0, 0x03, b"x"), SACK, sport=1), ACCEPT)],
           {"OUTPUT 1": (1, 68), "OUTPUT 2": (2, 148), "OUTPUT policy": (2, 144)}),
    v6case("sctp: all of the types, only the types; --chunk-types all ALL never matches",
           "-A OUTPUT -p sctp -m sctp --chunk-types all INIT,SACK -j DROP\n"
           "-A OUTPUT -p sctp -m sctp --chunk-types only DATA:E,SACK -j DROP\n"
           "-A OUTPUT -p sctp -m sctp --chunk-types all ALL -j DROP",
           [(OUT, sctp(SACK, DATA, INIT), DROP), (OUT, sctp(INIT, INIT), ACCEPT),
            (OUT, sctp((0, 1, b"x"), SACK), DROP), (OUT, sctp((0, 0, b"x"), SACK), ACCEPT),
            (OUT, sctp(DATA, ABORT), ACCEPT)],
           {"OUTPUT 1": (1, 104), "OUTPUT 2": (1, 76), "OUTPUT policy": (3, 240)}),
    v6case("sctp: a chunk of length 0, or cut, drops the packet unless `only` said no first",
           "-A OUTPUT -p sctp -m sctp --chunk-types only INIT -j ACCEPT\n"
           "-A OUTPUT -p sctp -j ACCEPT\n:OUTPUT DROP",
           [(OUT, sctp(SACK, EMPTY), ACCEPT), (OUT, sctp(INIT, EMPTY), DROP),
            (OUT, sctp(), DROP), (OUT, sctp(INIT, payload_len=2), DROP),
            (OUT, sctp(INIT, INIT), ACCEPT), (OUT, sctp(INIT, ext=(Fragment(offset=8),)), ACCEPT)],
           {"OUTPUT 1": (1, 92), "OUTPUT 2": (2, 120)}),
    v6case("sctp: `any` says yes before a chunk it cannot walk",
           "-A OUTPUT -p sctp -m sctp --chunk-types any INIT -j ACCEPT\n:OUTPUT DROP",
           [(OUT, sctp(INIT, EMPTY), ACCEPT), (OUT, sctp(SACK, EMPTY), DROP)],
           {"OUTPUT 1": (1, 76)}),
    v6case("srh: a type 4 header's fields; anything else fails, never drops",
           "-A OUTPUT -m srh --srh-next-hdr 17 --srh-segs-left-eq 1 --srh-last-entry-gt 1 "
           "--srh-hdr-len-lt 7 -j DROP\n-A OUTPUT -m srh ! --srh-tag 256 -j ACCEPT\n"
           "-A OUTPUT -m srh -j DROP",
           [(OUT, udp(ext=(srh(1, C, D, E),)), DROP),
            (OUT, udp(ext=(srh(1, C, D),)), ACCEPT),
            (OUT, udp(ext=(srh(1, C, D, E, tag=b"\x00\x01"),)), DROP),
            (OUT, udp(ext=(srh(1, C, D, tag=b"\x00\x01"),)), DROP),
            (OUT, udp(ext=(srh(2, C, D),)), ACCEPT),
            (OUT, udp(ext=(srh(1, C, D, E, type_=0),)), ACCEPT),
            (OUT, udp(ext=(srh(1, C, D, hdrlen=9),)), ACCEPT),
            (OUT, udp(), ACCEPT)],
           {"OUTPUT 1": (2, 240), "OUTPUT 2": (1, 104), "OUTPUT 3": (1, 104),
            "OUTPUT policy": (4, 392)}),
    v6case("srh: the previous, next and last segment ids under their masks",
           f"-A OUTPUT -m srh --srh-psid {E}/128 --srh-nsid {C}/64 -j DROP\n"
           f"-A OUTPUT -m srh ! --srh-lsid {C}/128 -j DROP\n"
           f"-A OUTPUT -m srh --srh-nsid ::/0 -j DROP",
           [(OUT, udp(ext=(srh(1, C, D, E),)), DROP),
            (OUT, udp(ext=(srh(1, "2001:db8:8::1", D, E),)), DROP),
            (OUT, udp(ext=(srh(2, C, D, E),)), DROP),
            (OUT, udp(ext=(srh(0, C, D, E),)), ACCEPT),
            (OUT, udp(ext=(srh(1, C, D, E, last_entry=1),)), DROP)],
           {"OUTPUT 1": (1, 120), "OUTPUT 2": (1, 120), "OUTPUT 3": (2, 240),
            "OUTPUT policy": (1, 120)}),
    v6case("mh --mh-type, a range, !",
           "-A OUTPUT -p mobility-header -m mh --mh-type 5 -j DROP\n"
           "-A OUTPUT -p mobility-header -m mh ! --mh-type 1:7 -j DROP",
           [(OUT, mobility(5), DROP), (OUT, mobility(6), ACCEPT), (OUT, mobility(8), DROP)],
           {"OUTPUT 1": (1, 62), "OUTPUT 2": (1, 62), "OUTPUT policy": (1, 62)}),
    v6case("mh: a payload proto other than 59, or a header cut short: dropped uncounted",
           "-A OUTPUT -p mobility-header -m mh -j ACCEPT\n-A OUTPUT -j ACCEPT",
           [(OUT, mobility(5, proto=6), DROP),
            (OUT, mobility(5, header_len=5, payload_len=0), DROP),
            (OUT, mobility(5, ext=(Fragment(offset=8),)), ACCEPT)],
           {"OUTPUT 2": (1, 64)}),
]

IPV4_CASES = [
    v4case("IPv4 esp --espspi",
           "-A OUTPUT -p esp -m esp --espspi 5 -j DROP\n-A OUTPUT -p esp -j ACCEPT\n:OUTPUT DROP",
           [(OUT, esp(5, src=A4, dst=B4), DROP), (OUT, esp(6, src=A4, dst=B4), ACCEPT),
            (OUT, esp(5, src=A4, dst=B4, header_len=6, payload_len=0), DROP),
            (OUT, esp(5, src=A4, dst=B4, frag_offset=3), ACCEPT)],
           {"OUTPUT 1": (1, 44), "OUTPUT 2": (2, 80)}),
    v4case("IPv4 ipcomp --ipcompspi",
           "-A OUTPUT -p ipcomp -m ipcomp ! --ipcompspi 7 -j DROP\n-A OUTPUT -p ipcomp -j ACCEPT\n"
           ":OUTPUT DROP",
           [(OUT, ipcomp(8, src=A4, dst=B4), DROP), (OUT, ipcomp(7, src=A4, dst=B4), ACCEPT),
            (OUT, ipcomp(8, src=A4, dst=B4, frag_offset=3), ACCEPT)],
           {"OUTPUT 1": (1, 40), "OUTPUT 2": (2, 76)}),
    v4case("IPv4 dccp: ports, types and an option",
           "-A OUTPUT -p dccp -m dccp --dport 6 --dccp-types DATA --dccp-option 32 -j DROP\n"
           "-A OUTPUT -p dccp -m dccp --dccp-option 32 -j ACCEPT\n:OUTPUT DROP",
           [(OUT, dccp(src=A4, dst=B4, options=b"\x20\x02\x00\x00"), DROP),
            (OUT, dccp(src=A4, dst=B4, type_=3, part=bytes(8), options=b"\x20\x02\x00\x00"),
             ACCEPT),
            (OUT, dccp(src=A4, dst=B4, options=b"\x20\x02\x00\x00", frag_offset=3), DROP)],
           {"OUTPUT 1": (1, 56), "OUTPUT 2": (1, 64), "OUTPUT policy": (1, 36)}),
    v4case("IPv4 sctp: ports and chunk types; `all` walks every chunk",
           "-A OUTPUT -p sctp -m sctp --dport 6 --chunk-types all DATA,INIT -j DROP\n"
           "-A OUTPUT -p sctp -m sctp --chunk-types any SACK -j ACCEPT\n:OUTPUT DROP",
           [(OUT, sctp(INIT, DATA, src=A4, dst=B4), DROP),
            (OUT, sctp(INIT, SACK, src=A4, dst=B4), ACCEPT),
            (OUT, sctp(SACK, EMPTY, src=A4, dst=B4), DROP),
            (OUT, sctp(SACK, EMPTY, src=A4, dst=B4, dport=7), ACCEPT)],
           {"OUTPUT 1": (1, 68), "OUTPUT 2": (2, 120)}),
    v4case("IPv4 ah --ahspi",
           "-A OUTPUT -p ah -m ah --ahspi 0x1234 -j DROP\n"
           "-A OUTPUT -p ah -m ah ! --ahspi 7 -j ACCEPT\n"
           ":OUTPUT DROP",
           [(OUT, Upper(A4, B4, 51, header=bytes([17, 4, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 1])),
             DROP),
            (OUT, Upper(A4, B4, 51, header=bytes([17, 4, 0, 0, 0, 0, 0x12, 0x35, 0, 0, 0, 1])),
             ACCEPT),
            (OUT, Upper(A4, B4, 51, header=bytes([17, 4, 0, 0, 0, 0, 0x12, 0x35, 0, 0, 0]),
                        payload_len=0), DROP),
            (OUT, Upper(A4, B4, 51, frag_offset=2, payload_len=0), DROP)],
           {"OUTPUT 1": (1, 48), "OUTPUT 2": (1, 48), "OUTPUT policy": (1, 20)}),
]

EUI64_CASES = [
    # BPF_PROG_TEST_RUN hands the program its packet on the loopback device, which is
    # not Ethernet: no match (the lab tests Ethernet frames)
    v6case("eui64 on a device that is not Ethernet", "-A INPUT -m eui64 -j DROP",
           [(IN, udp(), ACCEPT)], {"INPUT policy": (1, 64)}),
]

CHAIN_CASES = [
    # the matches' loops and reads from a user chain (a BPF subprogram, the facts in
    # its caller's frame)
    v6case("matches with loops in a user chain",
           f":X -\n-A OUTPUT -j X\n-A X -m rt --rt-type 0 --rt-0-addrs {C},{E} "
           "--rt-0-not-strict -j DROP\n-A X -m hbh --hbh-opts 5:2,1 -j DROP\n"
           "-A X -m ipv6header --header frag --soft -j DROP",
           [(OUT, udp(ext=(Routing(0, 3, (C, D, E)),)), DROP), (OUT, udp(ext=(OPTS,)), DROP),
            (OUT, udp(ext=(FIRST,)), DROP), (OUT, udp(ext=(DST,)), ACCEPT)],
           {"OUTPUT 1": (4, 336), "X 1": (1, 120), "X 2": (1, 72), "X 3": (1, 72),
            "X return": (1, 72), "OUTPUT policy": (1, 72)}),
]

CHAIN_CASES.append(
    v6case("sctp's walk and dccp's option from a user chain",
           ":X -\n-A OUTPUT -j X\n-A X -p sctp -m sctp --chunk-types only SACK -j DROP\n"
           "-A X -p dccp -m dccp --dccp-option 32 -j DROP",
           [(OUT, sctp(SACK, SACK), DROP), (OUT, sctp(SACK, INIT), ACCEPT),
            (OUT, dccp(options=b"\x20\x02\x00\x00"), DROP)],
           {"OUTPUT 1": (3, 248), "X 1": (1, 84), "X 2": (1, 76), "X return": (1, 88),
            "OUTPUT policy": (1, 88)}))

CASES = [*RT_CASES, rt_overrun_case(walk_bounded_by_packet()), *FRAG_CASES, *HBH_CASES,
         *IPV6HEADER_CASES, *AH_CASES, *ESP_MH_CASES, *IPV4_CASES, *EUI64_CASES, *CHAIN_CASES]
OUTPUT_ONLY = output_only(CASES)


@pytest.mark.parametrize("how", ["walked", "classified"])
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
    """Both answers for a header overrunning the packet, whichever the running kernel
    gives (test_kernel_agrees checks its own)."""
    monkeypatch.setattr(ipv6_probe, "walk_bounded_by_packet", lambda: bounded)
    monkeypatch.setattr("bpfilter.packet.ipv6.walk_bounded_by_packet", lambda: bounded)
    run_case(rt_overrun_case(bounded).values[0], "walked", monkeypatch)


# ---------------------------------------------------------------- limits

EVERY_MATCH = [f"-m rt --rt-type 0 --rt-0-addrs {C},{D} --rt-0-not-strict",
               "-m hbh --hbh-opts 5:2,1", "-m dst --dst-opts 5",
               "-m ipv6header --header hop --soft",
               "-m frag --fragmore", "-m ah --ahspi 5", "-p esp -m esp --espspi 3",
               "-p mobility-header -m mh --mh-type 4", "-p tcp --tcp-option 2",
               "-m mac --mac-source 00:11:22:33:44:55", "-m eui64"]


def nested(depth: int, rules: list[str]) -> bytes:
    """INPUT jumping to C1, C1 to C2 ... down to C`depth`, each holding `rules`."""
    names = [f"C{i}" for i in range(1, depth + 1)]
    return replace_blob("\n".join(
        ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
         *(f":{n} - [0:0]" for n in names), "-A INPUT -j C1",
         *(f"-A {a} -j {b}" for a, b in zip(names, names[1:])),
         *(f"-A {n} {rule} -j DROP" for n in names for rule in rules), "COMMIT", ""]),
        family=Family.IPV6)


def test_every_match_at_once_six_chains_deep():
    """All of them (and tcp's options and mac, which keep facts too) in every chain
    of six nested ones: their facts and the chains' frames fit BPF's stack, and
    rt's not-strict loop its call frame."""
    load_filter_table(nested(6, EVERY_MATCH), attach=False, family=Family.IPV6).close()


def test_a_match_loop_takes_a_call_frame():
    """rt --rt-0-not-strict loops in a bpf_loop() callback, a frame of its own: below
    seven nested chains (eight frames with the main program's, BPF's most) it has none
    left, and the table is refused, as chains nested eight deep are."""
    with pytest.raises(BpfilterError) as refused:
        load_filter_table(nested(7, EVERY_MATCH[:1]), attach=False, family=Family.IPV6)
    assert refused.value.errno == errno.EOPNOTSUPP
    assert "user chains nest 7 deep and a match loops in a frame below them" in str(refused.value)
    # seven deep without the loop: frames enough
    load_filter_table(nested(7, EVERY_MATCH[1:]), attach=False, family=Family.IPV6).close()


# ---------------------------------------------------------------- random payloads

ADDRESSES = (C, D, E)
SPIS = (0, 1, 5, 0x1234, 0xFFFFFFFF)


def _pick_range(rng: random.Random, pool) -> tuple[int, int]:
    lo, hi = rng.choice(pool), rng.choice(pool)
    return (lo, hi) if rng.random() < 0.8 else (hi, lo)


def _noise(rng: random.Random, value: int, wide: int) -> int:
    """Mostly a meaningful value, sometimes any bits at all."""
    return value if rng.random() < 0.8 else rng.randrange(wide)


def _some_headers(rng: random.Random) -> list:
    """Extension headers to put before the one a match looks for."""
    return rng.sample([HBH, DST, Routing(2, 0), AH, FIRST], rng.randrange(3))


def _cut(rng: random.Random, p: Packet) -> Packet:
    """The packet, or now and then its extension headers cut short."""
    chain = sum(len(h.encode(0, 1)) for h in p.ext)
    if p.ext and rng.random() < 0.15:
        return Packet(p.src, p.dst, p.proto, ext=p.ext, truncate_ext=rng.randrange(chain))
    return p


def _random_rt(rng):
    flags = rng.choice([0, 0x01, 0x03, 0x05, 0x09, 0x11, 0x31, rng.randrange(256)])
    addrs = rng.sample(ADDRESSES, 3)
    data = struct.pack("<IIIIBB2x", _noise(rng, rng.choice([0, 0, 2]), 1 << 32),
                       *_pick_range(rng, [0, 1, 2, 3, 0xFFFFFFFF]),
                       rng.choice([8, 24, 40, 56, rng.randrange(64)]), flags,
                       rng.choice([0, 0, 1, 2, 4, 7, rng.randrange(256)]))
    data += b"".join(socket.inet_pton(socket.AF_INET6, a) for a in addrs) + bytes(13 * 16)
    data += bytes([rng.choice([0, 1, 2, 3, 3, 17])]) + bytes(3)
    packets = []
    for _ in range(8):
        n = rng.randrange(4)
        rt = Routing(rng.choice([0, 0, 2, rng.randrange(256)]), rng.randrange(4),
                     tuple(rng.choice(ADDRESSES) for _ in range(n)),
                     type_data=rng.choice([bytes(4), b"\0\0\0\1"]),
                     ext_len=rng.choice([None] * 6 + [2 * n + 3]))
        packets.append(_cut(rng, udp(ext=(*_some_headers(rng), rt))))
    return "-m rt", data, packets


def _random_frag(rng):
    data = struct.pack("<IIIBB2x", *_pick_range(rng, [0, 5, 6, 0xFFFFFFFF]),
                       rng.randrange(16), rng.choice([0, rng.randrange(64), rng.randrange(256)]),
                       rng.choice([0, 0, 1, 2, 3, rng.randrange(256)]))
    packets = []
    for _ in range(8):
        if rng.random() < 0.2:
            fragment = RawHeader(44, bytes([rng.choice([0, 1]), 0, rng.randrange(8)]) +
                                 rng.choice([5, 6]).to_bytes(4, "big"))
        else:
            fragment = Fragment(offset=rng.choice([0, 0, 8]), more=rng.random() < 0.5,
                                ident=rng.choice([5, 6, 7]))
        packets.append(_cut(rng, udp(ext=(*_some_headers(rng), fragment))))
    return "-m frag", data, packets


# Types whose two top bits are 00, "skip if unknown": the kernel's test netns loops
# what OUTPUT sent back in, and an unknown hop-by-hop option of another kind would
# have it answer with an ICMPv6 error (hop-by-hop options are read before PREROUTING).
_OPTIONS = (Option(5, b"\0\0"), Option(30, bytes(4)), Option(1, b""), Pad1(),
            Option(7, bytes(16)))


def _random_opts(rng, name: str):
    optsnr = rng.choice([0, 1, 2, 3, 3, 17])
    opts = [rng.choice([5 << 8 | 2, 5 << 8 | 0xFF, 30 << 8 | 4, 1 << 8, 0, 7 << 8 | 16,
                        rng.randrange(1 << 16)]) for _ in range(16)]
    data = struct.pack("<IBB16HB1x", rng.choice([8, 16, rng.randrange(40)]),
                       rng.choice([0, 1, 2, 3, 2, 3, rng.randrange(8)]),
                       rng.choice([0, 0, 1, rng.randrange(256)]), *opts, optsnr)
    kind = HopByHop if name == "hbh" else DestinationOptions
    packets = []
    for _ in range(8):
        header = kind(tuple(rng.choice(_OPTIONS) for _ in range(rng.randrange(4))),
                      ext_len=rng.choice([None] * 6 + [9]))
        before = [] if name == "hbh" else [h for h in _some_headers(rng) if h is not DST]
        packets.append(_cut(rng, udp(ext=(*before, header))))
    return f"-m {name}", data, packets


def _random_ipv6header(rng):
    data = bytes([_noise(rng, rng.choice([0x80, 0x81, 0x40, 0x21, 0x04, 0x02, 0x91]), 256),
                  rng.choice([0, 0xFF, rng.randrange(256)]), rng.choice([0, 0, 0xFF, 1])]) + \
        bytes(5)
    packets = []
    for _ in range(8):
        ext = tuple(_some_headers(rng))
        r = rng.random()
        if r < 0.2:
            packets.append(esp(5, ext=ext))
        elif r < 0.4:
            packets.append(Packet(A, B, NONE, ext=ext))
        else:
            packets.append(_cut(rng, udp(ext=ext)))
    return "-m ipv6header --header hop", data, packets


def _random_ah(rng):
    data = struct.pack("<IIIBB2x", *_pick_range(rng, SPIS), rng.choice([0, 0, 24, 16, 20]),
                       rng.choice([0, 0, 1, rng.randrange(256)]),
                       rng.choice([0, 0, 1, 2, 3, rng.randrange(256)]))
    packets = []
    for _ in range(8):
        if rng.random() < 0.2:
            ah = RawHeader(51, bytes([4, 0, rng.randrange(2)]) + bytes(1) +
                           rng.choice(SPIS).to_bytes(4, "big") + bytes(16))
        else:
            ah = AuthenticationHeader(spi=rng.choice(SPIS), icv=bytes(rng.choice([4, 12])),
                                      ext_len=rng.choice([None] * 6 + [20]))
        packets.append(_cut(rng, udp(ext=(*_some_headers(rng), ah))))
    return "-m ah", data, packets


def _random_esp(rng, family: Family):
    data = struct.pack("<IIB3x", *_pick_range(rng, SPIS),
                       rng.choice([0, 0, 1, rng.randrange(256)]))
    src, dst = (A4, B4) if family is Family.IPV4 else (A, B)
    packets = []
    for _ in range(8):
        kw = {}
        if rng.random() < 0.2:
            kw = {"header_len": rng.randrange(8), "payload_len": 0}
        elif rng.random() < 0.2:
            kw = {"frag_offset": 2} if family is Family.IPV4 else {"ext": (LATER,)}
        elif family is Family.IPV6:
            kw = {"ext": tuple(_some_headers(rng))}
        packets.append(esp(rng.choice(SPIS), src=src, dst=dst, **kw))
    return "-p esp -m esp", data, packets


def _random_mh(rng):
    data = bytes([*_pick_range(rng, [0, 1, 5, 6, 255]),
                  rng.choice([0, 0, 1, rng.randrange(256)])]) \
        + bytes(5)
    packets = []
    for _ in range(8):
        kw = {}
        if rng.random() < 0.15:
            kw = {"header_len": rng.randrange(6), "payload_len": 0}
        elif rng.random() < 0.15:
            kw = {"ext": (LATER,)}
        packets.append(mobility(rng.choice([0, 1, 5, 6, 255]),
                                proto=rng.choice([NONE] * 5 + [6]), **kw))
    return "-p mobility-header -m mh", data, packets


def _random_ipv4_ah(rng):
    data = struct.pack("<IIB3x", *_pick_range(rng, SPIS), rng.choice([0, 0, 1, rng.randrange(256)]))
    packets = []
    for _ in range(8):
        header = bytes([17, 4, 0, 0]) + rng.choice(SPIS).to_bytes(4, "big") + bytes(4)
        if rng.random() < 0.2:
            packets.append(Upper(A4, B4, 51, header=header[:rng.randrange(12)], payload_len=0))
        else:
            packets.append(Upper(A4, B4, 51, header=header, frag_offset=rng.choice([0] * 4 + [2])))
    return "-p ah -m ah", data, packets


_KINDS = {
    "rt": (Family.IPV6, _random_rt), "frag": (Family.IPV6, _random_frag),
    "hbh": (Family.IPV6, lambda rng: _random_opts(rng, "hbh")),
    "dst": (Family.IPV6, lambda rng: _random_opts(rng, "dst")),
    "ipv6header": (Family.IPV6, _random_ipv6header), "ah": (Family.IPV6, _random_ah),
    "esp": (Family.IPV6, lambda rng: _random_esp(rng, Family.IPV6)),
    "mh": (Family.IPV6, _random_mh),
    "esp (IPv4)": (Family.IPV4, lambda rng: _random_esp(rng, Family.IPV4)),
    "ah (IPv4)": (Family.IPV4, _random_ipv4_ah),
}


@pytest.mark.parametrize("kind", list(_KINDS))
def test_random_payloads_as_the_kernel_takes_them(kernel_netns, kind):
    """Each match's struct filled with random values (some the kernel's checkentry
    refuses) given to the kernel and to bpfilter: the same errno, or the same verdict
    for every packet aimed at what the payload says, and the same counters."""
    family, make = _KINDS[kind]
    rng = random.Random(kind)
    taken = 0
    for _ in range(30):
        rule, data, packets = make(rng)
        c = Case(f"{kind} {data.hex()}", f"-A OUTPUT {rule} -j DROP", [],
                 crafted=(("OUTPUT 1", 0, 0, data),), family=family)
        taken += payload_agrees(kernel_netns, c, packets)
    assert taken >= 12
