"""-j TCPOPTSTRIP (xt_TCPOPTSTRIP.c: --strip-options), the mangle table, -p tcp: the
kernel's own, run by bpfilter.ko (ext/xtmatch.py), which overwrites the listed tcp
options with NOPs and updates the checksum as the kernel does. The tcp options are
read once by the prologue (`--tcp-option`): a table reading them beside a
TCPOPTSTRIP rule is refused (stale)."""
from __future__ import annotations

from construct import Array, Int32un, Struct

from . import BOTH_FAMILIES
from .tcp import IPPROTO_TCP
from .xtmatch import plain_kernel_extension

xt_tcpoptstrip_target_info = Struct("strip_bmap" / Array(8, Int32un))


def _describe(f: dict) -> str:
    kinds = [str(kind) for kind in range(256) if f["strip_bmap"][kind // 32] >> (kind % 32) & 1]
    return "TCPOPTSTRIP options " + ",".join(kinds)


plain_kernel_extension("target", "TCPOPTSTRIP", xt_tcpoptstrip_target_info, BOTH_FAMILIES,
                       table="mangle", proto=IPPROTO_TCP, stale=frozenset({"tcpopt"}),
                       describe=_describe)
