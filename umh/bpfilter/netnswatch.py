"""When a network namespace bpfilter filters is dead to everyone else.

A netfilter BPF link holds a reference on its namespace (nf_bpf_link.c's
get_net_track), so the kernel never destroys a namespace while our links are
pinned: no event of the kernel's (RTM_DELNSID, cleanup_net) can tell us it is
gone, since it is not. With the kernel's own iptables the namespace would die
as soon as its last other reference went: its last task, open nsfs file, bind
mount (`ip netns add`), socket (a socket alone keeps a namespace alive, and
filtering), or any kernel object that takes one. So the namespace is dead for
our purpose exactly when its reference count is the number of our links in it.

That count is the kernel's own, read by a BPF iterator over bpf links: one
pass walks the host's links (no per-process work, no readlink racing a
process's exit) and, for each netfilter link, reports its id, its namespace's
cookie, inum and reference count. Reading the count cannot miss a holder:
every holder's reference is in it, and one taken while we read (by a new
holder, which must already hold one to reach it, or find it by nsid) only makes
the namespace look alive longer. The namespace a reference count equal to our
links names would, with the kernel's iptables, already be gone.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, Optional

from .bpf import syscall as bpf
from .bpf.asm import Assembler
from .bpf.btf import Btf, BtfError
from .bpf.insn import (BPF_DW, BPF_JEQ, BPF_JNE, BPF_W, FP, R0, R1, R2, R3, R6, R7, R8,
                       BPF_ALU64_IMM, BPF_ADD, BPF_EMIT_CALL, BPF_EXIT_INSN,
                       BPF_FUNC_probe_read_kernel, BPF_JMP_IMM, BPF_LDX_MEM, BPF_MOV64_IMM,
                       BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM)

BPF_FUNC_seq_write = 127

# what the program writes per netfilter link: link id, refs, cookie, inum
RECORD = struct.Struct("<IiQI4x")
_REC = -RECORD.size     # the record's place on the stack
_NET = _REC - 8         # the link's struct net *


class Unobservable(Exception):
    """This kernel does not let us read namespaces' reference counts."""


def _layout(btf: Btf) -> dict:
    def off(struct_name: str, path: str) -> int:
        return btf.member(struct_name, path)[0]

    try:
        refs = off("net", "ns.__ns_ref")     # 6.18's name
    except BtfError:
        refs = off("net", "ns.count")        # up to 6.17
    return {
        "type": off("bpf_link", "type"), "id": off("bpf_link", "id"),
        "net": off("bpf_nf_link", "net"), "refs": refs,
        "cookie": off("net", "net_cookie"), "inum": off("net", "ns.inum"),
        "netfilter": btf.enum_value("bpf_link_type", "BPF_LINK_TYPE_NETFILTER"),
        "target": btf.type_id("bpf_iter_bpf_link", "func"),
    }


def _read(dst: int, size: int, src_reg: int, src_off: int) -> list:
    """bpf_probe_read_kernel(fp + dst, size, src_reg + src_off)"""
    return [BPF_MOV64_REG(R1, FP), BPF_ALU64_IMM(BPF_ADD, R1, dst), BPF_MOV64_IMM(R2, size),
            BPF_MOV64_REG(R3, src_reg), BPF_ALU64_IMM(BPF_ADD, R3, src_off),
            BPF_EMIT_CALL(BPF_FUNC_probe_read_kernel)]


def _program(lay: dict) -> bytes:
    asm = Assembler()
    out = asm.label("out")
    asm.emit(
        BPF_LDX_MEM(BPF_DW, R6, R1, 0),          # ctx->meta
        BPF_LDX_MEM(BPF_DW, R7, R1, 8),          # ctx->link, NULL at the end
        BPF_JMP_IMM(BPF_JEQ, R7, 0, out),
        BPF_LDX_MEM(BPF_W, R8, R7, lay["type"]),
        BPF_JMP_IMM(BPF_JNE, R8, lay["netfilter"], out),
        BPF_LDX_MEM(BPF_W, R8, R7, lay["id"]),
        BPF_STX_MEM(BPF_W, FP, R8, _REC),
        BPF_ST_MEM(BPF_W, FP, _REC + 20, 0),     # the padding
        _read(_NET, 8, R7, lay["net"]),
        BPF_LDX_MEM(BPF_DW, R7, FP, _NET),       # struct net *, a number to us
        # a read that fails leaves zeros, which dead() takes as "unknown", never
        # as dead
        _read(_REC + 4, 4, R7, lay["refs"]),
        _read(_REC + 8, 8, R7, lay["cookie"]),
        _read(_REC + 16, 4, R7, lay["inum"]),
        BPF_LDX_MEM(BPF_DW, R1, R6, 0),          # meta->seq
        BPF_MOV64_REG(R2, FP), BPF_ALU64_IMM(BPF_ADD, R2, _REC),
        BPF_MOV64_IMM(R3, RECORD.size),
        BPF_EMIT_CALL(BPF_FUNC_seq_write))
    asm.place(out)
    asm.emit(BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())
    return asm.assemble()


class NetnsRefs:
    """The iterator, loaded once; `dead()` makes one pass."""

    def __init__(self) -> None:
        try:
            lay = _layout(Btf.vmlinux())
        except (OSError, BtfError) as err:
            raise Unobservable(f"the kernel's BTF lacks what the namespace check reads: {err}")
        try:
            self._prog = bpf.prog_load(bpf.BPF_PROG_TYPE_TRACING, _program(lay), "bpfilter_nsref",
                                       expected_attach_type=bpf.BPF_TRACE_ITER,
                                       attach_btf_id=lay["target"])
        except bpf.BpfError as err:
            raise Unobservable(f"cannot load the bpf link iterator: {err}")
        try:
            self._link = bpf.iter_link_create(self._prog)
        except bpf.BpfError as err:
            os.close(self._prog)
            raise Unobservable(f"cannot attach the bpf link iterator: {err}")

    def netfilter_links(self) -> list[tuple[int, int, int, int]]:
        """(link id, namespace refs, cookie, inum) of every netfilter link on the host."""
        fd = bpf.iter_create(self._link)
        try:
            data = bytearray()
            while chunk := os.read(fd, 1 << 16):
                data += chunk
        finally:
            os.close(fd)
        return [RECORD.unpack_from(data, at) for at in range(0, len(data), RECORD.size)]

    def dead(self, ours: Iterable[int], also: Optional[dict[int, int]] = None) -> set[int]:
        """Cookies of the namespaces whose only references are our links (ids `ours`)
        and what else of ours holds them (`also`: {cookie: references}, our sockets)."""
        ours = set(ours)
        refs: dict[int, int] = {}
        held: dict[int, int] = {}
        for link_id, count, cookie, _ in self.netfilter_links():
            if not cookie:     # a read that failed: nothing known
                continue
            refs[cookie] = count
            held[cookie] = held.get(cookie, 0) + (link_id in ours)
        also = also or {}
        return {cookie for cookie, count in refs.items()
                if held[cookie] > 0 and count == held[cookie] + also.get(cookie, 0)}

    def close(self) -> None:
        os.close(self._link)
        os.close(self._prog)


def open_watch(log) -> Optional[NetnsRefs]:
    try:
        return NetnsRefs()
    except Unobservable as err:
        log(f"{err}: tables of deleted namespaces stay until `bpfilter flush`")
        return None
