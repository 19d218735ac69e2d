"""Entering network namespaces, which Python 3.11's os module cannot do (no os.setns).

Netfilter BPF links and iptables tables belong to the netns of the thread
that creates them, so the service switches the calling *thread* (setns only
ever moves the caller) into a namespace for the duration of a request.
"""
import contextlib
import os
import socket
import struct

import cffi

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
NETNS_RUN_DIR = "/run/netns"
SELF = "/proc/thread-self/ns/net"
SO_NETNS_COOKIE = 71

_ffi = cffi.FFI()
_ffi.cdef("int setns(int fd, int nstype);")
_libc = _ffi.dlopen(None)


def path_of(path_or_name: str) -> str:
    """A name as made by ``ip netns add`` lives in /run/netns; anything with a slash is a path."""
    if "/" in path_or_name:
        return path_or_name
    return os.path.join(NETNS_RUN_DIR, path_or_name)


def _setns(fd: int, what: str, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = _ffi.errno
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


@contextlib.contextmanager
def entered(path_or_name: str):
    """Run the body with the calling thread in the given network namespace."""
    path = path_of(path_or_name)
    original = os.open(SELF, os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, path)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(original, "the original netns")
    finally:
        os.close(original)


def enter_for_good(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace fd names (of kind nstype) and stay."""
    _setns(fd, f"fd {fd}", nstype)


def cookie(path_or_name: "str | None" = None) -> int:
    """The namespace's cookie (SO_NETNS_COOKIE), which no other namespace ever has
    (the calling thread's by default)."""
    with entered(path_or_name) if path_or_name else contextlib.nullcontext():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            return struct.unpack("<Q", probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def ident(path: "str | None" = None) -> int:
    """The inode number that identifies a netns (the calling thread's by default)."""
    return os.stat(path_of(path) if path else SELF).st_ino


def find(inum: int) -> "str | None":
    """A path to the live network namespace with inode `inum` (a name made by
    `ip netns add`, or some task's), or None if none is found."""
    candidates = []
    if os.path.isdir(NETNS_RUN_DIR):
        candidates += [os.path.join(NETNS_RUN_DIR, n) for n in os.listdir(NETNS_RUN_DIR)]
    candidates += [f"/proc/{pid}/ns/net" for pid in os.listdir("/proc") if pid.isdigit()]
    for path in candidates:
        try:
            if os.stat(path).st_ino == inum:
                return path
        except OSError:
            continue
    return None
