"""-m physdev (struct xt_physdev_info, revision 0, both families): the bridge ports of
bridged traffic, which br_netfilter notes beside the packet (its nf_bridge_info skb
extension) before the IP hooks run: --physdev-in, --physdev-out (names under masks,
`+` wildcards as iptables writes them), --physdev-is-in, --physdev-is-out,
--physdev-is-bridged, each `!`-able, as physdev_mt() tests them.

With bpfilter.ko: the kernel's own (ext/xtmatch.py). Without it: the "physdev" fact
group reads, once per packet, whether the extension is there, the out port's name
(physoutdev), and the in port's, found as nf_bridge_get_physindev() finds it:
dev_get_by_index_rcu() in the hook's namespace, the walk of the namespace's
dev_index_head bucket done with bpf_probe_read_kernel() (a bpf_loop() over the chain),
at BTF offsets. physdev_mt_check()'s refusals are the kernel's (EINVAL); its
request_module("br_netfilter") is the service's, where br_netfilter is a module not
loaded yet.
"""
from __future__ import annotations

import errno
import functools
import os
import subprocess
from dataclasses import dataclass
from typing import Optional

from construct import Bytes, Int8un, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_EXIT_INSN,
                        BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_FUNC, BPF_LD_IMM64,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, R0, R1, R2, R3, R4, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Hook, Match
from ..packet import facts
from . import BOTH_FAMILIES, missing_kfunc, register_match
from .kread import emit_read_pointer, emit_skb_ext_find, probe, skb_ext_offsets
from .xtmatch import XT_MATCH_KFUNC, ServedKernelMatch, c_string

IFNAMSIZ = 16
xt_physdev_info = Struct("physindev" / Bytes(IFNAMSIZ), "in_mask" / Bytes(IFNAMSIZ),
                         "physoutdev" / Bytes(IFNAMSIZ), "out_mask" / Bytes(IFNAMSIZ),
                         "invert" / Int8un, "bitmask" / Int8un, Padding(6))
OP_IN, OP_OUT, OP_BRIDGED, OP_ISIN, OP_ISOUT = 1, 2, 4, 8, 16
OP_MASK = 0x1F
_WORDS = ((OP_IN, "physdev-in", "physindev"), (OP_OUT, "physdev-out", "physoutdev"),
          (OP_BRIDGED, "physdev-is-bridged", None), (OP_ISIN, "physdev-is-in", None),
          (OP_ISOUT, "physdev-is-out", None))
NETDEV_HASHENTRIES = 256
MAX_CHAIN = 1 << 16      # a bucket's devices: far more than any namespace hashes to one

# The "physdev" region: whether the packet is bridged (has br_netfilter's extension),
# whether its in and out ports were found, their names; the walk's scratch.
_REGION = facts.reserve("physdev", 64)
BRIDGED = _REGION
IN_FOUND, OUT_FOUND = _REGION + 1, _REGION + 2
IN_NAME, OUT_NAME = _REGION + 8, _REGION + 24
_IFINDEX = _REGION + 40      # u32
_NODE = _REGION + 48         # u64: the chain's node, the extension on the way
_TMP = _REGION + 56          # u64


@functools.lru_cache(maxsize=1)
def _offsets() -> dict[str, int]:
    try:
        b = Btf.vmlinux()
        skb_ext_offsets("SKB_EXT_BRIDGE_NF")
        return dict(
            physinif=b.member("nf_bridge_info", "physinif")[0],
            physoutdev=b.member("nf_bridge_info", "physoutdev")[0],
            state_net=b.member("nf_hook_state", "net")[0],
            index_head=b.member("net", "dev_index_head")[0],
            index_hlist=b.member("net_device", "index_hlist")[0],
            ifindex=b.member("net_device", "ifindex")[0],
            name=b.member("net_device", "name")[0])
    except BtfError as err:
        raise BpfilterError(errno.EOPNOTSUPP, f"physdev needs br_netfilter's bridge information "
                                              f"in the kernel's BTF ({err}); the whole table "
                                              f"is refused") from None


def _read_ports(asm, k: facts.KernelOffsets) -> None:
    """The prologue's part (R7 = skb, R8 = the hook state)."""
    o = _offsets()
    done, no_out = asm.label("physdev_done"), asm.label("physdev_no_out")
    active, bit, _, _ = skb_ext_offsets("SKB_EXT_BRIDGE_NF")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R7, active), BPF_ALU64_IMM(I.BPF_AND, R1, bit),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, done), BPF_ST_MEM(BPF_B, R6, BRIDGED, 1))
    # nf_bridge_info_get()
    emit_skb_ext_find(asm, R7, "SKB_EXT_BRIDGE_NF", _NODE, done)
    asm.emit(BPF_STX_MEM(BPF_DW, R6, R3, _NODE), BPF_ALU64_IMM(I.BPF_ADD, R3, o["physinif"]))
    probe(asm, _IFINDEX, 4)
    asm.emit(BPF_LDX_MEM(BPF_DW, R3, R6, _NODE), BPF_ALU64_IMM(I.BPF_ADD, R3, o["physoutdev"]))
    emit_read_pointer(asm, _TMP, no_out)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, o["name"]))
    probe(asm, OUT_NAME, IFNAMSIZ)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, no_out), BPF_ST_MEM(BPF_B, R6, OUT_FOUND, 1))
    asm.place(no_out)
    # dev_get_by_index_rcu(state->net, physinif): its bucket's first node
    asm.emit(BPF_LDX_MEM(BPF_DW, R3, R8, o["state_net"]),
             BPF_ALU64_IMM(I.BPF_ADD, R3, o["index_head"]))
    emit_read_pointer(asm, _TMP, done)
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, _IFINDEX),
             BPF_ALU64_IMM(I.BPF_AND, R1, NETDEV_HASHENTRIES - 1),
             BPF_ALU64_IMM(I.BPF_LSH, R1, 3), BPF_ALU64_REG(I.BPF_ADD, R3, R1),
             BPF_ST_MEM(BPF_DW, R6, _NODE, 0))
    probe(asm, _NODE, 8)
    walk = asm.subprogram("physdev_walk", lambda: _emit_walk(asm, o))
    asm.emit(BPF_MOV64_IMM(R1, MAX_CHAIN), *BPF_LD_FUNC(R2, walk), BPF_MOV64_REG(R3, R6),
             BPF_MOV64_IMM(R4, 0), BPF_EMIT_CALL(I.BPF_FUNC_loop))
    asm.place(done)


def _emit_walk(asm, o: dict) -> None:
    """One node of hlist_for_each_entry_rcu(dev, head, index_hlist), R2 = &facts: the
    device whose ifindex is the in port's gives its name."""
    more, other = asm.label("physdev_node"), asm.label("physdev_other")

    def stop() -> list:
        return [BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN()]

    asm.emit(BPF_MOV64_REG(R6, R2), BPF_LDX_MEM(BPF_DW, R7, R6, _NODE),
             BPF_JMP_IMM(I.BPF_JNE, R7, 0, more), *stop())
    asm.place(more)
    asm.emit(BPF_MOV64_REG(R3, R7), BPF_ALU64_IMM(I.BPF_ADD, R3, o["ifindex"] - o["index_hlist"]))
    probe(asm, _TMP, 4)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, other), BPF_LDX_MEM(BPF_W, R1, R6, _TMP),
             BPF_LDX_MEM(BPF_W, R2, R6, _IFINDEX), BPF_JMP_REG(I.BPF_JNE, R1, R2, other),
             BPF_MOV64_REG(R3, R7), BPF_ALU64_IMM(I.BPF_ADD, R3, o["name"] - o["index_hlist"]))
    probe(asm, IN_NAME, IFNAMSIZ)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, other), BPF_ST_MEM(BPF_B, R6, IN_FOUND, 1), *stop())
    asm.place(other)
    # the next node (hlist_node.next, its first member)
    asm.emit(BPF_ST_MEM(BPF_DW, R6, _NODE, 0), BPF_MOV64_REG(R3, R7))
    probe(asm, _NODE, 8)
    asm.emit(BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())


facts.OPTIONAL["physdev"] = _read_ports


@dataclass(frozen=True)
class ServedPhysdevMatch(Match):
    physindev: bytes
    in_mask: bytes
    physoutdev: bytes
    out_mask: bytes
    invert: int
    bitmask: int
    name = "physdev"
    revision = 0


def _request_br_netfilter() -> None:
    """physdev_mt_check()'s request_module("br_netfilter"), once: without it bridged
    packets do not reach the IP hooks. A failure is ignored, as the kernel's is."""
    if os.path.isdir("/proc/sys/net/bridge"):
        return
    try:
        subprocess.run(["modprobe", "-q", "br_netfilter"], check=False, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        pass


@register_match
class Physdev(ServedKernelMatch):
    name = "physdev"
    revision = 0
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_physdev_info
    why = "which reads what the kernel keeps beside the packet"
    served_model = ServedPhysdevMatch
    served_facts = frozenset({"physdev"})

    def decode_in(self, payload: bytes, where: str, hook_mask: int):
        if not missing_kfunc(XT_MATCH_KFUNC):
            return super().decode_in(payload, where, hook_mask)
        p = self.struct.parse(payload)
        # physdev_mt_check()
        if not p.bitmask & OP_MASK or p.bitmask & ~OP_MASK:
            raise BpfilterError(errno.EINVAL, f"{where}: physdev: no option, or an unknown one "
                                              f"({p.bitmask:#x})")
        if p.bitmask & (OP_OUT | OP_ISOUT) and \
                (not p.bitmask & OP_BRIDGED or p.invert & OP_BRIDGED) and \
                hook_mask & (1 << Hook.LOCAL_OUT.value):
            raise BpfilterError(errno.EINVAL, f"{where}: physdev: --physdev-out and "
                                              f"--physdev-is-out only supported in the FORWARD "
                                              f"and POSTROUTING chains with bridged traffic")
        _request_br_netfilter()
        return ServedPhysdevMatch(p.physindev, p.in_mask, p.physoutdev, p.out_mask, p.invert,
                                  p.bitmask)

    def served_unsupported(self, m) -> Optional[str]:
        _offsets()
        return None

    def describe(self, m) -> str:
        f = self.fields_of(m)
        words = ["PHYSDEV match"]
        for bit, word, field in _WORDS:
            if f["bitmask"] & bit:
                bang = "! " if f["invert"] & bit else ""
                words.append(f"{bang}--{word}" + (f" {c_string(f[field])}" if field else ""))
        return " ".join(words)

    def emit_served(self, m: ServedPhysdevMatch, asm, out) -> None:
        """physdev_mt(): R7 = 1 while it holds; each test that fails sets it to 0. R8,
        R9: whether the out and in ports were found."""
        fail, done = asm.label("physdev_fail"), asm.label("physdev_done")
        bits, inv = m.bitmask, m.invert
        bridged = asm.label("physdev_bridged")
        asm.emit(BPF_MOV64_IMM(R7, 1), BPF_LDX_MEM(BPF_B, R1, R6, BRIDGED),
                 BPF_JMP_IMM(I.BPF_JNE, R1, 0, bridged))
        # not bridged: only the inverted tests hold
        if bits & ~inv:
            asm.emit(BPF_JMP_A(fail))
        else:
            asm.emit(BPF_JMP_A(done))
        asm.place(bridged)
        asm.emit(BPF_LDX_MEM(BPF_B, R8, R6, OUT_FOUND), BPF_LDX_MEM(BPF_B, R9, R6, IN_FOUND))
        if bits & OP_BRIDGED:
            # fails when !!outdev ^ !(invert & BRIDGED)
            asm.emit(BPF_JMP_IMM(I.BPF_JNE if inv & OP_BRIDGED else I.BPF_JEQ, R8, 0, fail))
        if bits & OP_ISIN:
            asm.emit(BPF_JMP_IMM(I.BPF_JNE if inv & OP_ISIN else I.BPF_JEQ, R9, 0, fail))
        if bits & OP_ISOUT:
            asm.emit(BPF_JMP_IMM(I.BPF_JNE if inv & OP_ISOUT else I.BPF_JEQ, R8, 0, fail))
        if bits & OP_IN:
            no_in = asm.label("physdev_no_in")
            asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R9, 0, no_in))
            _emit_differs(asm, IN_NAME, m.physindev, m.in_mask)
            # fails when !differs ^ !(invert & IN)
            asm.emit(BPF_JMP_IMM(I.BPF_JEQ if inv & OP_IN else I.BPF_JNE, R1, 0, fail))
            asm.place(no_in)
        if bits & OP_OUT:
            asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R8, 0, done))
            _emit_differs(asm, OUT_NAME, m.physoutdev, m.out_mask)
            # holds when !!differs ^ !(invert & OUT)
            asm.emit(BPF_JMP_IMM(I.BPF_JNE if inv & OP_OUT else I.BPF_JEQ, R1, 0, done))
            asm.emit(BPF_JMP_A(fail))
        asm.emit(BPF_JMP_A(done))
        asm.place(fail)
        asm.emit(BPF_MOV64_IMM(R7, 0))
        asm.place(done)
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R7, 1))
        out.mismatch(R7)


def _emit_differs(asm, at: int, name: bytes, mask: bytes) -> None:
    """R1 = ifname_compare_aligned(): the name's bytes at facts + at against `name`,
    under `mask`, as two 64-bit words (non-zero if they differ)."""
    asm.emit(BPF_MOV64_IMM(R1, 0))
    for w in range(0, IFNAMSIZ, 8):
        asm.emit(BPF_LDX_MEM(BPF_DW, R2, R6, at + w),
                 *BPF_LD_IMM64(R3, int.from_bytes(name[w:w + 8], "little")),
                 BPF_ALU64_REG(I.BPF_XOR, R2, R3),
                 *BPF_LD_IMM64(R3, int.from_bytes(mask[w:w + 8], "little")),
                 BPF_ALU64_REG(I.BPF_AND, R2, R3), BPF_ALU64_REG(I.BPF_OR, R1, R2))
