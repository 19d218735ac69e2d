"""A client of the running kernel's own iptables socket options.

Python's socket.getsockopt cannot hand the kernel an input buffer, which
IPT_SO_GET_INFO/GET_ENTRIES/GET_REVISION_* read their arguments from, so this
goes through libc with cffi.  Calls act in the calling thread's netns, on the
family's tables (ip6tables' for Family.IPV6: an AF_INET6 socket, SOL_IPV6).
"""
import os

from cffi import FFI

from ..errors import BpfilterError
from ..model import Family
from . import codec, families
from .xtables import (
    IPT_SO_GET_ENTRIES,
    IPT_SO_GET_INFO,
    IPT_SO_SET_ADD_COUNTERS,
    IPT_SO_SET_REPLACE,
    SIZEOF_XT_COUNTERS,
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

_SOCK_RAW = 3
_IPPROTO_RAW = 255
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_MAP_FAILED = 2**64 - 1
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _fail(what: str) -> BpfilterError:
    err = _ffi.errno
    return BpfilterError(err, f"{what}: {os.strerror(err)}")


class _Socket:
    def __init__(self, family: Family):
        self.layout = families.of(family)

    def __enter__(self):
        self.fd = _libc.socket(self.layout.socket_family, _SOCK_RAW, _IPPROTO_RAW)
        if self.fd < 0:
            raise _fail(f"socket({self.layout.socket_family}, SOCK_RAW, IPPROTO_RAW)")
        return self.fd

    def __exit__(self, *exc):
        _libc.close(self.fd)


def _get(optname: int, request: bytes, what: str, family: Family) -> bytes:
    buf = _ffi.new("char[]", request)
    optlen = _ffi.new("unsigned int *", len(request))
    with _Socket(family) as fd:
        if _libc.getsockopt(fd, families.of(family).socket_level, optname, buf, optlen) < 0:
            raise _fail(what)
    return bytes(_ffi.buffer(buf, len(request)))


def get_info(table: str = "filter", family: Family = Family.IPV4) -> bytes:
    """The kernel's struct ipt_getinfo (ip6t_getinfo) for table."""
    return _get(IPT_SO_GET_INFO, codec.getinfo_request(table), f"SO_GET_INFO {table}", family)


def get_entries(table: str, size: int, family: Family = Family.IPV4) -> bytes:
    """The kernel's whole struct ipt_get_entries (header and entrytable) for
    table, read into a zero-filled buffer; size must be the table's size."""
    return _get(IPT_SO_GET_ENTRIES, codec.get_entries_request(table, size),
                f"SO_GET_ENTRIES {table}", family)


def get_revision(kind: str, name: str, revision: int, family: Family = Family.IPV4) -> None:
    """Succeeds when the kernel has that revision of match or target `name`;
    EPROTONOSUPPORT when it has only others, ENOENT when it has none.  (The
    best revision xt_find_revision() finds does not reach userspace:
    ip_getsockopt() returns 0 on success.)"""
    layout = families.of(family)
    optname = {"match": layout.so_get_revision_match,
               "target": layout.so_get_revision_target}[kind]
    request = xt_get_revision.build(dict(name=name_field(name, 29), revision=revision))
    _get(optname, request, f"SO_GET_REVISION {kind} {name}", family)


def _set(optname: int, blob: bytes, optlen: "int | None", what: str, family: Family) -> None:
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
        with _Socket(family) as fd:
            if _libc.setsockopt(fd, families.of(family).socket_level, optname, start, optlen) < 0:
                raise _fail(what)
    finally:
        _libc.munmap(addr, span)


def set_replace(blob: bytes, optlen: "int | None" = None, family: Family = Family.IPV4) -> None:
    """setsockopt(IPT_SO_SET_REPLACE); optlen defaults to len(blob)."""
    _set(IPT_SO_SET_REPLACE, blob, optlen, "SO_SET_REPLACE", family)


def add_counters(blob: bytes, family: Family = Family.IPV4) -> None:
    """setsockopt(IPT_SO_SET_ADD_COUNTERS) with an xt_counters_info blob."""
    _set(IPT_SO_SET_ADD_COUNTERS, blob, None, "SO_SET_ADD_COUNTERS", family)


def read_replace(table: str = "filter", family: Family = Family.IPV4) -> bytes:
    """The replace blob that would re-install the kernel's current table:
    num_counters = num_entries, counters pointer 0, entries' counters zeroed."""
    layout = families.of(family)
    info = codec.parse_getinfo(get_info(table, family))
    entries = bytearray(codec.parse_get_entries(get_entries(table, info["size"], family))["entries"])
    off = 0
    while off < len(entries):
        at = off + layout.counters_at
        entries[at : at + SIZEOF_XT_COUNTERS] = bytes(SIZEOF_XT_COUNTERS)
        off += layout.next_offset_field.unpack_from(entries, off + layout.next_offset_at)[0]
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

