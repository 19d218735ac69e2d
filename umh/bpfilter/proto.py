"""The request protocol between bpfilter.ko / the preload shim and the service;
the construct twin of kmod/bpfilter_proto.h (read that header for the contract)."""
from __future__ import annotations

import enum

from construct import Const, Int16un, Int32sn, Int32un, Int64un, Struct

MAGIC = 0x62706674
VERSION = 1
MAX_PAYLOAD = 512 << 20
HEADER = "kmod/bpfilter_proto.h"


# _IO('b', nr): ioctls on /dev/bpfilter, the argument a netns file descriptor
IOC_CONNTRACK_GET = ord("b") << 8 | 1
IOC_CONNTRACK_PUT = ord("b") << 8 | 2


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
)

reply = Struct(
    "magic" / Const(MAGIC, Int32un),
    "version" / Int16un,
    "reserved" / Int16un,
    "status" / Int32sn,
    "len" / Int32un,
)


def build_reply(status: int, payload: bytes = b"") -> bytes:
    return reply.build(dict(version=VERSION, reserved=0, status=status, len=len(payload))) + payload
