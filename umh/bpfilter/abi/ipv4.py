"""ip_tables.c's entry: struct ipt_entry and its ip part, struct ipt_ip
(include/uapi/linux/netfilter_ipv4/ip_tables.h, x86_64 layout)."""
from dataclasses import dataclass
from functools import lru_cache

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

from ..model import Family, Interface, IpHeader, Prefix
from .xtables import EntryFamily, xt_counters

IPT_F_FRAG = 0x01
IPT_F_GOTO = 0x02
IPT_F_MASK = 0x03

IPT_INV_VIA_IN = 0x01
IPT_INV_VIA_OUT = 0x02
IPT_INV_TOS = 0x04
IPT_INV_SRCIP = 0x08
IPT_INV_DSTIP = 0x10
IPT_INV_FRAG = 0x20
IPT_INV_PROTO = 0x40
IPT_INV_MASK = 0x7F

IPT_SO_GET_REVISION_MATCH = 66
IPT_SO_GET_REVISION_TARGET = 67

ipt_ip = Struct(
    "src" / Bytes(4),
    "dst" / Bytes(4),
    "smsk" / Bytes(4),
    "dmsk" / Bytes(4),
    "iniface" / Bytes(16),
    "outiface" / Bytes(16),
    "iniface_mask" / Bytes(16),
    "outiface_mask" / Bytes(16),
    "proto" / Int16ul,
    "flags" / Int8ul,
    "invflags" / Int8ul,
)

ipt_entry = Struct(
    "ip" / ipt_ip,
    "nfcache" / Int32ul,
    "target_offset" / Int16ul,
    "next_offset" / Int16ul,
    "comefrom" / Int32ul,
    "counters" / xt_counters,
)

SIZEOF_IPT_ENTRY = 112
SIZEOF_IPT_IP = 84


# A 100k-rule table holds 100k of these: slots.
@dataclass(slots=True)
class RawIp:
    src: bytes
    dst: bytes
    smsk: bytes
    dmsk: bytes
    iniface: bytes
    outiface: bytes
    iniface_mask: bytes
    outiface_mask: bytes
    proto: int
    flags: int
    invflags: int


# Rules repeat interfaces (most often "any"): equal values are shared, they are
# immutable. Addresses mostly differ from rule to rule.
interface = lru_cache(maxsize=1024)(Interface)


def decode_ip(ip: RawIp) -> IpHeader:
    inv = ip.invflags
    return IpHeader(Prefix(ip.src, ip.smsk, bool(inv & IPT_INV_SRCIP)),
                    Prefix(ip.dst, ip.dmsk, bool(inv & IPT_INV_DSTIP)),
                    interface(ip.iniface, ip.iniface_mask, bool(inv & IPT_INV_VIA_IN)),
                    interface(ip.outiface, ip.outiface_mask, bool(inv & IPT_INV_VIA_OUT)),
                    ip.proto, bool(inv & IPT_INV_PROTO), bool(ip.flags & IPT_F_FRAG),
                    bool(inv & IPT_INV_FRAG))


IPV4 = EntryFamily(Family.IPV4, "iptables", ipt_ip, ipt_entry, RawIp,
                   flags_mask=IPT_F_MASK, invflags_mask=IPT_INV_MASK, goto_flag=IPT_F_GOTO,
                   so_get_revision_match=IPT_SO_GET_REVISION_MATCH,
                   so_get_revision_target=IPT_SO_GET_REVISION_TARGET,
                   names_file="ip_tables_names", socket_family=2, socket_level=0,
                   decode_ip=decode_ip)
assert (IPV4.entry_size, IPV4.ip_size) == (SIZEOF_IPT_ENTRY, SIZEOF_IPT_IP)
