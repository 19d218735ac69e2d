"""-m realm (struct xt_realm_info, revision 0, IPv4): the realm of the packet's route,
skb_dst(skb)->tclassid, masked, against an id (CONFIG_IP_ROUTE_CLASSID).

With bpfilter.ko: the kernel's own (ext/xtmatch.py). Without it: realm_mt() in BPF, the
route read once per packet by the "realm" fact group (the route is the kernel's: the
skb's dst, set before the hooks realm_mt may run in: POSTROUTING, FORWARD, OUTPUT,
INPUT)."""
from __future__ import annotations

import errno
import functools
from dataclasses import dataclass

from construct import Int8un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_DW, BPF_EMIT_CALL, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_MOV64_REG, R1, R2, R3, R6, R7)
from ..errors import BpfilterError
from ..model import Family, Hook, Match
from ..packet import facts
from ..packet.primitives import emit_masked_equal
from . import register_match
from .xtmatch import ServedKernelMatch

xt_realm_info = Struct("id" / Int32un, "mask" / Int32un, "invert" / Int8un, Padding(3))
_REALM_HOOKS = sum(1 << h.value for h in (Hook.POST_ROUTING, Hook.FORWARD, Hook.LOCAL_OUT,
                                          Hook.LOCAL_IN))
SKB_DST_PTRMASK = ~1      # SKB_DST_NOREF in its low bit

TCLASSID = facts.reserve("realm", 8)   # u32: the route's tclassid (no route: 0)


@functools.lru_cache(maxsize=1)
def _offsets() -> tuple[int, int]:
    """(sk_buff->_skb_refdst, dst_entry->tclassid)."""
    try:
        b = Btf.vmlinux()
        return b.member("sk_buff", "_skb_refdst")[0], b.member("dst_entry", "tclassid")[0]
    except BtfError as err:
        raise BpfilterError(errno.EOPNOTSUPP, f"realm needs the route's tclassid in the "
                                              f"kernel's BTF (CONFIG_IP_ROUTE_CLASSID): {err}; "
                                              f"the whole table is refused") from None


def _read_tclassid(asm, k: facts.KernelOffsets) -> None:
    """The prologue's part (R7 = skb): skb_dst(skb)->tclassid, with
    bpf_probe_read_kernel() (dst_entry is not a type netfilter programs dereference)."""
    refdst, tclassid = _offsets()
    asm.emit(BPF_LDX_MEM(BPF_DW, R3, R7, refdst), BPF_ALU64_IMM(I.BPF_AND, R3, SKB_DST_PTRMASK),
             BPF_ALU64_IMM(I.BPF_ADD, R3, tclassid),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, TCLASSID), BPF_MOV64_IMM(R2, 4),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel))


facts.OPTIONAL["realm"] = _read_tclassid


@dataclass(frozen=True)
class ServedRealmMatch(Match):
    id: int
    mask: int
    invert: int
    name = "realm"
    revision = 0


@register_match
class Realm(ServedKernelMatch):
    name = "realm"
    revision = 0
    families = (Family.IPV4,)
    struct = xt_realm_info
    hooks = _REALM_HOOKS
    why = "which reads the packet's route"
    served_model = ServedRealmMatch
    served_facts = frozenset({"realm"})

    def served(self, payload: bytes, where: str) -> ServedRealmMatch:
        p = self.struct.parse(payload)     # no checkentry
        return ServedRealmMatch(p.id, p.mask, p.invert)

    def served_unsupported(self, match) -> "str | None":
        _offsets()
        return None

    def describe(self, m) -> str:
        f = self.fields_of(m)
        return f"realm {'! ' if f['invert'] else ''}0x{f['id']:x}/0x{f['mask']:x}"

    def emit_served(self, m: ServedRealmMatch, asm, out) -> None:
        # (info->id == (tclassid & info->mask)) ^ info->invert, invert a bool
        emit_masked_equal(asm, TCLASSID, 4, m.mask, m.id, bool(m.invert), out)
