"""How the running kernel's ipv6_find_hdr() treats an extension header that claims to
be longer than the rest of the packet.

Kernels differ: the stable fix "ipv6: do not let ipv6_find_hdr() return an offset
past the packet end" (in 6.12.113, for one) makes the walk fail there (-EBADMSG: a
rule with -p drops the packet); kernels without it step past the end and name the
next header the protocol. bpfilter walks as the kernel it runs on does, so it asks
that kernel: nftables' `meta l4proto` makes the same walk (nft_set_pktinfo_ipv6()),
so a packet whose destination options overrun it, sent to ::1 from a scratch
namespace, is counted by an output chain matching its udp only by a kernel without
the fix. Without nftables the probe cannot be made: the walk is then bounded, the
newer kernels' way, which drops rather than passes what the older ones would step
past (the service logs that it assumed so).
"""
from __future__ import annotations

import fcntl
import functools
import os
import shutil
import socket
import struct
import subprocess
import sys

import cffi

from .. import forked

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_TABLE = "bpfilter_probe"
_RULES = (f"table ip6 {_TABLE} {{\n\tchain out {{\n\t\ttype filter hook output priority 0;\n"
          "\t\tmeta l4proto udp counter\n\t}\n}\n")

_ffi = cffi.FFI()
_ffi.cdef("int unshare(int flags);")
_libc = _ffi.dlopen(None)


def _overrunning_packet() -> bytes:
    """::1 to ::1: destination options claiming 88 bytes, then 16 bytes of udp."""
    udp = struct.pack("!HHHH", 40000, 9, 16, 0) + bytes(8)
    options = bytes([17, 10, 1, 4, 0, 0, 0, 0])
    payload = options + udp
    loopback = socket.inet_pton(socket.AF_INET6, "::1")
    return struct.pack("!IHBB", 6 << 28, len(payload), 60, 64) + loopback * 2 + payload


def _loopback_up() -> None:
    """The new namespace's lo up (SIOCSIFFLAGS: the probe needs nothing more of
    netlink, and the frozen helper of bpfilter.ko carries no netlink library)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _probe_in_child(nft: str) -> int:
    """In a forked child: 0 if the kernel bounds the walk, 1 if it steps past."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        return 3
    _loopback_up()
    if subprocess.run([nft, "-f", "-"], input=_RULES, text=True, capture_output=True).returncode:
        return 3
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(_overrunning_packet(), ("::1", 0))
    listed = subprocess.run([nft, "list", "chain", "ip6", _TABLE, "out"], text=True,
                            capture_output=True).stdout
    return 0 if "counter packets 0 " in listed else 1 if "counter packets 1 " in listed else 3


@functools.lru_cache(maxsize=1)
def walk_bounded_by_packet() -> bool:
    """True when the running kernel's ipv6_find_hdr() fails on an extension header
    longer than what follows it in the packet."""
    nft = shutil.which("nft")
    code = 2
    if nft is not None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                forked.become_worker(parent)   # not holding bpfilter.ko's device
                code = _probe_in_child(nft)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        why = "no nft command" if nft is None else f"the probe through nftables failed ({code})"
        print(f"bpfilter: cannot ask the kernel how its IPv6 extension-header walk ends "
              f"({why}): walking as kernels with the stable fix do", file=sys.stderr)
    return code != 1
