"""REJECT's answers without bpfilter.ko: sent by the service, through raw sockets in
the packet's namespace.

A netfilter BPF program can only drop. Without the module, a REJECT rule copies the
packet and what the kernel's answer depends on (the hook, the skb's checksum state
and packet type, its mark) into the service's ring (klog.LogRing, records of kind
REJECT_RECORD) and drops it; the service's drain hands each record here, which does
what nf_send_reset() / nf_send_unreach() (net/ipv4/netfilter/nf_reject_ipv4.c) and
nf_send_reset6() / nf_send_unreach6() (net/ipv6/netfilter/nf_reject_ipv6.c) do:
the same conditions for answering at all (fragments, checksums, resets, broadcast
and multicast routes, ICMP errors, the per-peer ICMP rate limit and its sysctls),
the same header fields and quote, sent from the namespace the packet was in, so that
the answer is routed, marked (fwmark_reflect) and filtered (OUTPUT) as the kernel's.

What differs, and is documented (README, REJECT): the answer leaves when the service
drains the ring, not while the hook runs; it is not attached to the original's
conntrack entry (nf_ct_attach), so OUTPUT rules see its own state; the ICMP rate
limit is a bucket of the service's beside the kernel's own (which the kernel's other
ICMP errors share) and the global ICMP credit is not charged; an IPv4 packet with
options gets no answer (icmp_send() echoes them) and is counted lost, as is one
whose checksum the kernel would verify but which is longer than the record holds.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Optional

from . import klog as K
from . import netns
from .model import Family

NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT = 1, 2, 3
NF_INET_PRE_ROUTING = 0
CHECKSUM_NONE, CHECKSUM_UNNECESSARY, CHECKSUM_COMPLETE, CHECKSUM_PARTIAL = 0, 1, 2, 3
PACKET_HOST = 0
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
# nf_reject_verify_csum(): protocols whose checksum the kernel does not verify first
UNVERIFIED = frozenset({47, 51, 50, 132, 136, 33})  # GRE, AH, ESP, SCTP, UDPLITE, DCCP
IP_OFFSET, IP_DF = 0x1FFF, 0x4000
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
RTN_LOCAL, RTN_BROADCAST, RTN_MULTICAST = 2, 3, 5
IFF_LOOPBACK = 0x8
IP_TRANSPARENT = 19
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2
IPV6_TRANSPARENT = 75
SO_MARK = 36
# enum ipt_reject_with -> ICMP_DEST_UNREACH's code (reject_tg())
ICMP_DEST_UNREACH = 3
ICMP_CODES = {0: 0, 1: 1, 2: 2, 3: 3, 5: 9, 6: 10, 8: 13}
ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})      # icmp_pointers[type].error
NR_ICMP_TYPES = 18
IPT_TCP_RESET = 7
ICMP_QUOTE = 576 - 20 - 8
# enum ip6t_reject_with -> ICMPV6_DEST_UNREACH's code (reject_tg6())
ICMPV6_DEST_UNREACH, ICMPV6_INFOMSG_MASK = 1, 0x80
ICMP6_CODES = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 7: 5, 8: 6}
IP6T_TCP_RESET = 6
ICMP6_QUOTE = 1280 - 40 - 8
IPV6_AUTOFLOWLABEL = 70
NEXTHDR_FRAGMENT, NEXTHDR_AUTH, NEXTHDR_NONE = 44, 51, 59
IPV6_EXT_HEADERS = frozenset({0, 43, 44, 51, 59, 60})


def _sum16(data: bytes, total: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    total += sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes, total: int = 0) -> int:
    return ~_sum16(data, total) & 0xFFFF


def _pseudo4(saddr: bytes, daddr: bytes, length: int, proto: int) -> int:
    return _sum16(saddr + daddr + struct.pack("!HH", proto, length))


def _pseudo6(saddr: bytes, daddr: bytes, length: int, proto: int) -> int:
    return _sum16(saddr + daddr + struct.pack("!II", length, proto))


@dataclass
class _Skb:
    """What the record says of the skb the rule dropped."""
    record: K.Record
    family: int
    hook: int
    length: int
    data: bytes          # the bytes copied, from the network header

    @classmethod
    def of(cls, record: K.Record) -> "_Skb":
        captured = record.u16(K.R_CAPTURED)
        if record.u8(K.R_PACKET_READ):
            raise K.Unreproducible("the packet's bytes could not be read")
        return cls(record, record.u8(K.R_FAMILY), record.u8(K.R_HOOK), record.skb_len,
                   record.raw[K.R_PACKET:K.R_PACKET + captured])

    def header(self, offset: int, size: int) -> Optional[bytes]:
        return self.record.header(offset, size)

    def whole(self) -> bytes:
        if len(self.data) < self.length:
            raise K.Unreproducible(f"the checksum the kernel verifies covers {self.length} "
                                   f"bytes, past the {len(self.data)} copied")
        return self.data

    @property
    def mark(self) -> int:
        return self.record.u32(K.R_MARK)

    def csum_unnecessary(self) -> bool:
        """skb_csum_unnecessary()."""
        summed = self.record.u8(K.R_IP_SUMMED)
        csum_start = self.record.u32(K.R_CSUM) & 0xFFFF
        return (summed == CHECKSUM_UNNECESSARY or bool(self.record.u8(K.R_CSUM_VALID))
                or (summed == CHECKSUM_PARTIAL
                    and csum_start >= self.record.u32(K.R_HEADROOM)))

    def checksum_ok(self, dataoff: int, proto: int, pseudo) -> bool:
        """nf_ip_checksum() / nf_ip6_checksum() == 0: `pseudo(length, proto)` is the
        pseudo-header's sum for TCP and UDP (IPv6: every protocol)."""
        summed = self.record.u8(K.R_IP_SUMMED)
        if summed in (CHECKSUM_UNNECESSARY, CHECKSUM_PARTIAL):
            return True
        covered = pseudo is not None and (proto in (IPPROTO_TCP, IPPROTO_UDP)
                                          or self.family == Family.IPV6)
        if summed == CHECKSUM_COMPLETE:
            if self.hook not in (NF_INET_PRE_ROUTING, NF_INET_LOCAL_IN):
                return True
            # skb->csum: the sum of the packet from its network header, in the
            # kernel's (host, little-endian) order
            folded = _sum16(struct.pack("<I", self.record.u32(K.R_CSUM)))
            if self.family == Family.IPV6:
                headers = self.header(0, dataoff)
                if headers is not None:
                    # csum_sub(skb->csum, the headers' sum)
                    folded = _sum16(b"", folded + (~_sum16(headers) & 0xFFFF))
            if (_sum16(b"", pseudo(self.length - dataoff, proto) + folded) if covered
                    else folded) == 0xFFFF:
                return True
        data = self.whole()
        if self.family == Family.IPV6:
            return _sum16(data[dataoff:], pseudo(self.length - dataoff, proto)) == 0xFFFF
        total = pseudo(self.length - dataoff, proto) if covered else 0
        return _sum16(data, total) == 0xFFFF


class _Bucket:
    """inet_peer_xrlim_allow(): XRLIM_BURST_FACTOR answers at once, then one per
    `timeout`; a peer first seen has a minute's tokens."""
    BURST = 6

    def __init__(self, now: float):
        self.tokens, self.last = 0.0, now - 60.0

    def allow(self, now: float, timeout: float) -> bool:
        tokens = min(self.tokens + now - self.last, self.BURST * timeout)
        self.last = now
        allowed = tokens >= timeout
        self.tokens = tokens - timeout if allowed else tokens
        return allowed


class _NoRoute(Exception):
    """The namespace has no route for the answer: the kernel sends none either."""


def _sysctl(name: str) -> str:
    with open(f"/proc/sys/net/{name}") as f:
        return f.read().strip()


class Answers:
    """Sends the answers of the REJECT records the drain hands it. Raises
    klog.Unreproducible for an answer it cannot send as the kernel would."""

    def __init__(self) -> None:
        self._paths: dict[int, str] = {}
        self._buckets: dict[tuple[int, bytes], _Bucket] = {}

    def _netns(self, inum: int) -> str:
        path = self._paths.get(inum)
        try:
            if path and os.stat(path).st_ino == inum:
                return path
        except OSError:
            pass
        path = netns.find(inum)
        if path is None:
            raise K.Unreproducible(f"netns {inum} is no task's nor named: nowhere to answer from")
        self._paths[inum] = path
        return path

    def send(self, record: K.Record) -> bool:
        """Answer as the kernel would; False when the kernel sends nothing either."""
        skb = _Skb.of(record)
        with netns.entered(self._netns(record.u32(K.R_NETNS))):
            try:
                if skb.family == Family.IPV4:
                    return self._answer4(skb, record.u8(K.R_LOGFLAGS), record.u32(K.R_NETNS))
                return self._answer6(skb, record.u8(K.R_LOGFLAGS), record.u32(K.R_NETNS))
            except _NoRoute:
                return False
            except OSError as err:
                if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPERM):
                    return False     # no route, or OUTPUT's rules dropped it: as the kernel's
                raise

    # -- IPv4 ------------------------------------------------------------------

    def _answer4(self, skb: _Skb, with_: int, inum: int) -> bool:
        ip = skb.header(0, 20)
        if ip is None:
            return False
        ihl = (ip[0] & 0xF) * 4
        frag, proto = struct.unpack_from("!H", ip, 6)[0], ip[9]
        saddr, daddr = ip[12:16], ip[16:20]
        if frag & IP_OFFSET:
            return False

        def pseudo(length: int, p: int) -> int:
            return _pseudo4(saddr, daddr, length, p)

        if with_ == IPT_TCP_RESET:
            return self._reset4(skb, ihl, proto, saddr, daddr, pseudo)
        code = ICMP_CODES.get(with_)
        if code is None:
            return False
        if not skb.csum_unnecessary() and _verified(skb, ihl, proto):
            if not skb.checksum_ok(ihl, proto, pseudo):
                return False
        return self._unreach4(skb, ihl, proto, saddr, daddr, code, inum)

    def _reset4(self, skb: _Skb, ihl: int, proto: int, saddr: bytes, daddr: bytes,
                pseudo) -> bool:
        # nf_reject_ip_tcphdr_get()
        if proto != IPPROTO_TCP:
            return False
        tcp = skb.header(ihl, 20)
        if tcp is None or tcp[13] & TCP_RST:
            return False
        if not skb.checksum_ok(ihl, IPPROTO_TCP, pseudo):
            return False
        route = _route4(daddr)
        if route.kind in (RTN_BROADCAST, RTN_MULTICAST):
            return False
        # ip4_dst_hoplimit() of the original's route, the reset not yet rerouted
        ttl = route.hoplimit or int(_sysctl("ipv4/ip_default_ttl"))
        segment = _reset_segment(tcp, skb.length - ihl,
                                 lambda n: _pseudo4(daddr, saddr, n, IPPROTO_TCP))
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_TCP) as s:
            # nf_reject_iphdr_put(): tos 0, DF (and so id 0), ttl ip4_dst_hoplimit(),
            # the original's addresses swapped, whether or not its destination is ours
            s.setsockopt(socket.SOL_IP, socket.IP_TOS, 0)
            s.setsockopt(socket.SOL_IP, socket.IP_TTL, ttl)
            s.setsockopt(socket.SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, _reply_mark("ipv4", skb.mark))
            s.bind((socket.inet_ntop(socket.AF_INET, daddr), 0))
            s.sendto(segment, (socket.inet_ntop(socket.AF_INET, saddr), 0))
        return True

    def _unreach4(self, skb: _Skb, ihl: int, proto: int, saddr: bytes, daddr: bytes,
                  code: int, inum: int) -> bool:
        # __icmp_send()
        if skb.record.u8(K.R_PKT_TYPE) != PACKET_HOST:
            return False
        route = _route4(daddr)
        if route.kind in (RTN_BROADCAST, RTN_MULTICAST):
            return False
        if proto == IPPROTO_ICMP:
            inner = skb.header(ihl, 1)
            if inner is None or inner[0] > NR_ICMP_TYPES or inner[0] in ICMP_ERRORS:
                return False
        if ihl > 20:
            raise K.Unreproducible("the kernel's ICMP error echoes the packet's IP options")
        local = route.kind == RTN_LOCAL
        back = _route4(saddr)
        if not back.loopback and (1 << ICMP_DEST_UNREACH) & int(_sysctl("ipv4/icmp_ratemask")):
            bucket = self._buckets.setdefault((inum, saddr), _Bucket(time.monotonic()))
            if not bucket.allow(time.monotonic(), int(_sysctl("ipv4/icmp_ratelimit")) / 1000):
                return False
        quote = skb.data[:min(skb.length, ICMP_QUOTE)]
        if len(quote) < min(skb.length, ICMP_QUOTE):
            raise K.Unreproducible("the quote reaches past the bytes copied")
        message = struct.pack("!BBHI", ICMP_DEST_UNREACH, code, 0, 0) + quote
        message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
        tos = (skb.data[1] & 0x1E) | 0xC0       # IPTOS_TOS_MASK, IPTOS_PREC_INTERNETCONTROL
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ICMP) as s:
            s.setsockopt(socket.SOL_IP, socket.IP_TOS, tos)
            s.setsockopt(socket.SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, _reply_mark("ipv4", skb.mark))
            if local:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                s.bind((socket.inet_ntop(socket.AF_INET, daddr), 0))
            s.sendto(message, (socket.inet_ntop(socket.AF_INET, saddr), 0))
        return True

    # -- IPv6 ------------------------------------------------------------------

    def _answer6(self, skb: _Skb, with_: int, inum: int) -> bool:
        ip6 = skb.header(0, 40)
        if ip6 is None:
            return False
        saddr, daddr = ip6[8:24], ip6[24:40]

        def pseudo(length: int, p: int) -> int:
            return _pseudo6(saddr, daddr, length, p)

        if with_ == IP6T_TCP_RESET:
            return self._reset6(skb, ip6, saddr, daddr, pseudo)
        code = ICMP6_CODES.get(with_)
        if code is None:
            return False
        # reject6_csum_ok()
        if not skb.csum_unnecessary():
            thoff, proto, frag = _skip_exthdr(skb, 40, ip6[6])
            if thoff < 0 or thoff >= skb.length or frag & 0xFFF8:
                return False
            if _verified(skb, thoff, proto) and not skb.checksum_ok(thoff, proto, pseudo):
                return False
        return self._unreach6(skb, saddr, daddr, code, inum)

    def _reset6(self, skb: _Skb, ip6: bytes, saddr: bytes, daddr: bytes, pseudo) -> bool:
        if not (_unicast6(saddr) and _unicast6(daddr)):
            return False
        # nf_reject_ip6_tcphdr_get()
        thoff, proto, _ = _skip_exthdr(skb, 40, ip6[6])
        if thoff < 0 or thoff > skb.length:
            return False
        tcp_len = skb.length - thoff
        if proto != IPPROTO_TCP or tcp_len < 20:
            return False
        tcp = skb.header(thoff, 20)
        if tcp is None or tcp[13] & TCP_RST:
            return False
        if not skb.checksum_ok(thoff, IPPROTO_TCP, pseudo):
            return False
        segment = _reset_segment(tcp, tcp_len,
                                 lambda n: _pseudo6(daddr, saddr, n, IPPROTO_TCP))
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_TCP) as s:
            # nf_reject_ip6hdr_put(): traffic class and flow label 0, hop limit
            # ip6_dst_hoplimit(), the original's addresses swapped
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_AUTOFLOWLABEL, 0)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, _reply_mark("ipv6", skb.mark))
            s.bind((socket.inet_ntop(socket.AF_INET6, daddr), 0))
            s.sendto(segment, (socket.inet_ntop(socket.AF_INET6, saddr), 0))
        return True

    def _unreach6(self, skb: _Skb, saddr: bytes, daddr: bytes, code: int, inum: int) -> bool:
        # icmp6_send()
        if daddr[0] == 0xFF or skb.record.u8(K.R_PKT_TYPE) != PACKET_HOST:
            return False
        if saddr == bytes(16) or saddr[0] == 0xFF:
            return False
        if _ineligible6(skb):
            return False
        local = _local6(daddr)
        in_name = K._cstr(skb.record.raw[K.R_IN:K.R_IN + 16]).decode()
        scope = 0
        if _needs_scope6(saddr):
            scope = socket.if_nametoindex(in_name) if in_name else 0
        back = _route(socket.AF_INET6, saddr)
        # a looped-back packet (an OUTPUT one's device is lo) skips the limits, as
        # does an answer leaving through lo; the per-peer timeout is no longer
        # shortened for wider routes (since 0201eedb69b2, in 6.18.y: on older kernels
        # the kernel's answers are limited more loosely)
        in_loopback = in_name in ("", "lo")
        if not in_loopback and not back.loopback and (
                _ratemasked6(ICMPV6_DEST_UNREACH)):
            timeout = int(_sysctl("ipv6/icmp/ratelimit")) / 1000
            bucket = self._buckets.setdefault((inum, saddr), _Bucket(time.monotonic()))
            if not bucket.allow(time.monotonic(), timeout):
                return False
        quote = skb.data[:min(skb.length, ICMP6_QUOTE)]
        if len(quote) < min(skb.length, ICMP6_QUOTE):
            raise K.Unreproducible("the quote reaches past the bytes copied")
        message = struct.pack("!BBHI", ICMPV6_DEST_UNREACH, code, 0, 0) + quote
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_ICMPV6) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0)
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, _reply_mark("ipv6", skb.mark))
            if local:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                s.bind((socket.inet_ntop(socket.AF_INET6, daddr), 0, 0,
                        scope if _needs_scope6(daddr) else 0))
            # the kernel computes an ICMPv6 socket's checksums
            s.sendto(message, (socket.inet_ntop(socket.AF_INET6, saddr), 0, 0, scope))
        return True


def _skip_exthdr(skb: _Skb, start: int, nexthdr: int) -> tuple[int, int, int]:
    """ipv6_skip_exthdr(): (offset or -1, the header there, the fragment offset
    field seen)."""
    frag = 0
    while nexthdr in IPV6_EXT_HEADERS:
        if nexthdr == NEXTHDR_NONE:
            return -1, nexthdr, frag
        hp = skb.header(start, 2)
        if hp is None:
            return -1, nexthdr, frag
        if nexthdr == NEXTHDR_FRAGMENT:
            fp = skb.header(start + 2, 2)
            if fp is None:
                return -1, nexthdr, frag
            frag = struct.unpack("!H", fp)[0]
            if frag & ~0x7:
                break
            length = 8
        elif nexthdr == NEXTHDR_AUTH:
            length = (hp[1] + 2) << 2
        else:
            length = (hp[1] + 1) << 3
        nexthdr = hp[0]
        start += length
    return start, nexthdr, frag


def _ineligible6(skb: _Skb) -> bool:
    """is_ineligible(): an ICMPv6 error (or what cannot be told from one) gets none."""
    if skb.length < 40:
        return True
    ptr, nexthdr, frag = _skip_exthdr(skb, 40, skb.data[6])
    if ptr < 0:
        return False
    if nexthdr == IPPROTO_ICMPV6:
        kind = skb.header(ptr, 1)
        if kind is None and frag != 0:
            return False
        return kind is None or not kind[0] & ICMPV6_INFOMSG_MASK
    return False


def _unicast6(address: bytes) -> bool:
    """ipv6_addr_type() & IPV6_ADDR_UNICAST: not multicast, unspecified, or a
    v4-mapped or other reserved kind the kernel does not call unicast."""
    ip = ipaddress.IPv6Address(address)
    return not (ip.is_multicast or ip.is_unspecified)


def _needs_scope6(address: bytes) -> bool:
    ip = ipaddress.IPv6Address(address)
    return ip.is_link_local or (ip.is_multicast and address[1] & 0xF in (1, 2))


def _local6(address: bytes) -> bool:
    """ipv6_chk_addr(net, addr, dev, 0): configured on any device of the namespace."""
    try:
        from pyroute2 import IPRoute
    except ImportError as err:
        raise K.Unreproducible(f"pyroute2 is missing from this build ({err})") from None
    text = str(ipaddress.IPv6Address(address))
    with IPRoute() as ipr:
        return any(a.get_attr("IFA_ADDRESS") == text for a in ipr.get_addr(family=socket.AF_INET6))


def _ratemasked6(kind: int) -> bool:
    """icmpv6_mask_allow() false: the type is rate-limited (net.ipv6.icmp.ratemask,
    a list of ranges)."""
    for part in _sysctl("ipv6/icmp/ratemask").split(","):
        low, _, high = part.partition("-")
        if part and int(low) <= kind <= int(high or low):
            return True
    return False


def _verified(skb: _Skb, dataoff: int, proto: int) -> bool:
    """nf_reject_verify_csum(): whether the kernel checks the checksum first."""
    if proto == IPPROTO_UDP:
        udp = skb.header(dataoff, 8)
        return udp is None or udp[6:8] != b"\0\0"
    return proto not in UNVERIFIED


def _reset_segment(tcp: bytes, tcp_len: int, pseudo) -> bytes:
    """nf_reject_ip_tcphdr_put() / nf_reject_ip6_tcphdr_put(): the reset's header,
    its checksum whole over `pseudo(length)`, the pseudo-header's sum."""
    sport, dport, seq, ack_seq = struct.unpack_from("!HHII", tcp)
    doff, flags = tcp[12] >> 4, tcp[13]
    if flags & TCP_ACK:
        seq_out, ack_out, flags_out = ack_seq, 0, TCP_RST
    else:
        ack_out = (seq + bool(flags & TCP_SYN) + bool(flags & TCP_FIN) + tcp_len
                   - doff * 4) & 0xFFFFFFFF
        seq_out, flags_out = 0, TCP_RST | TCP_ACK
    segment = struct.pack("!HHIIBBHHH", dport, sport, seq_out, ack_out, 5 << 4, flags_out,
                          0, 0, 0)
    return segment[:16] + struct.pack("!H", checksum(segment, pseudo(len(segment)))) + \
        segment[18:]


def _reply_mark(family: str, mark: int) -> int:
    """IP4_REPLY_MARK() / IP6_REPLY_MARK(): the mark, with fwmark_reflect on."""
    return mark if _sysctl(f"{family}/fwmark_reflect") != "0" else 0


@dataclass(frozen=True)
class _Route:
    kind: int
    loopback: bool
    hoplimit: Optional[int]      # the route's RTAX_HOPLIMIT metric


def _route4(address: bytes) -> _Route:
    return _route(socket.AF_INET, address)


def _route(domain: int, address: bytes) -> _Route:
    """The calling thread's namespace's route to `address`: its type and whether it
    leaves through a loopback device."""
    try:
        from pyroute2 import IPRoute
    except ImportError as err:   # bpfilter.ko's frozen helper leaves it out
        raise K.Unreproducible(f"pyroute2 is missing from this build ({err})") from None
    with IPRoute() as ipr:
        try:
            (answer,) = ipr.route("get", dst=str(ipaddress.ip_address(address)),
                                  family=domain)
        except Exception:    # no route: the kernel finds none to answer along either
            raise _NoRoute() from None
        oif = answer.get_attr("RTA_OIF")
        loopback = False
        if oif:
            (link,) = ipr.link("get", index=oif)
            loopback = bool(link["flags"] & IFF_LOOPBACK)
        metrics = answer.get_attr("RTA_METRICS")
        hoplimit = metrics.get_attr("RTAX_HOPLIMIT") if metrics else None
        return _Route(answer["type"], loopback, hoplimit)
