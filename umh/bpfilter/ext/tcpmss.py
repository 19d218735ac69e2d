"""-m tcpmss (xt_tcpmss.c) and -j TCPMSS (xt_TCPMSS.c): the kernel's own, run by
bpfilter.ko (ext/xtmatch.py). The target rewrites (or adds) the MSS option of a SYN
with the checksum update the kernel makes; its checkentry looks for the rule's tcp
SYN test among the rule's matches, which the module hands it as ip_tables would.
What it adds is past the tcp options the prologue read once (`--tcp-option`): a
table reading them beside a TCPMSS rule is refused (stale)."""
from __future__ import annotations

from construct import Int8un, Int16un, Padding, Struct

from . import BOTH_FAMILIES
from .tcp import IPPROTO_TCP
from .xtmatch import plain_kernel_extension

XT_TCPMSS_CLAMP_PMTU = 0xFFFF

xt_tcpmss_match_info = Struct("mss_min" / Int16un, "mss_max" / Int16un, "invert" / Int8un,
                              Padding(1))
xt_tcpmss_info = Struct("mss" / Int16un)


def _describe_match(f: dict) -> str:
    bang = "!" if f["invert"] else ""
    span = f"{f['mss_min']}" if f["mss_min"] == f["mss_max"] else f"{f['mss_min']}:{f['mss_max']}"
    return f"tcpmss match {bang}{span}"


plain_kernel_extension("match", "tcpmss", xt_tcpmss_match_info, BOTH_FAMILIES,
                       proto=IPPROTO_TCP, why="which reads the packet as each rule meets it",
                       describe=_describe_match)
plain_kernel_extension("target", "TCPMSS", xt_tcpmss_info, BOTH_FAMILIES, proto=IPPROTO_TCP,
                       stale=frozenset({"tcpopt"}),
                       describe=lambda f: "TCPMSS clamp to PMTU"
                       if f["mss"] == XT_TCPMSS_CLAMP_PMTU else f"TCPMSS set {f['mss']}")
