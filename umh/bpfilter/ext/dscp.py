"""-m dscp, -m tos (xt_dscp.c) and -j DSCP, -j TOS (xt_DSCP.c): the kernel's own,
run by bpfilter.ko (ext/xtmatch.py). The matches read the packet as each rule meets
it, so they see what an earlier rule's TOS or DSCP wrote; the targets rewrite the
DS field with the checksum update the kernel makes (mangle table only)."""
from __future__ import annotations

from construct import Int8un, Struct

from . import BOTH_FAMILIES
from .xtmatch import plain_kernel_extension

xt_dscp_info = Struct("dscp" / Int8un, "invert" / Int8un)
xt_tos_match_info = Struct("tos_mask" / Int8un, "tos_value" / Int8un, "invert" / Int8un)
xt_DSCP_info = Struct("dscp" / Int8un)
xt_tos_target_info = Struct("tos_value" / Int8un, "tos_mask" / Int8un)

_READS = "which reads the packet as each rule meets it"


def _bang(f: dict) -> str:
    return "!" if f["invert"] else ""


plain_kernel_extension("match", "dscp", xt_dscp_info, BOTH_FAMILIES, why=_READS,
                       describe=lambda f: f"DSCP match {_bang(f)}0x{f['dscp']:02x}")
plain_kernel_extension("match", "tos", xt_tos_match_info, BOTH_FAMILIES, revisions=(1,),
                       why=_READS, describe=lambda f: f"tos match {_bang(f)}"
                       f"0x{f['tos_value']:02x}/0x{f['tos_mask']:02x}")
plain_kernel_extension("target", "DSCP", xt_DSCP_info, BOTH_FAMILIES, table="mangle",
                       describe=lambda f: f"DSCP set 0x{f['dscp']:02x}")
plain_kernel_extension("target", "TOS", xt_tos_target_info, BOTH_FAMILIES, revisions=(1,),
                       table="mangle", describe=lambda f: f"TOS set "
                       f"0x{f['tos_value']:02x}/0x{f['tos_mask']:02x}")
