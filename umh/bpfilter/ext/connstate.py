"""Matches of what the kernel keeps beside the packet, run by bpfilter.ko as the
kernel's own (ext/xtmatch.py): -m connlabel (its conntrack labels), -m rpfilter (a
route lookup of the source, in raw and mangle PREROUTING), -m physdev (the bridge
ports br_netfilter notes for bridged traffic; its checkentry loads br_netfilter).
(-m helper, which bpfilter runs without the module too, is in helper.py.)"""
from __future__ import annotations

from construct import Bytes, Int8un, Int16un, Padding, Struct

from . import BOTH_FAMILIES
from ..model import Hook
from .xtmatch import c_string, plain_kernel_extension

xt_connlabel_mtinfo = Struct("bit" / Int16un, "options" / Int16un)
xt_rpfilter_info = Struct("flags" / Int8un)
xt_physdev_info = Struct("physindev" / Bytes(16), "in_mask" / Bytes(16), "physoutdev" / Bytes(16),
                         "out_mask" / Bytes(16), "invert" / Int8un, "bitmask" / Int8un,
                         Padding(6))
# XT_PHYSDEV_OP_IN, _OUT, _BRIDGED, _ISIN, _ISOUT
_PHYSDEV_WORDS = ((1, "physdev-in", "physindev"), (2, "physdev-out", "physoutdev"),
                  (4, "physdev-is-bridged", None), (8, "physdev-is-in", None),
                  (16, "physdev-is-out", None))
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


def _describe_physdev(f: dict) -> str:
    words = ["PHYSDEV match"]
    for bit, word, name in _PHYSDEV_WORDS:
        if f["bitmask"] & bit:
            bang = "! " if f["invert"] & bit else ""
            words.append(f"{bang}--{word}" + (f" {c_string(f[name])}" if name else ""))
    return " ".join(words)


plain_kernel_extension("match", "physdev", xt_physdev_info, BOTH_FAMILIES, why=_READS,
                       family_independent=True, describe=_describe_physdev)
