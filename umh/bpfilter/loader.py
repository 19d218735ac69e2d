"""Turning a compiled table into kernel objects: maps, programs, netfilter links.

Per table: one per-CPU counters map shared by its hooks. Per hook: the ruleset
program, a one-slot prog array holding it, and a dispatcher program attached with a
netfilter link that tail-calls through the slot (see compiler.codegen.dispatcher).
"""
from __future__ import annotations

import os
import struct
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Optional

from . import netns
from .abi import codec  # noqa: F401 (filled by the codec helper)
from .abi.decode import table_from_raw
from .bpf import syscall as bpf
from .bpf.btf import Btf
from .compiler import facts
from .compiler.codegen import COUNTERS, PROG_ARRAY, HookProgram, compile_table, dispatcher
from .model import Hook, Table
from .netfilter import NF_IP_PRI_FILTER

COUNTER_SIZE = 16   # struct { u64 packets; u64 bytes; }


@dataclass
class HookObjects:
    hook: Hook
    program: HookProgram
    prog_fd: int
    insn_count: int
    prog_array_fd: int
    dispatcher_fd: int
    link_fd: Optional[int] = None


@dataclass
class LoadedTable:
    table: Table
    counters_fd: int
    hooks: dict[Hook, HookObjects] = field(default_factory=dict)

    def counters(self) -> list[tuple[int, int]]:
        """(packets, bytes) per table entry, summed over CPUs."""
        size = bpf.percpu_value_size(COUNTER_SIZE)
        result = []
        for entry in range(self.table.num_entries):
            value = bpf.map_lookup(self.counters_fd, struct.pack("<I", entry), size)
            per_cpu = struct.iter_unpack("<QQ", value)
            packets = bytes_ = 0
            for p, b in per_cpu:
                packets += p
                bytes_ += b
            result.append((packets, bytes_))
        return result

    def test_run(self, hook: Hook, packet: bytes) -> int:
        """The verdict (0 drop, 1 accept) of the hook's ruleset program for an IP packet."""
        return bpf.nf_test_run(self.hooks[hook].prog_fd, hook, packet)[0]

    def fds(self) -> list[int]:
        fds = [self.counters_fd]
        for h in self.hooks.values():
            fds += [h.prog_fd, h.prog_array_fd, h.dispatcher_fd]
            if h.link_fd is not None:
                fds.append(h.link_fd)
        return fds

    def close(self) -> None:
        for fd in reversed(self.fds()):
            os.close(fd)
        self.hooks.clear()


def load_table(table: Table, netns_name: Optional[str] = None, attach: bool = True) -> LoadedTable:
    """Compile and load `table`; attach it at its hooks in `netns_name` (or the
    calling thread's netns). On any failure nothing stays loaded or attached."""
    btf = Btf.vmlinux()
    programs = compile_table(table, facts.KernelOffsets.from_btf(btf))
    kfunc_id = lambda k: btf.kfunc_id(k.name)   # noqa: E731
    with ExitStack() as undo:
        def owned(fd: int) -> int:
            undo.callback(os.close, fd)
            return fd

        counters_fd = owned(bpf.map_create(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4, COUNTER_SIZE,
                                           max(table.num_entries, 1), f"{table.name}_ctrs"))
        loaded = LoadedTable(table, counters_fd)
        for program in programs:
            name = program.hook.chain_name
            code = program.asm.assemble(map_fd={COUNTERS: counters_fd}.__getitem__,
                                        kfunc_id=kfunc_id)
            prog_fd = owned(bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, code, program.name,
                                          expected_attach_type=bpf.BPF_NETFILTER))
            array_fd = owned(bpf.map_create(bpf.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1,
                                            f"{table.name}_{name}"[:15]))
            bpf.map_update(array_fd, struct.pack("<I", 0), struct.pack("<I", prog_fd))
            disp = dispatcher().assemble(map_fd={PROG_ARRAY: array_fd}.__getitem__)
            disp_fd = owned(bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, disp,
                                          f"bpfilter_{name}"[:15],
                                          expected_attach_type=bpf.BPF_NETFILTER))
            loaded.hooks[program.hook] = HookObjects(program.hook, program, prog_fd,
                                                     len(code) // 8, array_fd, disp_fd)
        if attach:
            with netns.entered(netns_name) if netns_name else nullcontext():
                for objs in loaded.hooks.values():
                    objs.link_fd = owned(bpf.link_create_netfilter(
                        objs.dispatcher_fd, table.family, objs.hook, NF_IP_PRI_FILTER))
        undo.pop_all()
        return loaded


def load_filter_table(replace_blob: bytes, netns_name: Optional[str] = None,
                      attach: bool = True) -> LoadedTable:
    """The whole path for an IPT_SO_SET_REPLACE payload: validate, model, compile, load."""
    return load_table(table_from_raw(codec.parse_replace(replace_blob)), netns_name, attach)
