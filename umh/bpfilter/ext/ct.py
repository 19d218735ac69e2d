"""-j CT (revisions 0 to 2: --notrack, --zone, --zone-orig/--zone-reply, --ctevents,
--expevents, --helper, --timeout) and -j NOTRACK (xt_CT.c), in the raw table: the
kernel's own, run by bpfilter.ko (ext/xtmatch.py). Its checkentry makes the conntrack
template (zone, helper, timeout policy: the kernel's own objects) and the target
attaches it to the packet before conntrack sees it, as with ip_tables. The packet's
conntrack facts are read once by the prologue: a raw table reading them beside a CT
rule is refused (stale)."""
from __future__ import annotations

from construct import Bytes, Int16un, Int32un, Int64un, Padding, Struct

from . import BOTH_FAMILIES
from .xtmatch import c_string, plain_kernel_extension

XT_CT_NOTRACK = 1
_CT_FACTS = frozenset({"ct", "ct6", "ct_expires", "ctmark"})

_HEAD = ("flags" / Int16un, "zone" / Int16un, "ct_events" / Int32un,
         "exp_events" / Int32un, "helper" / Bytes(16))
# the kernel's template pointer follows, 8-aligned (GET_ENTRIES zeroes it: USERSIZE)
xt_ct_target_info = Struct(*_HEAD, Padding(4), "_ct" / Int64un)
xt_ct_target_info_v1 = Struct(*_HEAD, "timeout" / Bytes(32), Padding(4), "_ct" / Int64un)
xt_notrack = Struct()


def _describe(f: dict) -> str:
    if f["flags"] & XT_CT_NOTRACK:
        return "CT notrack"
    words = ["CT"]
    if f["helper"].strip(b"\0"):
        words.append(f"helper {c_string(f['helper'])}")
    if f.get("timeout", b"").strip(b"\0"):
        words.append(f"timeout {c_string(f['timeout'])}")
    if f["zone"]:
        words.append(f"zone {f['zone']}")
    return " ".join(words)


plain_kernel_extension("target", "CT", xt_ct_target_info, BOTH_FAMILIES, table="raw",
                       stale=_CT_FACTS, describe=_describe)
plain_kernel_extension("target", "CT", xt_ct_target_info_v1, BOTH_FAMILIES, revisions=(1, 2),
                       table="raw", stale=_CT_FACTS, describe=_describe)
plain_kernel_extension("target", "NOTRACK", xt_notrack, BOTH_FAMILIES, table="raw",
                       family_independent=True, stale=_CT_FACTS, describe=lambda f: "NOTRACK")
