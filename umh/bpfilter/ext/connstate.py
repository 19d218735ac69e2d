"""Matches of what the kernel keeps beside the packet, run by bpfilter.ko as the
kernel's own (ext/xtmatch.py): -m connlabel (its conntrack labels), -m rpfilter (a
route lookup of the source, in raw and mangle PREROUTING). (-m helper and -m physdev,
which bpfilter runs without the module too, are in helper.py and physdev.py.)"""
from __future__ import annotations

from construct import Int8un, Int16un, Struct

from . import BOTH_FAMILIES
from ..model import Hook
from .xtmatch import plain_kernel_extension

xt_connlabel_mtinfo = Struct("bit" / Int16un, "options" / Int16un)
xt_rpfilter_info = Struct("flags" / Int8un)
_RPFILTER_WORDS = ((1, "loose"), (2, "validmark"), (4, "accept-local"), (8, "invert"))
_READS = "which reads what the kernel keeps beside the packet"


plain_kernel_extension("match", "connlabel", xt_connlabel_mtinfo, BOTH_FAMILIES, why=_READS,
                       family_independent=True,
                       describe=lambda f: f"connlabel {'! ' if f['options'] & 1 else ''}"
                       f"{f['bit']}")
plain_kernel_extension("match", "rpfilter", xt_rpfilter_info, BOTH_FAMILIES, why=_READS,
                       hooks=1 << Hook.PRE_ROUTING.value, table=("raw", "mangle"),
                       describe=lambda f: " ".join(["rpfilter", *(word for bit, word in
                                                                  _RPFILTER_WORDS
                                                                  if f["flags"] & bit)]))
