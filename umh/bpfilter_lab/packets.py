"""Packets for the lab, built byte-exact: IPv4, and IPv6 with extension headers.

A Packet's family follows its addresses. The lab tags every packet it sends with an
`ident` (IPv4: the IP ID; IPv6: the flow label, unless the packet sets one) and a
`nonce` in the payload, which is how it tells arrivals apart.

The bytes, in network order, offsets from the start of each header:

IPv4 (RFC 791)
   0 version 4, header length   1 TOS   2 total length   4 identification (ident)
   6 flags (MF) and fragment offset, in 8 bytes   8 TTL   9 protocol   10 checksum
  12 source   16 destination   20 options, padded to 4 bytes with EOL (0)
IPv6 (RFC 8200)
   0 version 6, traffic class (8 bits), flow label (20 bits; default: ident)
   4 payload length: every byte after these 40, as sent (default)   6 next header
   7 hop limit
   8 source   24 destination
  then the extension headers in the order given, each naming the one after it:
  hop-by-hop options (0) and destination options (60)
     0 next header   1 length in 8 bytes, not counting the first 8   2 options:
     type, data length, data (Pad1 is the single byte 0), padded to a multiple of
     8 bytes with Pad1 or PadN (type 1)
  routing (43)
     0 next header   1 length in 8 bytes, less 1   2 routing type   3 segments left
     4 four bytes of the type's own (reserved for types 0 and 2)   8 addresses, 16 each
  fragment (44)
     0 next header   1 reserved   2 offset in 8 bytes << 3 | M   4 identification
     (default: ident)
  authentication header (51)
     0 next header   1 length in 4 bytes, less 2   2 reserved   4 SPI   8 sequence
    12 integrity check value
  After a fragment header with a non-zero offset comes fragment data: no transport
  header, the payload alone.
then the transport header:
  tcp (6)        0 source port   2 destination port   4 sequence   8 acknowledgement
                12 data offset << 4   13 flags   14 window 65535   16 checksum
                18 urgent pointer 0   20 options
  udp (17)       0 ports   4 length (header and payload)   6 checksum, 0 sent as 0xffff
  icmp (1 in IPv4) and icmpv6 (58 in IPv6)
                 0 type   1 code   2 checksum   4 the rest of the header (icmp_rest: an
                 echo's identifier and sequence, an error's MTU or pointer)
                 8 icmp_body (a neighbour solicitation's target and options, say)
  any other protocol: no header
then the quoted packet (an ICMP error's quote), then the payload: payload_len bytes,
four zero bytes and the nonce (32 bits) first, zeros after.

Checksums are right for the bytes sent, truncated or not, as long as their field is
sent. tcp, udp and icmpv6 cover a pseudo-header: for IPv4 source, destination, zero,
protocol, length (16 bits); for IPv6 source, final destination (the last address of a
routing header that still has segments left, else the destination), length (32 bits),
three zero bytes, next header. ICMP over IPv4 covers its message alone.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Sequence, Union

from bpfilter.model import Family

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOP_BY_HOP, ROUTING, FRAGMENT, AUTH, NO_NEXT_HEADER, DEST_OPTIONS = 0, 43, 44, 51, 59, 60

_ECHO_REQUEST = {Family.IPV4: 8, Family.IPV6: 128}
_PROTO_NAMES = {"tcp": TCP, "udp": UDP, "icmpv6": ICMPV6, "ipv6-icmp": ICMPV6,
                "ipv6-nonxt": NO_NEXT_HEADER}
# The family's own ICMP is the one that has a header; in the other family its number
# is just a protocol without one.
_ICMP_OF = {Family.IPV4: ICMP, Family.IPV6: ICMPV6}
_HEADER_LEN = {TCP: 20, UDP: 8}
_CHECKSUM_AT = {TCP: 16, UDP: 6, ICMP: 2, ICMPV6: 2}


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def family_of(address: str) -> Family:
    return Family.IPV6 if ":" in address else Family.IPV4


# ---------------------------------------------------------------- IPv6 extension headers

@dataclass(frozen=True)
class Option:
    """A hop-by-hop or destination option: its type byte, then its data's length and data."""
    type: int
    data: bytes = b""

    def encode(self) -> bytes:
        return bytes([self.type, len(self.data)]) + self.data


@dataclass(frozen=True)
class Pad1:
    """The one-byte padding option, a lone zero."""

    def encode(self) -> bytes:
        return b"\0"


def pad_n(size: int) -> Option:
    """PadN covering `size` bytes (two or more)."""
    if size < 2:
        raise ValueError("PadN covers at least 2 bytes; use Pad1 for one")
    return Option(1, bytes(size - 2))


ROUTER_ALERT_MLD = Option(5, b"\0\0")   # RFC 2711, value 0: the packet carries MLD


def _padded(options: Sequence[Union[Option, Pad1]]) -> bytes:
    body = b"".join(o.encode() for o in options)
    gap = -(2 + len(body)) % 8
    return body + (Pad1().encode() if gap == 1 else pad_n(gap).encode() if gap else b"")


def _length_field(ext_len: "int | None", size: int, unit: int, less: int) -> int:
    return size // unit - less if ext_len is None else ext_len


@dataclass(frozen=True)
class HopByHop:
    """Hop-by-hop options (0): the options given, padded to 8 bytes with Pad1 or PadN.
    `ext_len` is the length byte as sent (default: the header's true length);
    `next_header` overrides the number of what follows."""
    options: tuple = ()
    ext_len: "int | None" = None
    next_header: "int | None" = None
    number = HOP_BY_HOP

    def encode(self, next_header: int, ident: int) -> bytes:
        body = _padded(self.options)
        return bytes([next_header, _length_field(self.ext_len, 2 + len(body), 8, 1)]) + body


@dataclass(frozen=True)
class DestinationOptions(HopByHop):
    """Destination options (60), laid out as hop-by-hop options."""
    number = DEST_OPTIONS


@dataclass(frozen=True)
class Routing:
    """A routing header (43) of any type: `type_data` is the four bytes after segments
    left (reserved for types 0 and 2; segment routing's last entry, flags and tag)."""
    type: int = 0
    segments_left: int = 0
    addresses: tuple = ()
    type_data: bytes = bytes(4)
    ext_len: "int | None" = None
    next_header: "int | None" = None
    number = ROUTING

    def encode(self, next_header: int, ident: int) -> bytes:
        body = self.type_data + b"".join(socket.inet_pton(socket.AF_INET6, a)
                                         for a in self.addresses)
        return bytes([next_header, _length_field(self.ext_len, 4 + len(body), 8, 1),
                      self.type, self.segments_left]) + body


@dataclass(frozen=True)
class Fragment:
    """A fragment header (44); `offset` in 8-byte units, `ident` defaults to the
    packet's tag."""
    offset: int = 0
    more: bool = False
    ident: "int | None" = None
    next_header: "int | None" = None
    number = FRAGMENT

    def encode(self, next_header: int, ident: int) -> bytes:
        return struct.pack("!BBHI", next_header, 0, self.offset << 3 | self.more,
                           ident if self.ident is None else self.ident)


@dataclass(frozen=True)
class AuthenticationHeader:
    """An authentication header (51); `ext_len` is its Payload Len byte as sent (default:
    the true length, in 4-byte units less 2)."""
    spi: int = 0
    seq: int = 0
    icv: bytes = bytes(12)
    ext_len: "int | None" = None
    next_header: "int | None" = None
    number = AUTH

    def encode(self, next_header: int, ident: int) -> bytes:
        return struct.pack("!BBHII", next_header,
                           _length_field(self.ext_len, 12 + len(self.icv), 4, 2), 0,
                           self.spi, self.seq) + self.icv


ExtensionHeader = Union[HopByHop, DestinationOptions, Routing, Fragment, AuthenticationHeader]


# ---------------------------------------------------------------- packets

@dataclass(frozen=True)
class Packet:
    """A packet to build; its family follows its addresses. See the module's docstring
    for the bytes."""
    src: str
    dst: str
    proto: "str | int" = "udp"    # a number or tcp, udp, icmp (the family's), icmpv6
    sport: int = 40000
    dport: int = 80
    tcp_flags: int = 0x02
    icmp_type: "int | None" = None  # default: the family's echo request
    icmp_code: int = 0
    ttl: int = 64                 # IPv4's TTL, IPv6's hop limit
    frag_offset: int = 0          # IPv4, in 8-byte units (IPv6: a Fragment header in ext)
    more_fragments: bool = False  # IPv4
    options: bytes = b""          # IPv4: raw IP options, padded to 4 bytes with EOL
    payload_len: int = 16
    truncate_l4: "int | None" = None  # keep only this many transport header bytes
    seq: int = 1                  # tcp sequence and acknowledgement numbers
    ack: int = 0
    quoted: "bytes | Packet" = b""  # an ICMP error's quote of the packet it is about
    eth_dst: "str | None" = None  # the frame's destination MAC; default: the lab's choice
    tcp_options: bytes = b""      # raw, after the 20-byte tcp header
    tcp_doff: "int | None" = None  # the data offset field; default: header and options
    icmp_rest: int = 0            # the 32 bits after type, code and checksum
    icmp_body: bytes = b""        # after those 8 bytes, before the quote
    tos: int = 0                  # IPv4's TOS, IPv6's traffic class
    flow_label: "int | None" = None  # IPv6; default: the lab's tag
    ext: tuple = ()               # IPv6 extension headers, in order
    next_header: "int | None" = None  # IPv6 header's next header; default: what follows
    truncate_ext: "int | None" = None  # IPv6: keep only this many extension header bytes
    stated_length: "int | None" = None  # IPv6: the payload length its header states

    def __post_init__(self) -> None:
        object.__setattr__(self, "ext", tuple(self.ext))

    @property
    def family(self) -> Family:
        return family_of(self.dst)

    @property
    def proto_number(self) -> int:
        if not isinstance(self.proto, str):
            return self.proto
        return _ICMP_OF[self.family] if self.proto == "icmp" else _PROTO_NAMES[self.proto]

    @property
    def header_len(self) -> int:
        """The transport header's length without options, 0 for a protocol without one."""
        p = self.proto_number
        return 8 if p == _ICMP_OF[self.family] else _HEADER_LEN.get(p, 0)

    def build(self, ident: int, nonce: int) -> bytes:
        """The packet, tagged by `ident` and `nonce` (see the module's docstring)."""
        self._check_fields()
        payload = (bytes(4) + struct.pack("!I", nonce & 0xFFFFFFFF)).ljust(
            self.payload_len, b"\0")[:self.payload_len]
        quote = self.quoted.build(0, 0) if isinstance(self.quoted, Packet) else self.quoted
        body = quote + payload
        if self.family is Family.IPV4:
            return self._ipv4(ident, body)
        return self._ipv6(ident, body)

    def _check_fields(self) -> None:
        if family_of(self.src) is not self.family:
            raise ValueError(f"{self.src} and {self.dst} are of different families")
        foreign = (("options", "frag_offset", "more_fragments") if self.family is Family.IPV6
                   else ("flow_label", "ext", "next_header", "truncate_ext", "stated_length"))
        for name in foreign:
            if getattr(self, name) not in (None, 0, False, b"", ()):
                raise ValueError(f"{name} is not a field of {self.family.name} packets")
        if self.truncate_l4 is not None and not 0 <= self.truncate_l4 < self.header_len:
            raise ValueError(f"truncate_l4={self.truncate_l4} for proto {self.proto} "
                             f"(header {self.header_len})")
        if self.truncate_l4 is not None and self.truncate_ext is not None:
            raise ValueError("truncate the extension headers or the transport header, not both")

    def _ipv4(self, ident: int, body: bytes) -> bytes:
        if not self.frag_offset:
            body = self._transport(body, lambda length: socket.inet_aton(self.src) +
                                   socket.inet_aton(self.dst) +
                                   struct.pack("!BBH", 0, self.proto_number, length))
        opts = self.options + bytes(-len(self.options) % 4)
        frag = (0x2000 if self.more_fragments else 0) | self.frag_offset
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45 + len(opts) // 4, self.tos,
                          20 + len(opts) + len(body), ident, frag, self.ttl,
                          self.proto_number, 0, socket.inet_aton(self.src),
                          socket.inet_aton(self.dst)) + opts
        return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + body

    def _ipv6(self, ident: int, body: bytes) -> bytes:
        numbers = [h.number for h in self.ext] + [self.proto_number]
        chain = b"".join(h.encode(numbers[i + 1] if h.next_header is None else h.next_header,
                                  ident)
                         for i, h in enumerate(self.ext))
        if self.truncate_ext is not None:
            chain, body = chain[:self.truncate_ext], b""
        elif not any(isinstance(h, Fragment) and h.offset for h in self.ext):
            pseudo_dst = socket.inet_pton(socket.AF_INET6, self.final_destination)
            body = self._transport(body, lambda length: socket.inet_pton(
                socket.AF_INET6, self.src) + pseudo_dst + struct.pack(
                    "!IxxxB", length, self.proto_number))
        label = ident if self.flow_label is None else self.flow_label
        return struct.pack("!IHBB16s16s", 6 << 28 | self.tos << 20 | label & 0xFFFFF,
                           len(chain) + len(body) if self.stated_length is None
                           else self.stated_length,
                           numbers[0] if self.next_header is None else self.next_header,
                           self.ttl, socket.inet_pton(socket.AF_INET6, self.src),
                           socket.inet_pton(socket.AF_INET6, self.dst)) + chain + body

    @property
    def final_destination(self) -> str:
        """Where the packet ends up: the last address of a routing header that still
        has segments left, else the destination."""
        for h in reversed(self.ext):
            if isinstance(h, Routing) and h.segments_left and h.addresses:
                return h.addresses[-1]
        return self.dst

    def _transport(self, body: bytes, pseudo) -> bytes:
        """The transport header and body, cut to truncate_l4, with the checksum right for
        what is left; pseudo(length) is the family's pseudo-header."""
        p = self.proto_number
        if p == TCP:
            doff = 5 + len(self.tcp_options) // 4 if self.tcp_doff is None else self.tcp_doff
            seg = struct.pack("!HHIIBBHHH", self.sport, self.dport, self.seq, self.ack,
                              doff << 4, self.tcp_flags, 65535, 0, 0) + self.tcp_options + body
        elif p == UDP:
            seg = struct.pack("!HHHH", self.sport, self.dport, 8 + len(body), 0) + body
        elif p == _ICMP_OF[self.family]:
            icmp_type = _ECHO_REQUEST[self.family] if self.icmp_type is None else self.icmp_type
            seg = struct.pack("!BBHI", icmp_type, self.icmp_code, 0, self.icmp_rest) + \
                self.icmp_body + body
        else:
            return body
        if self.truncate_l4 is not None:
            seg = seg[:self.truncate_l4]
        at = _CHECKSUM_AT[p]
        if len(seg) < at + 2:
            return seg
        covered = seg if p == ICMP else pseudo(len(seg)) + seg
        c = checksum(covered) or (0xFFFF if p == UDP else 0)
        return seg[:at] + struct.pack("!H", c) + seg[at + 2:]


# ---------------------------------------------------------------- ICMPv6 messages

def _lladdr_option(kind: int, mac: "str | None") -> bytes:
    return b"" if mac is None else bytes([kind, 1]) + bytes.fromhex(mac.replace(":", ""))


def _icmpv6(src: str, dst: str, icmp_type: int, fields: dict, **defaults) -> Packet:
    """An ICMPv6 message without the lab's payload; `fields` override the defaults."""
    return Packet(src, dst, ICMPV6, icmp_type=icmp_type, **{"payload_len": 0, **defaults,
                                                             **fields})


def _address(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, a)


def neighbour_solicitation(src: str, dst: str, target: str,
                           source_lladdr: "str | None" = None, **fields) -> Packet:
    """A neighbour solicitation (RFC 4861 4.3), hop limit 255 as ND demands."""
    return _icmpv6(src, dst, 135, fields, ttl=255,
                   icmp_body=_address(target) + _lladdr_option(1, source_lladdr))


def neighbour_advertisement(src: str, dst: str, target: str, flags: int = 0x60000000,
                            target_lladdr: "str | None" = None, **fields) -> Packet:
    """A neighbour advertisement (RFC 4861 4.4); flags R, S, O are the top three bits
    (default: solicited, override)."""
    return _icmpv6(src, dst, 136, fields, ttl=255, icmp_rest=flags,
                   icmp_body=_address(target) + _lladdr_option(2, target_lladdr))


def router_solicitation(src: str, dst: str = "ff02::2", **fields) -> Packet:
    """A router solicitation (RFC 4861 4.1) without options."""
    return _icmpv6(src, dst, 133, fields, ttl=255)


def router_advertisement(src: str, dst: str = "ff02::1", lifetime: int = 1800,
                         **fields) -> Packet:
    """A router advertisement (RFC 4861 4.2): current hop limit 64, no flags, no options."""
    return _icmpv6(src, dst, 134, fields, ttl=255, icmp_rest=64 << 24 | lifetime,
                   icmp_body=bytes(8))


def redirect(src: str, dst: str, target: str, destination: str, **fields) -> Packet:
    """A redirect (RFC 4861 4.5) without options."""
    return _icmpv6(src, dst, 137, fields, ttl=255,
                   icmp_body=_address(target) + _address(destination))


def mld_query(src: str, dst: str = "ff02::1", group: str = "::", **fields) -> Packet:
    """An MLDv1 query (RFC 2710) with a hop limit of 1 and a router alert, as MLD is sent."""
    return _icmpv6(src, dst, 130, fields, ttl=1, icmp_rest=1000 << 16,
                   ext=(HopByHop((ROUTER_ALERT_MLD,)),), icmp_body=_address(group))


def icmpv6_error(src: str, dst: str, about: Packet, icmp_type: int = 1, **fields) -> Packet:
    """An ICMPv6 error (destination unreachable unless told) quoting `about`; icmp_rest
    carries packet too big's MTU or parameter problem's pointer."""
    return _icmpv6(src, dst, icmp_type, fields, quoted=about)
