"""The LOG target's kernel log lines, written from userspace.

A netfilter BPF program cannot print, so a LOG rule copies what the kernel's line
is made of (devices, skb->mark, the packet's first bytes, the link-layer header)
into a BPF ring buffer as one Record, and the service drains the ring and writes to
/dev/kmsg the line net/netfilter/nf_log_syslog.c would have printed for that
packet: nf_log_dump_packet_common(), dump_mac_header(), and dump_ipv4_packet() or
dump_ipv6_packet() by the record's family (one ring serves every table), with the
transport headers both print (nf_log_dump_tcp_header(), nf_log_dump_udp_header()),
are re-done here byte for byte, on the copied bytes.

What cannot be the kernel's line exactly is not written; it is counted as lost with
lines the full ring dropped, and the count is logged (see README, LOG).

/dev/kmsg rate-limits what a writer sends through one open file (10 lines in 5
seconds, past which it drops them silently) unless kernel.printk_devkmsg=on, which no
distribution sets; the kernel's own LOG lines are not rate-limited. So the lines go
through a file opened afresh for every KMSG_BURST of them: none is dropped on a
stock system. They differ from the kernel's in their syslog facility (user: /dev/kmsg
takes no line as the kernel's) and their timing (when the service drains the ring).
With kernel.printk_devkmsg=off /dev/kmsg takes nothing: LOG rules are refused.
"""
from __future__ import annotations

import functools
import ipaddress
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

from .bpf import syscall as bpf
from .bpf.btf import Btf, BtfError
from .bpf.insn import MapRef
from .model import Family

# struct xt_log_info's logflags (include/uapi/linux/netfilter/xt_LOG.h)
XT_LOG_TCPSEQ = 0x01
XT_LOG_TCPOPT = 0x02
XT_LOG_IPOPT = 0x04
XT_LOG_UID = 0x08
XT_LOG_MACDECODE = 0x20

_SINK = ("LOG rules need the service's log ring (bpfilter serve and bpfilter.ko's helper "
         "have one, and write its lines to /dev/kmsg, which kernel.printk_devkmsg=off "
         "closes to them)")
_ANSWERS = ("REJECT rules without bpfilter.ko need the service's ring (bpfilter serve has "
            "one, and sends their answers)")


class RingRefs(NamedTuple):
    """The ring's maps as a kind of record names them: LOG's are offered only while
    /dev/kmsg takes lines, REJECT's always; both name the same maps."""
    ring: MapRef
    lost: MapRef
    share: MapRef
    drained: MapRef
    budget: MapRef


LOG_REFS = RingRefs(*(MapRef(name, _SINK) for name in
                      ("log_ring", "log_lost", "log_share", "log_drained", "log_budget")))
ANSWER_REFS = RingRefs(*(MapRef(name, _ANSWERS) for name in
                         ("answer_ring", "answer_lost", "answer_share", "answer_drained",
                          "answer_budget")))
LOG_RING, LOG_LOST = LOG_REFS.ring, LOG_REFS.lost
# Every namespace's records share LOG_RING; a namespace may have at most its share
# of the ring in flight (written, not yet drained), so that one namespace's flood
# cannot evict the lines of the others (the kernel's printk never refuses a line).
# LOG_SHARE (written by the programs only, by netns inum): SHARE.charged bytes
# reserved in the ring ever, SHARE.lost records refused over the share; LOG_DRAINED
# (written by the service only): bytes of the namespace's records drained ever;
# LOG_BUDGET (the service's): BUDGET.share, the bytes a namespace may have in
# flight, then zeros for a new LOG_SHARE entry.
LOG_SHARE, LOG_DRAINED, LOG_BUDGET = LOG_REFS.share, LOG_REFS.drained, LOG_REFS.budget
SHARE = struct.Struct("<QQ")          # charged, lost
BUDGET = struct.Struct("<Q16x")       # share, then the zeros
SHARE_CHARGED, SHARE_LOST = 0, 8
BUDGET_SHARE, BUDGET_ZEROS = 0, 8
MAX_LOGGING_NETNS = 4096

# The Record a LOG rule reserves in the ring. Multi-byte fields are in host order
# except VLAN_PROTO, copied as the skb holds it (network order).
R_NETNS = 0          # u32 inum of the hook's network namespace
R_MARK = 4           # u32 skb->mark
R_LEN = 8            # u32 skb->len
R_LEVEL = 12         # u8 --log-level
R_LOGFLAGS = 13      # u8
R_MAC_READ = 14      # u8, one of MAC_*
R_BRIDGED = 15       # u8 skb->active_extensions, bit SKB_EXT_BRIDGE_NF
R_DEV_TYPE = 16      # u16 skb->dev->type
R_HARD_HEADER_LEN = 18
R_MAC_HEADER = 20    # u16 skb->mac_header
R_NETWORK_HEADER = 22
R_VLAN_PROTO = 24    # u16 skb->vlan_proto
R_VLAN_TCI = 26      # u16 skb->vlan_tci
R_CAPTURED = 28      # u16 packet bytes copied to R_PACKET
R_PACKET_READ = 30   # u8 0: copied
R_FAMILY = 31        # u8 the rule's family (NFPROTO_IPV4, NFPROTO_IPV6): which line to write
R_IN = 32            # 16 bytes, zero without an input device
R_OUT = 48
R_PREFIX = 64        # 30 bytes, NUL-terminated, padded to 32
# A REJECT rule's record (R_LEVEL = REJECT_RECORD, which no LOG level is) holds, in
# the prefix's place, what nf_send_reset() and icmp_send() ask of the skb beside its
# bytes; R_LOGFLAGS holds --reject-with
REJECT_RECORD = 0xFF
R_HOOK = R_PREFIX        # u8 nf_hook_state->hook
R_IP_SUMMED = R_PREFIX + 1   # u8 skb->ip_summed
R_CSUM_VALID = R_PREFIX + 2  # u8 skb->csum_valid
R_PKT_TYPE = R_PREFIX + 3    # u8 skb->pkt_type
R_CSUM = R_PREFIX + 4        # u32 skb->csum (csum_start, csum_offset when partial)
R_HEADROOM = R_PREFIX + 8    # u32 skb->data - skb->head
# skb_is_gso() && skb_is_gso_tcp(), which the LEN= of a packet whose length field is
# 0 depends on (iph_totlen(), ipv6_payload_len()): skb_shinfo()'s gso_size and gso_type
R_GSO_READ = 96      # u8 0: both read
R_GSO_SIZE = 98      # u16
R_GSO_TYPE = 100     # u32
# --log-uid: the credentials of the file behind skb->sk (nf_log_dump_sk_uid_gid()),
# when R_SK_IDS says they were found
R_SK_IDS = R_PREFIX + 31     # u8, after the prefix's NUL (a LOG record's)
R_UID = 104          # u32 f_cred->fsuid
R_GID = 108          # u32 f_cred->fsgid
R_MAC = 112
MAC_MAX = 64         # link-layer header bytes copied (dump_mac_header reads at most this)
R_PACKET = R_MAC + MAC_MAX
# How many packet bytes a record holds: min(skb->len, the class), in the smallest
# class that fits, so that short packets take little of the ring. IPv4: everything
# dump_ipv4_packet() can read (ip header with options, icmp header, the embedded ip
# header with options, a tcp header with options: 60 + 8 + 60 + 60). IPv6 headers
# have no such bound (an extension header takes up to 2 KiB, a chain of them the whole
# packet): 1280 bytes, IPv6's minimum MTU, hold any ICMPv6 error whole (RFC 4443 2.4
# keeps them within it) and any header chain a sane packet has (RFC 7112); a line
# that reads further is lost.
CAPTURE_CLASSES = {Family.IPV4: (192,), Family.IPV6: (128, 256, 512, 1280)}
# A REJECT answer quotes up to 548 bytes of an IPv4 packet (576 less the headers) and
# 1232 of an IPv6 one (1280 less them); a checksum the kernel verifies before it
# answers covers the whole packet: up to a typical MTU, after which the answer is
# lost unless the skb's checksum state spares the verification
ANSWER_CLASSES = {Family.IPV4: (128, 576, 1600), Family.IPV6: (128, 512, 1280, 1600)}
# skb_shinfo()->gso_type bits of skb_is_gso_tcp() (include/linux/skbuff.h)
SKB_GSO_TCPV4, SKB_GSO_TCPV6 = 1 << 0, 1 << 4


def record_size(captured: int) -> int:
    """The size of the record for a class of `captured` packet bytes."""
    return R_PACKET + captured


def ring_charge(size: int) -> int:
    """What a record of `size` bytes takes of the ring: an 8-byte header, and the
    whole rounded up to 8 (kernel/bpf/ringbuf.c)."""
    return (size + 8 + 7) & ~7


def share_of(logging: int) -> int:
    """The bytes each of `logging` namespaces may have in flight: room is always
    left for one more namespace, so a newcomer's first lines find space."""
    return RING_SIZE // max(logging + 1, 2)


MAC_NONE, MAC_COPIED, MAC_FAILED = 0, 1, 2
MAC_UNSET = 0xFFFF   # skb->mac_header when no mac header was set
ETH_HLEN = 14
ARPHRD_ETHER, ARPHRD_SIT = 1, 776

RING_SIZE = 1 << 22  # 4 MiB, some 10000 lines in flight

# nf_log_buf's buffer size, S_SIZE (net/netfilter/nf_log.c): 1024 less the count and
# the NUL
S_SIZE = 1024 - (4 + 1)
KERN_SOH = 0x01
# The initial network namespace's inode, fixed since Linux 6.18 (PROC_NET_INIT_INO),
# allocated at boot before: initial_netns() reads it. nf_log_allowed() logs other
# namespaces only with nf_log_all_netns set.
PROC_NET_INIT_INO = 0xEFFFFFF9
INIT_NETNS = "/proc/1/ns/net"
NF_LOG_ALL_NETNS = "/proc/sys/net/netfilter/nf_log_all_netns"
PRINTK_DEVKMSG = "/proc/sys/kernel/printk_devkmsg"

_NR_ICMP_TYPES = 18
_ICMP_REQUIRED_LEN = {0: 4, 3: 28, 4: 28, 5: 28, 8: 4, 11: 28, 12: 28, 13: 20, 14: 20,
                      17: 12, 18: 12}


class Unreproducible(Exception):
    """The kernel's line for this record cannot be rebuilt exactly."""


def _u32(value: int) -> int:
    # the kernel prints skb->len - offset as unsigned int, wrapping when negative
    return value & 0xFFFFFFFF


def _ip(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def _ip6(raw: bytes) -> str:
    """%pI6: eight groups of four lowercase hex digits, nothing compressed."""
    return ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


class _LineBuffer:
    """nf_log_buf: nf_log_buf_add() appends a piece while it leaves room for the NUL;
    the first that does not is cut to the room left (vsnprintf() writes what fits)
    and fills the buffer, so that nothing is added after it."""

    def __init__(self) -> None:
        self.text = bytearray()
        self.full = False

    def add(self, piece) -> None:
        if self.full:
            return
        piece = piece.encode() if isinstance(piece, str) else piece
        if len(self.text) + len(piece) < S_SIZE:
            self.text += piece
        else:
            self.text += piece[:S_SIZE - 1 - len(self.text)]
            self.full = True


@dataclass
class Record:
    raw: bytes

    def u8(self, off: int) -> int:
        return self.raw[off]

    def u16(self, off: int) -> int:
        return struct.unpack_from("<H", self.raw, off)[0]

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.raw, off)[0]

    @property
    def skb_len(self) -> int:
        return self.u32(R_LEN)

    def header(self, offset: int, size: int) -> Optional[bytes]:
        """skb_header_pointer(): the bytes, or None past skb->len."""
        if offset + size > self.skb_len:
            return None
        captured = self.u16(R_CAPTURED)
        if offset + size > captured:
            raise Unreproducible(f"the line reads packet bytes past the {captured} copied")
        return self.raw[R_PACKET + offset:R_PACKET + offset + size]

    def gso_tcp(self) -> bool:
        """skb_is_gso(skb) && skb_is_gso_tcp(skb)."""
        if self.u8(R_GSO_READ):
            raise Unreproducible("the skb's gso state could not be read")
        return bool(self.u16(R_GSO_SIZE) and
                    self.u32(R_GSO_TYPE) & (SKB_GSO_TCPV4 | SKB_GSO_TCPV6))


def format_line(record: Record) -> tuple[int, bytes]:
    """(level, text) of nf_log_ip_packet()'s or nf_log_ip6_packet()'s line, as printk
    stores it."""
    r = record
    family = r.u8(R_FAMILY)
    if family not in (Family.IPV4, Family.IPV6):
        raise Unreproducible(f"a record of unknown family {family}")
    if r.u8(R_PACKET_READ):
        raise Unreproducible("the packet could not be copied")
    if r.u8(R_BRIDGED):
        raise Unreproducible("bridged packet: PHYSIN=/PHYSOUT= need br_netfilter's state")
    m = _LineBuffer()
    level = r.u8(R_LEVEL)
    in_name, out_name = _cstr(r.raw[R_IN:R_IN + 16]), _cstr(r.raw[R_OUT:R_OUT + 16])
    m.add(bytes([KERN_SOH, ord("0") + level]) + _cstr(r.raw[R_PREFIX:R_PREFIX + 30])
          + b"IN=" + in_name + b" OUT=" + out_name + b" ")
    if in_name:
        _dump_mac_header(m, r)
    # skb_network_offset() is 0 at the IP hooks
    if family == Family.IPV4:
        _dump_ipv4_packet(m, r, 0)
    else:
        _dump_ipv6_packet(m, r, 0, recurse=True)
    return _printk_store(bytes(m.text))


def _printk_store(text: bytes) -> tuple[int, bytes]:
    """What vprintk_store() keeps of a kernel line: leading KERN_SOH pairs set the
    level and are stripped (a --log-prefix may start with some too)."""
    level = None
    while len(text) >= 2 and text[0] == KERN_SOH and text[1] in b"01234567c":
        if text[1] == ord("c"):
            raise Unreproducible("the prefix makes the kernel line a continuation line")
        level = text[1] - ord("0")
        text = text[2:]
    return level, text


def _dump_mac_header(m: _LineBuffer, r: Record) -> None:
    dev_type, hard_len = r.u16(R_DEV_TYPE), r.u16(R_HARD_HEADER_LEN)
    mac_header, network_header = r.u16(R_MAC_HEADER), r.u16(R_NETWORK_HEADER)

    def mac_bytes(size: int) -> bytes:
        if r.u8(R_MAC_READ) != MAC_COPIED or size > MAC_MAX:
            raise Unreproducible(f"{size} link-layer header bytes could not be copied")
        return r.raw[R_MAC:R_MAC + size]

    if r.u8(R_LOGFLAGS) & XT_LOG_MACDECODE and dev_type == ARPHRD_ETHER:
        if mac_header == MAC_UNSET or network_header - mac_header < ETH_HLEN:
            return
        eth = mac_bytes(ETH_HLEN)
        m.add(f"MACSRC={_mac(eth[6:12])} MACDST={_mac(eth[0:6])} ")
        vlan_proto = struct.unpack_from("!H", r.raw, R_VLAN_PROTO)[0]
        if vlan_proto or r.u16(R_VLAN_TCI):
            m.add(f"VPROTO={vlan_proto:04x} VID={r.u16(R_VLAN_TCI)} ")
        m.add(f"MACPROTO={struct.unpack_from('!H', eth, 12)[0]:04x} ")
        return
    m.add("MAC=")
    if hard_len and mac_header != network_header:
        if dev_type == ARPHRD_SIT:
            raise Unreproducible("sit tunnel: MAC= reads before the link-layer header")
        m.add(f"{mac_bytes(hard_len)[0]:02x}")
        for b in mac_bytes(hard_len)[1:]:
            m.add(f":{b:02x}")
    m.add(" ")


# ---------------------------------------------------------------- IPv4


def _dump_ipv4_packet(m: _LineBuffer, r: Record, iphoff: int) -> None:
    flags = r.u8(R_LOGFLAGS)
    ih = r.header(iphoff, 20)
    if ih is None:
        m.add("TRUNCATED")
        return
    ver_ihl, tos, tot_len, ident, frag_off, ttl, proto = struct.unpack_from("!BBHHHBB", ih)
    ihl = (ver_ihl & 0x0F) * 4
    m.add(f"SRC={_ip(ih[12:16])} DST={_ip(ih[16:20])} ")
    # iph_totlen(): tot_len 0 is skb->len for a BIG TCP packet
    length = tot_len or (r.skb_len if r.gso_tcp() else 0)
    m.add(f"LEN={length} TOS=0x{tos & 0x1E:02X} PREC=0x{tos & 0xE0:02X} TTL={ttl} ID={ident} ")
    for bit, name in ((0x8000, "CE "), (0x4000, "DF "), (0x2000, "MF ")):
        if frag_off & bit:
            m.add(name)
    fragment = frag_off & 0x1FFF
    if fragment:
        m.add(f"FRAG:{fragment} ")
    if flags & XT_LOG_IPOPT and ihl > 20:
        opts = r.header(iphoff + 20, ihl - 20)
        if opts is None:
            m.add("TRUNCATED")
            return
        m.add("OPT (" + opts.hex().upper() + ") ")
    thoff = iphoff + ihl
    if proto == 6:
        if _dump_tcp_header(m, r, fragment, thoff, flags):
            return
    elif proto in (17, 136):
        if _dump_udp_header(m, r, proto, fragment, thoff):
            return
    elif proto == 1:
        _dump_icmp(m, r, iphoff, fragment, thoff)
    elif proto == 51:
        if not fragment:
            m.add("PROTO=AH ")
            _dump_spi(m, r, thoff, 12, 4)   # struct ip_auth_hdr
    elif proto == 50:
        m.add("PROTO=ESP ")
        if not fragment:
            _dump_spi(m, r, thoff, 8, 0)    # struct ip_esp_hdr
    else:
        m.add(f"PROTO={proto} ")
    if iphoff == 0:
        _dump_sk_uid_gid(m, r)
    mark = r.u32(R_MARK)
    if iphoff == 0 and mark:
        m.add(f"MARK=0x{mark:x} ")


def _dump_sk_uid_gid(m: _LineBuffer, r: Record) -> None:
    """With --log-uid: nf_log_dump_sk_uid_gid()'s UID= and GID= (the ids as the
    initial namespace sees them: the kernel's own numbers)."""
    if r.u8(R_LOGFLAGS) & XT_LOG_UID and r.u8(R_SK_IDS):
        m.add(f"UID={r.u32(R_UID)} GID={r.u32(R_GID)} ")


def _dump_spi(m: _LineBuffer, r: Record, thoff: int, header_size: int, spi_at: int) -> None:
    hdr = r.header(thoff, header_size)
    if hdr is None:
        m.add(f"INCOMPLETE [{_u32(r.skb_len - thoff)} bytes] ")
        return
    m.add(f"SPI=0x{struct.unpack_from('!I', hdr, spi_at)[0]:x} ")


def _dump_icmp(m: _LineBuffer, r: Record, iphoff: int, fragment: int, offset: int) -> None:
    m.add("PROTO=ICMP ")
    if fragment:
        return
    ich = r.header(offset, 8)
    left = _u32(r.skb_len - offset)
    if ich is None:
        m.add(f"INCOMPLETE [{left} bytes] ")
        return
    icmp_type, code = ich[0], ich[1]
    m.add(f"TYPE={icmp_type} CODE={code} ")
    required = _ICMP_REQUIRED_LEN.get(icmp_type, 0) if icmp_type <= _NR_ICMP_TYPES else 0
    if required and left < required:
        m.add(f"INCOMPLETE [{left} bytes] ")
        return
    if icmp_type in (0, 8):
        m.add("ID={} SEQ={} ".format(*struct.unpack_from("!HH", ich, 4)))
    elif icmp_type == 12:
        m.add(f"PARAMETER={ich[4]} ")
    elif icmp_type in (3, 4, 5, 11):
        if icmp_type == 5:
            m.add(f"GATEWAY={_ip(ich[4:8])} ")
        if iphoff == 0:   # only recurse once
            m.add("[")
            _dump_ipv4_packet(m, r, offset + 8)
            m.add("] ")
        if icmp_type == 3 and code == 4:
            m.add(f"MTU={struct.unpack_from('!H', ich, 6)[0]} ")


# ---------------------------------------------------------------- IPv6

NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT = 0, 43, 44
NEXTHDR_ESP, NEXTHDR_AUTH, NEXTHDR_NONE, NEXTHDR_DEST = 50, 51, 59, 60
# nf_ip6_ext_hdr(), less NEXTHDR_NONE, which ends dump_ipv6_packet()'s walk too
_IPV6_WALKED = frozenset({NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT, NEXTHDR_ESP,
                          NEXTHDR_AUTH, NEXTHDR_DEST})
ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEED, ICMPV6_PARAMPROB = 1, 2, 3, 4
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129


def _dump_ipv6_packet(m: _LineBuffer, r: Record, ip6hoff: int, recurse: bool) -> None:
    flags = r.u8(R_LOGFLAGS)
    ipopt = flags & XT_LOG_IPOPT
    ih = r.header(ip6hoff, 40)
    if ih is None:
        m.add("TRUNCATED")
        return
    word, payload_len, nexthdr, hop_limit = struct.unpack_from("!IHBB", ih)
    m.add(f"SRC={_ip6(ih[8:24])} DST={_ip6(ih[24:40])} ")
    # ipv6_payload_len(): a BIG TCP packet's 0 stands for all that follows the header
    if not payload_len and r.gso_tcp():
        payload_len = _u32(r.skb_len - 40)
    m.add(f"LEN={payload_len + 40} TC={(word & 0x0FF00000) >> 20} HOPLIMIT={hop_limit} "
          f"FLOWLBL={word & 0x000FFFFF} ")

    # The extension headers, each named and skipped as the kernel does. Its walk ends
    # the line at ESP, at a hop-by-hop, routing or destination header after a later
    # fragment, and at a header it cannot read (TRUNCATED): no transport header, no
    # MARK= then.
    fragment = False
    ptr, current = ip6hoff + 40, nexthdr
    while current in _IPV6_WALKED:
        hp = r.header(ptr, 2)
        if hp is None:
            m.add("TRUNCATED")
            return
        if ipopt:
            m.add("OPT ( ")
        if current == NEXTHDR_FRAGMENT:
            m.add("FRAG:")
            fh = r.header(ptr, 8)
            if fh is None:
                m.add("TRUNCATED ")
                return
            frag_off, ident = struct.unpack_from("!2xHI", fh)
            m.add(f"{frag_off & 0xFFF8} ")
            if frag_off & 0x0001:
                m.add("INCOMPLETE ")
            m.add(f"ID:{ident:08x} ")
            if frag_off & 0xFFF8:
                fragment = True
            hdrlen = 8
        elif current in (NEXTHDR_DEST, NEXTHDR_ROUTING, NEXTHDR_HOP):
            if fragment:
                if ipopt:
                    m.add(")")
                return
            hdrlen = (hp[1] + 1) * 8          # ipv6_optlen()
        elif current == NEXTHDR_AUTH:
            if ipopt:
                m.add("AH ")
                if fragment:
                    m.add(")")
                    return
                ah = r.header(ptr, 12)        # struct ip_auth_hdr
                if ah is None:
                    m.add(f"INCOMPLETE [{_u32(r.skb_len - ptr)} bytes] )")
                    return
                m.add(f"SPI=0x{struct.unpack_from('!I', ah, 4)[0]:x} ")
            # without --log-ip-options a later fragment's "AH" is skipped all the same
            hdrlen = (hp[1] + 2) * 4          # ipv6_authlen()
        else:                                 # NEXTHDR_ESP
            if ipopt:
                m.add("ESP ")
                if fragment:
                    m.add(")")
                    return
                eh = r.header(ptr, 8)         # struct ip_esp_hdr
                if eh is None:
                    m.add(f"INCOMPLETE [{_u32(r.skb_len - ptr)} bytes] )")
                    return
                m.add(f"SPI=0x{struct.unpack_from('!I', eh, 0)[0]:x} )")
            return
        if ipopt:
            m.add(") ")
        current = hp[0]
        ptr += hdrlen

    if current == 6:
        if _dump_tcp_header(m, r, fragment, ptr, flags):
            return
    elif current in (17, 136):
        if _dump_udp_header(m, r, current, fragment, ptr):
            return
    elif current == 58:
        if _dump_icmpv6(m, r, fragment, ptr, recurse):
            return
    else:
        m.add(f"PROTO={current} ")
    if recurse:
        _dump_sk_uid_gid(m, r)
    mark = r.u32(R_MARK)
    if recurse and mark:
        m.add(f"MARK=0x{mark:x} ")


def _dump_icmpv6(m: _LineBuffer, r: Record, fragment: bool, ptr: int, recurse: bool) -> bool:
    """dump_ipv6_packet()'s ICMPv6 case; True when it returns from the dump."""
    m.add("PROTO=ICMPv6 ")
    if fragment:
        return False
    ic = r.header(ptr, 8)
    if ic is None:
        m.add(f"INCOMPLETE [{_u32(r.skb_len - ptr)} bytes] ")
        return True
    icmp_type, code, _, rest = struct.unpack_from("!BBHI", ic)
    m.add(f"TYPE={icmp_type} CODE={code} ")
    if icmp_type in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY):
        m.add("ID={} SEQ={} ".format(*struct.unpack_from("!HH", ic, 4)))
    elif icmp_type in (ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEED,
                       ICMPV6_PARAMPROB):
        if icmp_type == ICMPV6_PARAMPROB:
            m.add(f"POINTER={rest:08x} ")
        if recurse:   # one level of recursion
            m.add("[")
            _dump_ipv6_packet(m, r, ptr + 8, False)
            m.add("] ")
        if icmp_type == ICMPV6_PKT_TOOBIG:
            m.add(f"MTU={rest} ")
    return False


# ---------------------------------------------------------------- transport headers
# (nf_log_dump_tcp_header() and nf_log_dump_udp_header(), for both families)


@functools.lru_cache(maxsize=1)
def tcp_has_ae() -> bool:
    """Whether the running kernel names tcp's AE bit (AccECN, Linux 6.18): then struct
    tcphdr has it, TCP_RESERVED_BITS leaves it out of RES= and the line says "AE";
    before (Debian's 6.12), RES= counts it among the reserved bits."""
    try:
        Btf.vmlinux().bitfield("tcphdr", "ae")
    except BtfError:
        return False
    return True


def _dump_tcp_header(m: _LineBuffer, r: Record, fragment: int, offset: int, flags: int) -> bool:
    m.add("PROTO=TCP ")
    if fragment:
        return False
    th = r.header(offset, 20)
    if th is None:
        m.add(f"INCOMPLETE [{_u32(r.skb_len - offset)} bytes] ")
        return True
    # word: tcp_flag_word(), data offset, reserved bits, flags and window
    sport, dport, seq, ack, word, _, urgp = struct.unpack_from("!HHIIIHH", th)
    m.add(f"SPT={sport} DPT={dport} ")
    if flags & XT_LOG_TCPSEQ:
        m.add(f"SEQ={seq} ACK={ack} ")
    m.add(f"WINDOW={word & 0xFFFF} ")
    ae = tcp_has_ae()
    m.add(f"RES=0x{(word & (0x0E000000 if ae else 0x0F000000)) >> 22:02x} ")
    if ae and word & 0x01000000:
        m.add("AE ")
    for bit, name in ((0x00800000, "CWR "), (0x00400000, "ECE "),
                      (0x00200000, "URG "), (0x00100000, "ACK "), (0x00080000, "PSH "),
                      (0x00040000, "RST "), (0x00020000, "SYN "), (0x00010000, "FIN ")):
        if word & bit:
            m.add(name)
    m.add(f"URGP={urgp} ")
    doff = (word >> 28) * 4
    if flags & XT_LOG_TCPOPT and doff > 20:
        opts = r.header(offset + 20, doff - 20)
        if opts is None:
            m.add("OPT (TRUNCATED)")
            return True
        m.add("OPT (" + opts.hex().upper() + ") ")
    return False


def _dump_udp_header(m: _LineBuffer, r: Record, proto: int, fragment: int, offset: int) -> bool:
    m.add("PROTO=UDP " if proto == 17 else "PROTO=UDPLITE ")
    if fragment:
        return False
    uh = r.header(offset, 8)
    if uh is None:
        m.add(f"INCOMPLETE [{_u32(r.skb_len - offset)} bytes] ")
        return True
    sport, dport, length = struct.unpack_from("!HHH", uh)
    m.add(f"SPT={sport} DPT={dport} LEN={length} ")
    return False


# ---------------------------------------------------------------- the ring


class LogRing:
    """The ring buffer every LOG rule writes to, its count of records the full
    ring refused, and each namespace's share of it (LOG_SHARE). One per service,
    pinned next to the tables so that a restarted service drains what its
    predecessor's programs still write."""

    # name (pinned and MapRef), (map type, key size, value size, entries)
    MAPS = {
        "log_lost": (bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 1),
        "log_share": (bpf.BPF_MAP_TYPE_HASH, 4, SHARE.size, MAX_LOGGING_NETNS),
        "log_drained": (bpf.BPF_MAP_TYPE_HASH, 4, 8, MAX_LOGGING_NETNS),
        "log_budget": (bpf.BPF_MAP_TYPE_ARRAY, 4, BUDGET.size, 1),
    }

    def __init__(self, ring_fd: int, fds: dict[str, int]):
        self.ring_fd, self.fds = ring_fd, fds
        self.lost_fd = fds["log_lost"]
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(ring_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # the data pages are mapped twice in a row, so a record never wraps
        self._producer = mmap.mmap(ring_fd, page + 2 * RING_SIZE, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        self._lost_seen = self.dropped()
        self._share_lost_seen: dict[int, int] = {}
        if self.budget() == 0:
            self.set_budget(share_of(0))

    @classmethod
    def _create_map(cls, name: str) -> int:
        kind, key, value, entries = cls.MAPS[name]
        return bpf.map_create(kind, key, value, entries, "bpfilter_" + name[4:])

    @classmethod
    def create(cls) -> "LogRing":
        fds: dict[str, int] = {}
        ring_fd = bpf.map_create(bpf.BPF_MAP_TYPE_RINGBUF, 0, 0, RING_SIZE, "bpfilter_log")
        try:
            for name in cls.MAPS:
                fds[name] = cls._create_map(name)
        except BaseException:
            for fd in (ring_fd, *fds.values()):
                os.close(fd)
            raise
        return cls(ring_fd, fds)

    @classmethod
    def pinned(cls, root: str) -> "LogRing":
        """The ring pinned under `root`, made and pinned there if missing; the share
        maps a service of an earlier version did not pin are made and pinned."""
        paths = {name: os.path.join(root, name) for name in ("log_ring", *cls.MAPS)}
        if not os.path.exists(paths["log_ring"]) or not os.path.exists(paths["log_lost"]):
            ring = cls.create()
            for name, path in paths.items():
                if os.path.exists(path):
                    os.unlink(path)
                bpf.obj_pin(ring.ring_fd if name == "log_ring" else ring.fds[name], path)
            return ring
        fds: dict[str, int] = {}
        try:
            for name in cls.MAPS:
                if os.path.exists(paths[name]):
                    fds[name] = bpf.obj_get(paths[name])
                else:
                    fds[name] = cls._create_map(name)
                    bpf.obj_pin(fds[name], paths[name])
            ring_fd = bpf.obj_get(paths["log_ring"])
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(ring_fd, fds)

    def maps(self, refs: RingRefs = LOG_REFS) -> dict[MapRef, int]:
        return dict(zip(refs, (self.ring_fd, self.lost_fd, self.fds["log_share"],
                               self.fds["log_drained"], self.fds["log_budget"])))

    def budget(self) -> int:
        raw = bpf.map_lookup(self.fds["log_budget"], struct.pack("<I", 0), BUDGET.size)
        return BUDGET.unpack(raw)[0]

    def set_budget(self, share: int) -> None:
        bpf.map_update(self.fds["log_budget"], struct.pack("<I", 0), BUDGET.pack(share))

    def fileno(self) -> int:
        """Readable (poll, select) when records wait."""
        return self.ring_fd

    def dropped(self) -> int:
        """Records the full ring refused, ever."""
        return struct.unpack("<Q", bpf.map_lookup(self.lost_fd, struct.pack("<I", 0), 8))[0]

    def records(self) -> Iterator[Record]:
        """The records written so far, each consumed once; what each took of the
        ring is credited to its namespace's share when the iteration ends."""
        drained: dict[int, int] = {}
        try:
            yield from self._records(drained)
        finally:
            self._credit(drained)

    def _records(self, drained: dict[int, int]) -> Iterator[Record]:
        consumer = struct.unpack_from("<Q", self._consumer, 0)[0]
        producer = struct.unpack_from("<Q", self._producer, 0)[0]
        busy, discarded = 1 << 31, 1 << 30
        while consumer < producer:
            head = consumer & (RING_SIZE - 1)
            length = struct.unpack_from("<I", self._data, head)[0]
            if length & busy:
                break   # reserved, not yet submitted: the rest comes next time
            size = length & ~(busy | discarded)
            record = Record(bytes(self._data[head + 8:head + 8 + size]))
            consumer += ring_charge(size)
            struct.pack_into("<Q", self._consumer, 0, consumer)
            if size >= R_NETNS + 4:
                inum = record.u32(R_NETNS)
                drained[inum] = drained.get(inum, 0) + ring_charge(size)
            if not length & discarded:
                yield record

    def _credit(self, drained: dict[int, int]) -> None:
        """Credit the namespaces with what their records took of the ring; forget
        the namespaces with nothing in flight (LOG_SHARE holds a bounded number),
        and give each of those still logging its share."""
        share, done = self.fds["log_share"], self.fds["log_drained"]
        for inum, freed in drained.items():
            key = struct.pack("<I", inum)
            before = bpf.map_lookup(done, key, 8)
            total = (struct.unpack("<Q", before)[0] if before else 0) + freed
            bpf.map_update(done, key, struct.pack("<Q", total))
        logging = 0
        key = None
        while (key := bpf.map_next_key(share, key, 4)) is not None:
            value = bpf.map_lookup(share, key, SHARE.size)
            done_raw = bpf.map_lookup(done, key, 8)
            if value is None:
                continue
            charged, lost = SHARE.unpack(value)
            inum = struct.unpack("<I", key)[0]
            in_flight = charged - (struct.unpack("<Q", done_raw)[0] if done_raw else 0)
            if in_flight == 0 and lost == self._share_lost_seen.get(inum, 0):
                bpf.map_delete(share, key)
                bpf.map_delete(done, key)
                self._share_lost_seen.pop(inum, None)
            else:
                logging += 1
        if self.budget() != share_of(logging):
            self.set_budget(share_of(logging))

    def lost_over_share(self) -> dict[int, int]:
        """{netns inum: records refused over its share since the last call}."""
        out = {}
        share, key = self.fds["log_share"], None
        while (key := bpf.map_next_key(share, key, 4)) is not None:
            value = bpf.map_lookup(share, key, SHARE.size)
            if value is None:
                continue
            inum, lost = struct.unpack("<I", key)[0], SHARE.unpack(value)[1]
            if lost != self._share_lost_seen.get(inum, 0):
                out[inum] = lost - self._share_lost_seen.get(inum, 0)
            self._share_lost_seen[inum] = lost
        return out

    def newly_dropped(self) -> int:
        now = self.dropped()
        count, self._lost_seen = now - self._lost_seen, now
        return count

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()
        os.close(self.ring_fd)
        for fd in self.fds.values():
            os.close(fd)


def _sysctl(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


# /dev/kmsg's rate limit per open file when printk_devkmsg=ratelimit (the default):
# DEFAULT_RATELIMIT_BURST lines in DEFAULT_RATELIMIT_INTERVAL
KMSG_BURST = 10


def devkmsg_writable() -> bool:
    """Whether /dev/kmsg takes lines from userspace: not with printk_devkmsg=off."""
    return _sysctl(PRINTK_DEVKMSG) != "off"


class KmsgWriter:
    """Lines into the kernel log through /dev/kmsg (or `path`), none of them dropped by
    its rate limit: through a file opened afresh for every KMSG_BURST lines (see the
    module's doc). Threads may share one."""

    def __init__(self, path: str = "/dev/kmsg"):
        self.path = path
        self._fd: Optional[int] = None
        self._on_file = 0        # lines written through the open file
        self._lock = threading.Lock()

    def write(self, line: bytes) -> None:
        """One line (its newline included); OSError if /dev/kmsg refuses it."""
        with self._lock:
            if self._fd is not None and self._on_file >= KMSG_BURST:
                self._close()
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                self._on_file = 0
            self._on_file += 1
            os.write(self._fd, line)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._close()


def initial_netns() -> int:
    """The inode of the initial network namespace, init's: a constant only since
    Linux 6.18. The service's own is the fallback: it runs there."""
    for path in (INIT_NETNS, "/proc/self/ns/net"):
        try:
            return os.stat(path).st_ino
        except OSError:
            continue
    return PROC_NET_INIT_INO


class KernelLog:
    """Drains a LogRing into /dev/kmsg; `note` gets bpfilter's own remarks (lost
    lines), which must not go through the LOG lines' path."""

    def __init__(self, ring: LogRing, note, kmsg: str = "/dev/kmsg", answers=None):
        """`answers`: what sends REJECT records' answers (answers.Answers)."""
        self.ring, self.note = ring, note
        self._kmsg = KmsgWriter(kmsg)
        self.answers = answers
        self.lost = self.unanswered = 0
        self.initial_netns = initial_netns()

    def drain(self) -> int:
        """Write every waiting record's line; how many were written."""
        written, lost, why = 0, 0, set()
        writable = devkmsg_writable()
        log_all_netns = _sysctl(NF_LOG_ALL_NETNS) != "0"
        # before the records are credited: a namespace's entry goes once its losses
        # are told
        for inum, over in self.ring.lost_over_share().items():
            if inum == self.initial_netns or log_all_netns:
                lost += over
                why.add(f"netns {inum} had its share of the ring in flight")
        unanswered, not_answered = 0, set()
        for record in self.ring.records():
            if record.u8(R_LEVEL) == REJECT_RECORD:
                try:
                    if self.answers is None:
                        raise Unreproducible("this service sends no answers")
                    self.answers.send(record)
                except (Unreproducible, OSError) as err:
                    unanswered += 1
                    not_answered.add(str(err))
                except Exception as err:   # a bug of ours: the next answers still go
                    unanswered += 1
                    not_answered.add(repr(err))
                continue
            if record.u32(R_NETNS) != self.initial_netns and not log_all_netns:
                continue   # nf_log_allowed(): the kernel would not log it either
            try:
                level, text = format_line(record)
            except Unreproducible as err:
                lost += 1
                why.add(str(err))
                continue
            if not writable:
                lost += 1
                why.add("kernel.printk_devkmsg is 'off'")
                continue
            try:
                self._kmsg.write(b"<%d>" % level + text + b"\n")
            except OSError as err:
                lost += 1
                why.add(f"{self._kmsg.path}: {err.strerror}")
                continue
            written += 1
        full = self.ring.newly_dropped()
        if full:
            why.add("the ring buffer was full")
        lost += full
        if unanswered:
            self.unanswered += unanswered
            self.note(f"REJECT: {unanswered} answers not sent ({'; '.join(sorted(not_answered))}),"
                      f" {self.unanswered} since start")
        if lost:
            self.lost += lost
            self.note(f"LOG: {lost} lines lost ({'; '.join(sorted(why))}), "
                      f"{self.lost} since start")
        return written

    def close(self) -> None:
        self._kmsg.close()
