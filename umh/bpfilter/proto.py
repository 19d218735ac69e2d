"""The request protocol between bpfilter.ko / the preload shim and the service;
the construct twin of kmod/bpfilter_proto.h (read that header for the contract)."""
from __future__ import annotations

import enum

from construct import Const, Default, Int16un, Int32sn, Int32un, Int64un, Struct

MAGIC = 0x62706674
VERSION = 2
MAX_PAYLOAD = 512 << 20
HEADER = "kmod/bpfilter_proto.h"


# struct bpfilter_conntrack: the argument of the ioctls on /dev/bpfilter
conntrack = Struct(
    "netns_fd" / Int32sn,
    "family" / Int32un,     # NFPROTO_IPV4 or NFPROTO_IPV6
)


def _IOW(type_: str, nr: int, size: int) -> int:
    return 1 << 30 | size << 16 | ord(type_) << 8 | nr


IOC_CONNTRACK_GET = _IOW("b", 1, conntrack.sizeof())
IOC_CONNTRACK_PUT = _IOW("b", 2, conntrack.sizeof())


class Op(enum.IntEnum):
    GETSOCKOPT = 1
    SETSOCKOPT = 2
    TABLE_NAMES = 3
    SHUTDOWN = 4


request = Struct(
    "magic" / Const(MAGIC, Int32un),
    "version" / Int16un,
    "op" / Int16un,
    "family" / Int32un,
    "optname" / Int32sn,
    "netns_cookie" / Int64un,
    "netns_inum" / Int32un,
    "pid" / Int32un,
    "len" / Int32un,
    "netns_fd" / Int32sn,
    "id" / Default(Int32un, 0),
    "reserved" / Default(Int32un, 0),
)

reply = Struct(
    "magic" / Const(MAGIC, Int32un),
    "version" / Int16un,
    "reserved" / Int16un,
    "status" / Int32sn,
    "len" / Int32un,
    "id" / Default(Int32un, 0),
)


def build_reply(status: int, payload: bytes = b"", id: int = 0) -> bytes:
    return reply.build(dict(version=VERSION, reserved=0, status=status, len=len(payload),
                            id=id)) + payload
