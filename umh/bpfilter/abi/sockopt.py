"""A client of the running kernel's own iptables socket options.

Python's socket.getsockopt cannot hand the kernel an input buffer, which
IPT_SO_GET_INFO/GET_ENTRIES/GET_REVISION_* read their arguments from, so this
goes through libc with cffi.  Calls act in the calling thread's netns.
ip6tables' options have the same numbers and payload headers at level SOL_IPV6 of an
AF_INET6 socket: `family` picks them.
"""
import os

from cffi import FFI

from ..errors import BpfilterError
from ..model import Family
from . import codec
from .xtables import (
    IPT_SO_GET_ENTRIES,
    IPT_SO_GET_INFO,
    IPT_SO_GET_REVISION_MATCH,
    IPT_SO_GET_REVISION_TARGET,
    IPT_SO_SET_ADD_COUNTERS,
    IPT_SO_SET_REPLACE,
    SIZEOF_IPT_ENTRY,
    ipt_replace,
    name_field,
    xt_get_revision,
)

_ffi = FFI()
_ffi.cdef(
    """
    int socket(int domain, int type, int protocol);
    int close(int fd);
    int getsockopt(int fd, int level, int optname, void *optval, unsigned int *optlen);
    int setsockopt(int fd, int level, int optname, const void *optval, unsigned int optlen);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int mprotect(void *addr, size_t len, int prot);
    """
)
_libc = _ffi.dlopen(None)

_AF_INET = 2
_SOCK_RAW = 3
_IPPROTO_RAW = 255
_SOL_IP = 0
# The socket and level of each family's options: AF_INET6 sockets at SOL_IPV6 for ip6tables.
_SOCKET_LEVEL = {Family.IPV4: (_AF_INET, _SOL_IP), Family.IPV6: (10, 41)}
_OPTION_PREFIX = {Family.IPV4: "IPT", Family.IPV6: "IP6T"}
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_MAP_FAILED = 2**64 - 1
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Where struct ipt_entry and struct ip6t_entry keep next_offset and their counters, and
# their size (linux/netfilter_ipv4/ip_tables.h, linux/netfilter_ipv6/ip6_tables.h).
ENTRY_LAYOUT = {Family.IPV4: (90, 96, SIZEOF_IPT_ENTRY), Family.IPV6: (142, 152, 168)}


def _fail(what: str) -> BpfilterError:
    err = _ffi.errno
    return BpfilterError(err, f"{what}: {os.strerror(err)}")


class _Socket:
    def __init__(self, domain: int = _AF_INET):
        self.domain = domain

    def __enter__(self):
        self.fd = _libc.socket(self.domain, _SOCK_RAW, _IPPROTO_RAW)
        if self.fd < 0:
            raise _fail(f"socket({self.domain}, SOCK_RAW, IPPROTO_RAW)")
        return self.fd

    def __exit__(self, *exc):
        _libc.close(self.fd)


def _get(optname: int, request: bytes, what: str, family: Family = Family.IPV4) -> bytes:
    buf = _ffi.new("char[]", request)
    optlen = _ffi.new("unsigned int *", len(request))
    domain, level = _SOCKET_LEVEL[family]
    with _Socket(domain) as fd:
        if _libc.getsockopt(fd, level, optname, buf, optlen) < 0:
            raise _fail(what)
    return bytes(_ffi.buffer(buf, len(request)))


def get_info(table: str = "filter", family: Family = Family.IPV4) -> bytes:
    """The kernel's struct ipt_getinfo (ip6t_getinfo) for table."""
    return _get(IPT_SO_GET_INFO, codec.getinfo_request(table),
                f"{_OPTION_PREFIX[family]}_SO_GET_INFO {table}", family)


def get_entries(table: str, size: int, family: Family = Family.IPV4) -> bytes:
    """The kernel's whole struct ipt_get_entries (ip6t_get_entries: header and
    entrytable) for table, read into a zero-filled buffer; size must be the table's size."""
    return _get(IPT_SO_GET_ENTRIES, codec.get_entries_request(table, size),
                f"{_OPTION_PREFIX[family]}_SO_GET_ENTRIES {table}", family)


def get_revision(kind: str, name: str, revision: int) -> None:
    """Succeeds when the kernel has that revision of match or target `name`;
    EPROTONOSUPPORT when it has only others, ENOENT when it has none.  (The
    best revision xt_find_revision() finds does not reach userspace:
    ip_getsockopt() returns 0 on success.)"""
    optname = {"match": IPT_SO_GET_REVISION_MATCH, "target": IPT_SO_GET_REVISION_TARGET}[kind]
    request = xt_get_revision.build(dict(name=name_field(name, 29), revision=revision))
    _get(optname, request, f"IPT_SO_GET_REVISION {kind} {name}")


def _set(optname: int, blob: bytes, optlen: "int | None", what: str) -> None:
    """setsockopt with blob placed at the very end of its mapping, so that an
    optlen beyond the blob faults (EFAULT) instead of reading stray memory."""
    blob = bytes(blob)
    optlen = len(blob) if optlen is None else optlen
    span = (len(blob) + _PAGE - 1) // _PAGE * _PAGE + _PAGE
    addr = _libc.mmap(_ffi.NULL, span, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if int(_ffi.cast("uintptr_t", addr)) == _MAP_FAILED:
        raise _fail("mmap")
    try:
        guard = _ffi.cast("char *", addr) + (span - _PAGE)
        if _libc.mprotect(guard, _PAGE, _PROT_NONE) < 0:
            raise _fail("mprotect")
        start = guard - len(blob)
        _ffi.memmove(start, blob, len(blob))
        with _Socket() as fd:
            if _libc.setsockopt(fd, _SOL_IP, optname, start, optlen) < 0:
                raise _fail(what)
    finally:
        _libc.munmap(addr, span)


def set_replace(blob: bytes, optlen: "int | None" = None) -> None:
    """setsockopt(IPT_SO_SET_REPLACE); optlen defaults to len(blob)."""
    _set(IPT_SO_SET_REPLACE, blob, optlen, "IPT_SO_SET_REPLACE")


def add_counters(blob: bytes) -> None:
    """setsockopt(IPT_SO_SET_ADD_COUNTERS) with an xt_counters_info blob."""
    _set(IPT_SO_SET_ADD_COUNTERS, blob, None, "IPT_SO_SET_ADD_COUNTERS")


def read_replace(table: str = "filter", family: Family = Family.IPV4) -> bytes:
    """The ipt_replace (ip6t_replace) blob that would re-install the kernel's current
    table: num_counters = num_entries, counters pointer 0, entries' counters zeroed."""
    info = codec.parse_getinfo(get_info(table, family))
    entries = bytearray(codec.parse_get_entries(get_entries(table, info["size"], family))["entries"])
    next_at, counters_at, size = ENTRY_LAYOUT[family]
    off = 0
    while off < len(entries):
        entries[off + counters_at : off + size] = bytes(16)
        off += int.from_bytes(entries[off + next_at : off + next_at + 2], "little")
    header = ipt_replace.build(
        dict(
            name=name_field(info["name"], 32),
            valid_hooks=info["valid_hooks"],
            num_entries=info["num_entries"],
            size=info["size"],
            hook_entry=info["hook_entry"],
            underflow=info["underflow"],
            num_counters=info["num_entries"],
            counters=0,
        )
    )
    return header + bytes(entries)

