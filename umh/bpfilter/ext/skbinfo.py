"""-j CHECKSUM (xt_CHECKSUM.c: --checksum-fill) and -j CLASSIFY (xt_CLASSIFY.c:
skb->priority), in the mangle table: the kernel's own, run by bpfilter.ko
(ext/xtmatch.py)."""
from __future__ import annotations

from construct import Int8un, Int32un, Struct

from . import BOTH_FAMILIES
from ..model import Hook
from .xtmatch import plain_kernel_extension

xt_CHECKSUM_info = Struct("operation" / Int8un)
xt_classify_target_info = Struct("priority" / Int32un)
_CLASSIFY_HOOKS = sum(1 << h.value for h in (Hook.LOCAL_OUT, Hook.FORWARD, Hook.POST_ROUTING))

plain_kernel_extension("target", "CHECKSUM", xt_CHECKSUM_info, BOTH_FAMILIES, table="mangle",
                       family_independent=True, describe=lambda f: "CHECKSUM fill")
plain_kernel_extension("target", "CLASSIFY", xt_classify_target_info, BOTH_FAMILIES,
                       table="mangle", hooks=_CLASSIFY_HOOKS, family_independent=True,
                       describe=lambda f: f"CLASSIFY set {f['priority'] >> 16:x}:"
                       f"{f['priority'] & 0xFFFF:x}")
