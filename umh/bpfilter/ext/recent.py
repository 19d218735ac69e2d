"""-m recent (struct xt_recent_mtinfo, revision 0; xt_recent_mtinfo_v1 with --mask,
revision 1): the kernel's xt_recent, run by bpfilter.ko (ext/xtmatch.py), so that its
lists are the kernel's: /proc/net/xt_recent/NAME, shared by name with every other rule
of the namespace (ip_tables' too), surviving a replace as they do in the kernel."""
from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass

from construct import Bytes, Int8un, Int32ul, Padding, Struct

from ..errors import BpfilterError
from ..model import Family
from . import BOTH_FAMILIES, register_match
from .xtmatch import KernelMatch, KernelMatchModel, c_string

XT_RECENT_NAME_LEN = 200
XT_RECENT_CHECK, XT_RECENT_SET, XT_RECENT_UPDATE, XT_RECENT_REMOVE = 1, 2, 4, 8
XT_RECENT_TTL, XT_RECENT_REAP = 16, 32
XT_RECENT_VALID_FLAGS = 63
XT_RECENT_DEST = 1

_V0_FIELDS = (
    "seconds" / Int32ul,
    "hit_count" / Int32ul,
    "check_set" / Int8un,
    "invert" / Int8un,
    "name" / Bytes(XT_RECENT_NAME_LEN),
    "side" / Int8un,
    Padding(1),
)
xt_recent_mtinfo = Struct(*_V0_FIELDS)
xt_recent_mtinfo_v1 = Struct(*_V0_FIELDS, "mask" / Bytes(16))


@dataclass(frozen=True)
class RecentMatch(KernelMatchModel):
    seconds: int
    hit_count: int
    check_set: int
    invert: int
    list_name: str
    side: int
    mask: bytes
    revision: int = 1
    name = "recent"


class _Recent(KernelMatch):
    name = "recent"
    families = BOTH_FAMILIES
    model = RecentMatch

    def decode_fields(self, payload: bytes, where: str) -> dict:
        p = self.struct.parse(payload)
        # recent_mt_check()'s tests of the flags, which no kernel changed (the limit on
        # --hitcount did: the kernel's own check, run when the table is loaded, has it)
        modes = p.check_set & (XT_RECENT_SET | XT_RECENT_REMOVE | XT_RECENT_CHECK |
                               XT_RECENT_UPDATE)
        if p.check_set & ~XT_RECENT_VALID_FLAGS or bin(modes).count("1") != 1 or \
                (p.check_set & (XT_RECENT_SET | XT_RECENT_REMOVE) and
                 (p.seconds or p.hit_count or p.check_set & (XT_RECENT_TTL | XT_RECENT_REAP))) \
                or (p.check_set & XT_RECENT_REAP and not p.seconds):
            raise BpfilterError(errno.EINVAL, f"{where}: recent: invalid options "
                                              f"(flags {p.check_set:#x}, seconds {p.seconds}, "
                                              f"hitcount {p.hit_count})")
        # the ip_tables default of revision 0, which has no mask: every bit
        mask = p.mask if self.revision == 1 else b"\xff" * 16
        return dict(seconds=p.seconds, hit_count=p.hit_count, check_set=p.check_set,
                    invert=p.invert, list_name=c_string(p.name), side=p.side, mask=mask)

    def describe(self, m: RecentMatch) -> str:
        # libxt_recent's recent_print()
        out = ["!"] if m.invert else []
        out.append("recent:")
        out += [word for flag, word in ((XT_RECENT_SET, "SET"), (XT_RECENT_CHECK, "CHECK"),
                                        (XT_RECENT_UPDATE, "UPDATE"), (XT_RECENT_REMOVE, "REMOVE"))
                if m.check_set & flag]
        if m.seconds:
            out.append(f"seconds: {m.seconds}")
        if m.check_set & XT_RECENT_REAP:
            out.append("reap")
        if m.hit_count:
            out.append(f"hit_count: {m.hit_count}")
        if m.check_set & XT_RECENT_TTL:
            out.append("TTL-Match")
        out.append(f"name: {m.list_name}")
        out.append("side: dest" if m.side == XT_RECENT_DEST else "side: source")
        if self.revision == 1:
            mask = m.mask[:4] if self.family is Family.IPV4 else m.mask
            out.append(f"mask: {ipaddress.ip_address(mask)}")
        return " ".join(out)


@register_match
class Recent0(_Recent):
    revision = 0
    struct = xt_recent_mtinfo


@register_match
class Recent1(_Recent):
    revision = 1
    struct = xt_recent_mtinfo_v1
