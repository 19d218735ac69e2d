"""-j CONNSECMARK (struct xt_connsecmark_target_info, revision 0): --save copies the
packet's security mark to its conntrack entry, --restore the entry's to the packet,
each only where the destination has none. The kernel's own, run by bpfilter.ko
(ext/xtmatch.py): its checkentry takes the mangle and security tables only, and a
mode, and holds conntrack for the namespace. No fact of bpfilter's reads a security
mark."""
from __future__ import annotations

from construct import Int8un, Struct

from . import BOTH_FAMILIES
from .xtmatch import plain_kernel_extension

CONNSECMARK_SAVE, CONNSECMARK_RESTORE = 1, 2

xt_connsecmark_target_info = Struct("mode" / Int8un)

_MODES = {CONNSECMARK_SAVE: "save", CONNSECMARK_RESTORE: "restore"}

plain_kernel_extension("target", "CONNSECMARK", xt_connsecmark_target_info, BOTH_FAMILIES,
                       why="which writes the packet's or the connection's security mark",
                       family_independent=True,
                       describe=lambda f: f"CONNSECMARK {_MODES.get(f['mode'], 'invalid mode')}")
