"""The request protocol between bpfilter.ko / the preload shim and the service;
the construct twin of kmod/bpfilter_proto.h (read that header for the contract)."""
from __future__ import annotations

import enum

from construct import (Bytes, Const, Default, Int8un, Int16un, Int32sn, Int32un, Int64un,
                       PaddedString, Struct)

from .abi import families
from .abi import xtables as X

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

# struct bpfilter_nat_attach: a nat chain's program as the NAT core's lookup
nat_attach = Struct(
    "netns_fd" / Default(Int32sn, -1),
    "family" / Int32un,
    "hook" / Int32un,       # NF_INET_*
    "priority" / Default(Int32sn, 0),
    "prog_fd" / Default(Int32sn, -1),
    "pad" / Default(Int32un, 0),
    "netns_cookie" / Default(Int64un, 0),
)
IOC_NAT_ATTACH = _IOW("b", 3, nat_attach.sizeof())
IOC_NAT_DETACH = _IOW("b", 4, nat_attach.sizeof())
IOC_NAT_QUERY = _IOW("b", 5, nat_attach.sizeof())


# struct bpfilter_xt_match: a rule's match made by the kernel's x_tables (kmod/xtmatch.c)
xt_match = Struct(
    "netns_fd" / Default(Int32sn, -1),
    "family" / Default(Int32un, 0),
    "name" / Default(PaddedString(X.XT_EXTENSION_MAXNAMELEN, "ascii"), ""),
    "revision" / Default(Int8un, 0),
    "proto" / Default(Int16un, 0),
    "table" / Default(PaddedString(X.XT_TABLE_MAXNAMELEN, "ascii"), ""),
    "hook_mask" / Default(Int32un, 0),
    "info_size" / Default(Int32un, 0),
    "info" / Default(Int64un, 0),        # the payload's address
    "id" / Default(Int32un, 0),
    "inv_proto" / Default(Int8un, 0),
    "target" / Default(Int8un, 0),       # 1: a target's instance
    "pad" / Default(Bytes(2), bytes(2)),
    "netns_cookie" / Default(Int64un, 0),
    "entry" / Default(Int64un, 0),       # a target's rule's entry up to it: its address
    "entry_size" / Default(Int32un, 0),
    "pad2" / Default(Int32un, 0),
)


def _IOWR(type_: str, nr: int, size: int) -> int:
    return 3 << 30 | size << 16 | ord(type_) << 8 | nr


IOC_XT_MATCH_CREATE = _IOWR("b", 6, xt_match.sizeof())
IOC_XT_MATCH_DESTROY = _IOW("b", 7, xt_match.sizeof())
IOC_XT_MATCH_LIST = _IOW("b", 8, xt_match.sizeof())
# struct bpfilter_xt_instance_ref: what XT_MATCH_LIST writes per instance
xt_instance_ref = Struct(
    "netns_cookie" / Int64un,
    "id" / Int32un,
    "pad" / Default(Int32un, 0),
)


class XtVerdict(enum.IntEnum):
    """enum bpfilter_xt_verdict: bpfilter_xt_match()'s answer, the rule's outcome bits."""
    MATCH = 0
    MISMATCH = 1
    HOTDROP = 2


class NatHow(enum.IntEnum):
    """enum bpfilter_nat_how: the target bpfilter_nat() does the work of."""
    SNAT = 0
    DNAT = 1
    MASQUERADE = 2
    REDIRECT = 3
    NETMAP = 4


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
    "optlen" / Default(Int32un, 0),
)


def get_reads(family: int, optname: int, optlen: int) -> int:
    """bpfilter_get_reads(): how many bytes of a get's optval its request carries,
    those the kernel's handler copies from user once optlen has passed its check."""
    if optname == X.IPT_SO_GET_INFO:
        return X.XT_TABLE_MAXNAMELEN if optlen == X.SIZEOF_IPT_GETINFO else 0
    if optname == X.IPT_SO_GET_ENTRIES:
        return X.SIZEOF_IPT_GET_ENTRIES if optlen >= X.SIZEOF_IPT_GET_ENTRIES else 0
    abi = families.of(family)
    if optname in (abi.so_get_revision_match, abi.so_get_revision_target):
        size = X.xt_get_revision.sizeof()
        return size if optlen == size else 0
    return 0


def build_request(op: int, family: int, optname: int = 0, optval: bytes = b"", **header) -> bytes:
    """A request and its payload, as bpfilter.ko and the shim send them for a caller
    that passes optval (its optlen bytes): a get carries only what the kernel reads
    of it. header: the other fields (netns_inum, pid, netns_fd, id...)."""
    payload = optval[:get_reads(family, optname, len(optval))] if op == Op.GETSOCKOPT else optval
    fields = dict(netns_cookie=0, netns_inum=0, pid=0, netns_fd=-1, version=VERSION)
    fields.update(header)
    return request.build(dict(fields, op=op, family=family, optname=optname, len=len(payload),
                              optlen=len(optval))) + payload

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
