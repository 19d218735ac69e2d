"""The x_tables kernel ABI both families share (x86_64 layouts), its parsed,
construct-free form, and the descriptor each family fills in (EntryFamily).

Layouts follow include/uapi/linux/netfilter/x_tables.h and, for what ip_tables.h and
ip6_tables.h spell twice with the same layout (ipt_replace and ip6t_replace,
ipt_getinfo and ip6t_getinfo, ...), the IPv4 names: the unmodified iptables and
ip6tables binaries hand us exactly these bytes through setsockopt/getsockopt. What
differs per family, the entry and its ip part, is in ipv4.py and ipv6.py.
"""
import struct
import sys
from dataclasses import dataclass, field
from operator import attrgetter

from construct import (Array, Bytes, FormatField, Int8ul, Int16ul, Int32sl, Int32ul, Int64ul, Padded,
                       Padding, Pass, Renamed, Struct)

from ..netfilter import (NF_ACCEPT, NF_DROP, NF_INET_FORWARD, NF_INET_LOCAL_IN,  # noqa: F401
                          NF_INET_LOCAL_OUT, NF_INET_NUMHOOKS, NF_INET_POST_ROUTING,
                          NF_INET_PRE_ROUTING, NF_QUEUE, NF_REPEAT)

# setsockopt / getsockopt option numbers (IPT_BASE_CTL = IP6T_BASE_CTL = 64); the
# GET_REVISION ones differ per family (EntryFamily).
IPT_SO_SET_REPLACE = 64
IPT_SO_SET_ADD_COUNTERS = 65
IPT_SO_GET_INFO = 64
IPT_SO_GET_ENTRIES = 65

HOOK_NAMES = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")

# A standard target's verdict: >= 0 is a jump offset, < 0 is -NF_x - 1 or XT_RETURN.
XT_RETURN = -NF_REPEAT - 1

XT_TABLE_MAXNAMELEN = 32
XT_EXTENSION_MAXNAMELEN = 29
XT_FUNCTION_MAXNAMELEN = 30
XT_STANDARD_TARGET = ""
XT_ERROR_TARGET = "ERROR"

# Kernel-internal limits that decide ENOMEM (include/linux/netfilter/x_tables.h).
XT_MAX_TABLE_SIZE = 512 * 1024 * 1024
SIZEOF_XT_TABLE_INFO = 64
INT_MAX = 2**31 - 1


def XT_ALIGN(size: int) -> int:
    return (size + 7) & ~7


class Packed:
    """A construct Struct run by one precompiled struct.Struct.

    construct stays the only description of a layout; this derives from it the
    struct format and the order of the values, so that code parsing or building
    one layout per rule does it at C speed (construct interprets each field, some
    100 times slower).  Values are flat, in layout order: an Array's elements
    and a nested Struct's fields in place.  index() says where a field lands,
    field() gives one field's bytes alone, and parse() and build() regroup the
    values as construct's parse and build do.
    Supported: FormatField, Bytes, Array(n, FormatField), Padding, nested Struct.
    """

    def __init__(self, con: Struct):
        fmt: list[str] = []
        orders: set[str] = set()
        self._where: dict[str, "int | slice"] = {}
        self._leaves: dict[str, tuple[int, str]] = {}  # path -> (byte offset, format)
        self.count = 0  # how many values a flat tuple holds
        self.names: list[str] = []  # the leaves' dotted paths, in layout order
        self._shape = self._compile(con, "", fmt, orders)
        if len(orders) > 1:
            raise TypeError(f"mixed byte orders {sorted(orders)}: one struct.Struct cannot hold them")
        self._order = orders.pop() if orders else "<"
        self.struct = struct.Struct(self._order + "".join(fmt))
        self.size = self.struct.size
        self.unpack_from = self.struct.unpack_from
        self.iter_unpack = self.struct.iter_unpack
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into

    def _compile(self, con: Struct, prefix: str, fmt: list, orders: set) -> list:
        if not isinstance(con, Struct):
            raise TypeError(f"{con!r} is not a construct Struct")
        shape = []
        for sub in con.subcons:
            name = None
            if isinstance(sub, Renamed):
                name, sub = sub.name, sub.subcon
            zeros = (isinstance(sub, Padded) and sub.subcon is Pass and isinstance(sub.length, int)
                     and not sub.pattern.strip(b"\0"))
            if name is None and zeros:
                fmt.append(f"{sub.length}x")
                continue
            if name is None:
                raise TypeError(f"{prefix}: unnamed {sub!r}: construct would parse and drop it")
            path, first, offset = prefix + name, self.count, struct.calcsize("<" + "".join(fmt))
            if isinstance(sub, FormatField):
                fmt.append(self._scalar(sub, orders))
                shape.append((name, None))
                self.count += 1
            elif isinstance(sub, Bytes) and isinstance(sub.length, int):
                fmt.append(f"{sub.length}s")
                shape.append((name, None))
                self.count += 1
            elif isinstance(sub, Array) and isinstance(sub.count, int) and isinstance(sub.subcon, FormatField):
                fmt.append(f"{sub.count}{self._scalar(sub.subcon, orders)}")
                shape.append((name, sub.count))
                self.count += sub.count
            elif isinstance(sub, Struct):
                shape.append((name, self._compile(sub, path + ".", fmt, orders)))
            else:
                raise TypeError(f"{path}: {sub!r} has no struct.Struct equivalent")
            self._where[path] = first if shape[-1][1] is None else slice(first, self.count)
            if not isinstance(sub, Struct):
                self.names.append(path)
                self._leaves[path] = (offset, fmt[-1])
        return shape

    @staticmethod
    def _scalar(con: FormatField, orders: set) -> str:
        order, code = con.fmtstr[0], con.fmtstr[1:]
        if order == "=":
            order = "<" if sys.byteorder == "little" else ">"
        orders.add(order)
        return code

    def index(self, path: str) -> "int | slice":
        """Where a field's values are in a flat tuple: an int for one value, a
        slice for an Array or a nested Struct; paths are dotted ("ip.src")."""
        return self._where[path]

    def field(self, path: str) -> "tuple[int, struct.Struct]":
        """A leaf's byte offset and a struct.Struct of it alone, to read or write
        it without touching its neighbours (padding included)."""
        offset, fmt = self._leaves[path]
        return offset, struct.Struct(self._order + fmt)

    def parse(self, data: bytes, offset: int = 0) -> dict:
        return self._regroup(self._shape, iter(self.unpack_from(data, offset)))

    def build(self, obj: dict) -> bytes:
        flat: list = []
        self._flatten(self._shape, obj, flat)
        return self.pack(*flat)

    @classmethod
    def _regroup(cls, shape: list, values) -> dict:
        obj = {}
        for name, sub in shape:
            if sub is None:
                obj[name] = next(values)
            elif isinstance(sub, int):
                obj[name] = [next(values) for _ in range(sub)]
            else:
                obj[name] = cls._regroup(sub, values)
        return obj

    @classmethod
    def _flatten(cls, shape: list, obj: dict, flat: list) -> None:
        for name, sub in shape:
            if sub is None:
                flat.append(obj[name])
            elif isinstance(sub, int):
                if len(obj[name]) != sub:
                    raise ValueError(f"{name}: {len(obj[name])} elements, the layout has {sub}")
                flat.extend(obj[name])
            else:
                cls._flatten(sub, obj[name], flat)


xt_counters = Struct("pcnt" / Int64ul, "bcnt" / Int64ul)

# The user view of the header; the payload (match_size - 32 bytes) follows it.
xt_entry_match = Struct(
    "match_size" / Int16ul,
    "name" / Bytes(XT_EXTENSION_MAXNAMELEN),
    "revision" / Int8ul,
)
xt_entry_target = Struct(
    "target_size" / Int16ul,
    "name" / Bytes(XT_EXTENSION_MAXNAMELEN),
    "revision" / Int8ul,
)
xt_standard_target = Struct("target" / xt_entry_target, "verdict" / Int32sl, Padding(4))
xt_error_target = Struct("target" / xt_entry_target, "errorname" / Bytes(XT_FUNCTION_MAXNAMELEN), Padding(2))

ipt_replace = Struct(
    "name" / Bytes(XT_TABLE_MAXNAMELEN),
    "valid_hooks" / Int32ul,
    "num_entries" / Int32ul,
    "size" / Int32ul,
    "hook_entry" / Array(NF_INET_NUMHOOKS, Int32ul),
    "underflow" / Array(NF_INET_NUMHOOKS, Int32ul),
    "num_counters" / Int32ul,
    "counters" / Int64ul,
)

ipt_getinfo = Struct(
    "name" / Bytes(XT_TABLE_MAXNAMELEN),
    "valid_hooks" / Int32ul,
    "hook_entry" / Array(NF_INET_NUMHOOKS, Int32ul),
    "underflow" / Array(NF_INET_NUMHOOKS, Int32ul),
    "num_entries" / Int32ul,
    "size" / Int32ul,
)

# entrytable[] is 8-byte aligned, hence the padding after size.
ipt_get_entries = Struct("name" / Bytes(XT_TABLE_MAXNAMELEN), "size" / Int32ul, Padding(4))

xt_counters_info = Struct("name" / Bytes(XT_TABLE_MAXNAMELEN), "num_counters" / Int32ul, Padding(4))

xt_get_revision = Struct("name" / Bytes(XT_EXTENSION_MAXNAMELEN), "revision" / Int8ul)

# The layouts read or written once per rule.
xt_entry_match_packed = Packed(xt_entry_match)
xt_entry_target_packed = Packed(xt_entry_target)
xt_standard_target_packed = Packed(xt_standard_target)
xt_error_target_packed = Packed(xt_error_target)
xt_counters_packed = Packed(xt_counters)

SIZEOF_XT_ENTRY_HEADER = 32
SIZEOF_XT_STANDARD_TARGET = 40
SIZEOF_XT_ERROR_TARGET = 64
SIZEOF_IPT_REPLACE = 96
SIZEOF_IPT_GETINFO = 84
SIZEOF_IPT_GET_ENTRIES = 40
SIZEOF_XT_COUNTERS_INFO = 40
SIZEOF_XT_COUNTERS = 16

# Extensions whose payload ends in kernel-private state (a struct xt_match/xt_target
# .usersize): GET_ENTRIES copies only the first `usersize` payload bytes and
# zeroes the rest, so that kernel pointers never reach userspace.  Offsets are
# x86_64, computed from the uapi structs.
USERSIZE = {
    ("match", "limit", 0): 8,
    ("match", "hashlimit", 1): 48,
    ("match", "hashlimit", 2): 296,
    ("match", "hashlimit", 3): 304,
    ("match", "connlimit", 1): 24,
    ("match", "quota", 0): 16,
    ("match", "statistic", 0): 16,
    ("match", "string", 0): 152,
    ("match", "string", 1): 152,
    ("match", "rateest", 0): 56,
    ("match", "bpf", 0): 520,
    ("match", "bpf", 1): 520,
    ("match", "cgroup", 1): 4104,
    ("match", "cgroup", 2): 520,
    ("match", "nfacct", 0): 32,
    ("match", "nfacct", 1): 32,
    ("target", "CT", 0): 32,
    ("target", "CT", 1): 64,
    ("target", "CT", 2): 64,
    ("target", "TEE", 1): 32,
    ("target", "RATEEST", 0): 24,
    ("target", "IDLETIMER", 0): 32,
    ("target", "IDLETIMER", 1): 40,
    ("target", "SECMARK", 1): 260,
    ("target", "LED", 0): 32,
    ("target", "SNPT", 0): 34,
    ("target", "DNPT", 0): 34,
}

# Extensions whose checkentry writes into its payload what GET_ENTRIES then returns
# (hashlimit's revision 3 truncates its sizes): (kind, name, revision) -> the payload
# as the kernel leaves it. Registered by the extensions.
CHECKENTRY_WRITES: dict = {}


def cstr(raw: bytes) -> str:
    """A fixed-size C name field as the kernel's strcmp sees it."""
    return raw.split(b"\0", 1)[0].decode("latin-1")


def name_field(name: str, size: int) -> bytes:
    return name.encode("latin-1").ljust(size, b"\0")


# The per-rule records take slots: a 100k-rule table holds half a million of them.
@dataclass(slots=True)
class RawMatch:
    name: str
    revision: int
    size: int
    data: bytes  # the payload after the 32-byte header (size - 32 bytes)


@dataclass(slots=True)
class RawTarget:
    name: str
    revision: int
    size: int
    data: bytes
    verdict: "int | None" = None  # standard target only
    errorname: "str | None" = None  # error target only


@dataclass(slots=True)
class RawEntry:
    index: int
    offset: int
    ip: object  # the family's RawIp (EntryFamily.raw_ip)
    nfcache: int
    target_offset: int
    next_offset: int
    comefrom: int  # as received; the kernel zeroes and recomputes it
    pcnt: int
    bcnt: int
    matches: "list[RawMatch]"
    target: RawTarget
    raw: bytes  # the entry's exact bytes
    # The comefrom mark_source_chains computes: the hooks (bits 0-4) this rule is
    # reachable from.  Extensions' checkentry sees it as hook_mask, and
    # GET_ENTRIES returns it as comefrom.
    hook_mask: int = 0


@dataclass
class RawTable:
    abi: "EntryFamily"
    name: str
    valid_hooks: int
    hook_entry: "list[int]"
    underflow: "list[int]"
    num_entries: int
    size: int
    num_counters: int
    counters_ptr: int
    entries: "list[RawEntry]" = field(default_factory=list)
    # Entry index -> index of an entry of the table this one replaces with the
    # same bytes (comefrom and counters aside), whose parse was reused; see
    # codec.parse_replace's `previous`.
    same_as: "dict[int, int]" = field(default_factory=dict)
    # Its entries by their bytes (comefrom and counters aside): what the parse of
    # the table replacing this one looks entries up in (codec._rule_index).
    by_rule_bytes: "dict[bytes, RawEntry] | None" = field(default=None, repr=False,
                                                         compare=False)


class EntryFamily:
    """What an entry is in one family's ABI (ip_tables.c or ip6_tables.c): its header
    layout and ip part, the flags its checkentry accepts, its own socket options, and
    how its ip part reads in the neutral model. The codec walks, checks and rebuilds
    entries of any family through it."""

    def __init__(self, family, command: str, ip: Struct, entry: Struct, raw_ip: type,
                 flags_mask: int, invflags_mask: int, goto_flag: int,
                 so_get_revision_match: int, so_get_revision_target: int, names_file: str,
                 socket_family: int, socket_level: int, decode_ip):
        self.family = family                  # model.Family
        self.command = command                # what users call it, for messages
        self.ip, self.entry, self.raw_ip = ip, entry, raw_ip
        self.flags_mask, self.invflags_mask, self.goto_flag = flags_mask, invflags_mask, goto_flag
        self.so_get_revision_match = so_get_revision_match
        self.so_get_revision_target = so_get_revision_target
        self.names_file = names_file          # under /proc/net
        self.socket_family, self.socket_level = socket_family, socket_level
        self.decode_ip = decode_ip            # RawIp -> model.IpHeader / Ip6Header
        self.ip_packed, self.entry_packed = Packed(ip), Packed(entry)
        self.ip_size, self.entry_size = ip.sizeof(), entry.sizeof()
        self.unconditional_ip = bytes(self.ip_size)
        packed = self.entry_packed
        # where the per-rule fields sit in the entry's unpacked tuple
        self.E_IP = packed.index("ip")
        self.E_FLAGS = packed.index("ip.flags")
        self.E_INVFLAGS = packed.index("ip.invflags")
        self.E_NFCACHE = packed.index("nfcache")
        self.E_TARGET_OFFSET = packed.index("target_offset")
        self.E_NEXT_OFFSET = packed.index("next_offset")
        self.E_COMEFROM = packed.index("comefrom")
        self.E_PCNT = packed.index("counters.pcnt")
        self.E_BCNT = packed.index("counters.bcnt")
        self.counters_at = packed.field("counters.pcnt")[0]
        self.next_offset_at, self.next_offset_field = packed.field("next_offset")
        self.comefrom_at, self.comefrom_field = packed.field("comefrom")
        # RawIp's fields are the ip part's, in its order (tests/test_abi_bridge.py)
        self.ip_values = attrgetter(*self.ip_packed.names)

    def __repr__(self) -> str:
        return f"EntryFamily({self.command})"

    def volatile(self, raw: bytes) -> tuple[int, int, int]:
        """comefrom, pcnt, bcnt of an entry's bytes: what neither the kernel's checks
        nor the rule's meaning read."""
        return (self.comefrom_field.unpack_from(raw, self.comefrom_at)[0],
                *XT_COUNTERS.unpack_from(raw, self.counters_at))


XT_COUNTERS = struct.Struct("<QQ")
