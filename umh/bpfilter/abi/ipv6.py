"""ip6_tables.c's entry: struct ip6t_entry and its ip part, struct ip6t_ip6
(include/uapi/linux/netfilter_ipv6/ip6_tables.h, x86_64 layout: ip6t_ip6 ends in 3
bytes of padding, ip6t_entry has 4 before its counters; the kernel keeps whatever
the caller wrote there)."""
from dataclasses import dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Padding, Struct

from ..model import Family, Ip6Header, Prefix
from .ipv4 import interface
from .xtables import EntryFamily, xt_counters

IP6T_F_PROTO = 0x01     # -p given: walk the extension headers to the upper layer
IP6T_F_TOS = 0x02       # accepted, and ignored by ip6_packet_match()
IP6T_F_GOTO = 0x04
IP6T_F_MASK = 0x07

IP6T_INV_VIA_IN = 0x01
IP6T_INV_VIA_OUT = 0x02
IP6T_INV_TOS = 0x04
IP6T_INV_SRCIP = 0x08
IP6T_INV_DSTIP = 0x10
IP6T_INV_FRAG = 0x20
IP6T_INV_PROTO = 0x40
IP6T_INV_MASK = 0x7F

IP6T_SO_GET_REVISION_MATCH = 68
IP6T_SO_GET_REVISION_TARGET = 69

ip6t_ip6 = Struct(
    "src" / Bytes(16),
    "dst" / Bytes(16),
    "smsk" / Bytes(16),
    "dmsk" / Bytes(16),
    "iniface" / Bytes(16),
    "outiface" / Bytes(16),
    "iniface_mask" / Bytes(16),
    "outiface_mask" / Bytes(16),
    "proto" / Int16ul,
    "tos" / Int8ul,
    "flags" / Int8ul,
    "invflags" / Int8ul,
    Padding(3),
)

ip6t_entry = Struct(
    "ip" / ip6t_ip6,
    "nfcache" / Int32ul,
    "target_offset" / Int16ul,
    "next_offset" / Int16ul,
    "comefrom" / Int32ul,
    Padding(4),
    "counters" / xt_counters,
)

SIZEOF_IP6T_ENTRY = 168
SIZEOF_IP6T_IP6 = 136


@dataclass(slots=True)
class RawIp6:
    src: bytes
    dst: bytes
    smsk: bytes
    dmsk: bytes
    iniface: bytes
    outiface: bytes
    iniface_mask: bytes
    outiface_mask: bytes
    proto: int
    tos: int
    flags: int
    invflags: int


def decode_ip(ip: RawIp6) -> Ip6Header:
    # tos, IP6T_F_TOS, IP6T_INV_TOS and IP6T_INV_FRAG pass checkentry and match nothing
    inv = ip.invflags
    return Ip6Header(Prefix(ip.src, ip.smsk, bool(inv & IP6T_INV_SRCIP)),
                     Prefix(ip.dst, ip.dmsk, bool(inv & IP6T_INV_DSTIP)),
                     interface(ip.iniface, ip.iniface_mask, bool(inv & IP6T_INV_VIA_IN)),
                     interface(ip.outiface, ip.outiface_mask, bool(inv & IP6T_INV_VIA_OUT)),
                     ip.proto, bool(inv & IP6T_INV_PROTO), bool(ip.flags & IP6T_F_PROTO))


IPV6 = EntryFamily(Family.IPV6, "ip6tables", ip6t_ip6, ip6t_entry, RawIp6,
                   flags_mask=IP6T_F_MASK, invflags_mask=IP6T_INV_MASK, goto_flag=IP6T_F_GOTO,
                   so_get_revision_match=IP6T_SO_GET_REVISION_MATCH,
                   so_get_revision_target=IP6T_SO_GET_REVISION_TARGET,
                   names_file="ip6_tables_names", socket_family=10, socket_level=41,
                   decode_ip=decode_ip)
assert (IPV6.entry_size, IPV6.ip_size) == (SIZEOF_IP6T_ENTRY, SIZEOF_IP6T_IP6)
