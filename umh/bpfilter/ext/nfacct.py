"""-m nfacct --nfacct-name NAME (struct xt_nfacct_match_info, revisions 0 and 1): the
kernel's xt_nfacct, run by bpfilter.ko (ext/xtmatch.py): the packet is counted in the
namespace's nfnetlink_acct object of that name (`nfacct list`), which checkentry finds
(ENOENT if there is none) and holds while the rule exists."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Int64ul, Struct

from . import BOTH_FAMILIES, register_match
from .xtmatch import KernelMatch, KernelMatchModel, c_string

NFACCT_NAME_MAX = 32

# the kernel's pointer to the object follows the name (zeros from userspace)
xt_nfacct_match_info = Struct(
    "name" / Bytes(NFACCT_NAME_MAX),
    "nfacct" / Int64ul,
)


@dataclass(frozen=True)
class NfacctMatch(KernelMatchModel):
    object_name: str
    revision: int = 0
    name = "nfacct"


class _Nfacct(KernelMatch):
    name = "nfacct"
    families = BOTH_FAMILIES
    family_independent = True   # xt_nfacct registers for NFPROTO_UNSPEC
    struct = xt_nfacct_match_info
    model = NfacctMatch

    def decode_fields(self, payload: bytes, where: str) -> dict:
        return dict(object_name=c_string(self.struct.parse(payload).name))

    def describe(self, m: NfacctMatch) -> str:
        return f"nfacct-name  {m.object_name}"


@register_match
class Nfacct0(_Nfacct):
    revision = 0


@register_match
class Nfacct1(_Nfacct):
    revision = 1   # the same layout, the pointer 8-aligned (it is already)
