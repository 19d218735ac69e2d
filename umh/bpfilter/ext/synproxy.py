"""-j SYNPROXY (struct xt_synproxy_info, revision 0): the kernel's own, run by
bpfilter.ko (ext/xtmatch.py). It answers a client's SYN with a SYN cookie and opens
the connection to the server once the client's ACK proves the cookie, through the
conntrack hooks its checkentry registers; the packets it answers it takes
(NF_STOLEN), which the module makes the program's drop. Its checkentry wants a rule
for TCP (-p tcp, not inverted: EINVAL, the generic protocol check's answer too, which
bpfilter makes without the module as well) and conntrack's synproxy extension."""
from __future__ import annotations

from construct import Int8un, Int16un, Struct

from ..model import Hook
from . import BOTH_FAMILIES
from .xtmatch import plain_kernel_extension

IPPROTO_TCP = 6
XT_SYNPROXY_OPT_MSS, XT_SYNPROXY_OPT_WSCALE = 0x01, 0x02
XT_SYNPROXY_OPT_SACK_PERM, XT_SYNPROXY_OPT_TIMESTAMP = 0x04, 0x08

xt_synproxy_info = Struct("options" / Int8un, "wscale" / Int8un, "mss" / Int16un)


def _describe(f: dict) -> str:
    # libxt_SYNPROXY's synproxy_tg_print()
    words = ["SYNPROXY"]
    if f["options"] & XT_SYNPROXY_OPT_SACK_PERM:
        words.append("sack-perm")
    if f["options"] & XT_SYNPROXY_OPT_TIMESTAMP:
        words.append("timestamp")
    if f["options"] & XT_SYNPROXY_OPT_WSCALE:
        words.append(f"wscale {f['wscale']}")
    if f["options"] & XT_SYNPROXY_OPT_MSS:
        words.append(f"mss {f['mss']}")
    return " ".join(words)


plain_kernel_extension("target", "SYNPROXY", xt_synproxy_info, BOTH_FAMILIES,
                       why="which answers the client itself (SYN cookies)",
                       hooks=(1 << Hook.LOCAL_IN.value) | (1 << Hook.FORWARD.value),
                       proto=IPPROTO_TCP, describe=_describe)
