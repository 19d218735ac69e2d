"""bpfilter.ko as its helper reaches it: the /dev/bpfilter it serves requests through,
on which it asks the module for what user space cannot do (ioctls; the contract is
kmod/bpfilter_proto.h). Without the module (`bpfilter serve`) there is no device, and
what needs it is done otherwise or refused."""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
from contextlib import contextmanager
from typing import Iterator, Optional

from . import proto
from .errors import BpfilterError

_device: Optional[int] = None


def use_device(device_fd: Optional[int]) -> None:
    """Ask bpfilter.ko through this descriptor of /dev/bpfilter from now on (None: no
    module)."""
    global _device
    _device = device_fd


def present() -> bool:
    return _device is not None


@contextmanager
def netns_fd(netns_path: Optional[str]) -> Iterator[int]:
    """A descriptor of the namespace at netns_path (the calling thread's if None)."""
    fd = os.open(netns_path or "/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def ioctl(request: int, arg: "bytes | bytearray", what: str) -> int:
    """The module does `what` (its answer, a count for some), or BpfilterError with its
    errno. A bytearray `arg` receives what the module writes back into it."""
    if _device is None:
        raise BpfilterError(errno.EOPNOTSUPP, f"{what} needs bpfilter.ko (kernel module mode)")
    try:
        # a mutable buffer: fcntl then answers the ioctl's return value, not a copy
        return fcntl.ioctl(_device, request, arg if isinstance(arg, bytearray) else bytearray(arg))
    except OSError as e:
        raise BpfilterError(e.errno or errno.EIO, f"bpfilter.ko cannot {what}: {e.strerror}") \
            from None


def nat_attach(netns_path: Optional[str], family: int, hook: int, priority: int,
               prog_fd: int) -> None:
    """prog_fd as the NAT core's lookup of the namespace for family and hook."""
    with netns_fd(netns_path) as fd:
        ioctl(proto.IOC_NAT_ATTACH,
              proto.nat_attach.build(dict(netns_fd=fd, family=family, hook=hook,
                                          priority=priority, prog_fd=prog_fd)),
              "register the nat table's lookup")


def nat_detach(cookie: int, family: int, hook: int) -> bool:
    """The namespace's lookup unregistered; False if it had none (gone with it)."""
    return _nat_lookup(proto.IOC_NAT_DETACH, cookie, family, hook, "unregister")


def nat_attached(cookie: int, family: int, hook: int) -> bool:
    """Whether the namespace with that cookie has our lookup (False once it is gone)."""
    return _nat_lookup(proto.IOC_NAT_QUERY, cookie, family, hook, "find")


def _nat_lookup(request: int, cookie: int, family: int, hook: int, verb: str) -> bool:
    try:
        ioctl(request, proto.nat_attach.build(dict(family=family, hook=hook,
                                                   netns_cookie=cookie)),
              f"{verb} the nat table's lookup")
    except BpfilterError as err:
        if err.errno == errno.ENOENT:
            return False
        raise
    return True


def xt_match_create(netns_path: Optional[str], family: int, name: str, revision: int,
                    payload: bytes, table: str, hook_mask: int, proto_: int, inv_proto: bool,
                    what: str, entry: Optional[bytes] = None) -> int:
    """The kernel's own match `name` (a target, with its rule's `entry` up to it) for
    a rule of `table` in the namespace, checked and set up by its checkentry as
    ip_tables would (kmod/xtmatch.c): its instance number."""
    info = ctypes.create_string_buffer(payload, max(len(payload), 1))   # NOTRACK's is empty
    rule = ctypes.create_string_buffer(entry or b"", max(len(entry or b""), 1))
    with netns_fd(netns_path) as fd:
        arg = bytearray(proto.xt_match.build(dict(
            netns_fd=fd, family=family, name=name, revision=revision, proto=proto_,
            table=table, hook_mask=hook_mask, info_size=len(payload),
            info=ctypes.addressof(info), inv_proto=int(inv_proto),
            target=int(entry is not None), entry=ctypes.addressof(rule) if entry else 0,
            entry_size=len(entry or b""))))
        ioctl(proto.IOC_XT_MATCH_CREATE, arg, what)
    return proto.xt_match.parse(bytes(arg)).id


def xt_match_destroy(cookie: int, instances: list[int]) -> int:
    """Those of the instances that the namespace with that cookie has, destroyed once
    no program runs them (one grace period for all): how many it had (the others went
    with it)."""
    if not instances:
        return 0
    ids = array.array("I", instances)
    address, count = ids.buffer_info()
    return ioctl(proto.IOC_XT_MATCH_DESTROY,
                 proto.xt_match.build(dict(info=address, info_size=count * ids.itemsize,
                                           netns_cookie=cookie)),
                 f"destroy {len(instances)} kernel match instance(s)")


def xt_match_list() -> list[tuple[int, int]]:
    """(netns cookie, number) of every instance the module keeps."""
    room = 0
    while True:
        buffer = ctypes.create_string_buffer(max(room, 1) * proto.xt_instance_ref.sizeof())
        total = ioctl(proto.IOC_XT_MATCH_LIST,
                      proto.xt_match.build(dict(info=ctypes.addressof(buffer),
                                                info_size=room * proto.xt_instance_ref.sizeof())),
                      "list the kernel match instances")
        if total <= room:
            refs = proto.xt_instance_ref[total].parse(buffer.raw[:total * proto.xt_instance_ref.sizeof()])
            return [(ref.netns_cookie, ref.id) for ref in refs]
        room = total + 64   # more may come meanwhile
