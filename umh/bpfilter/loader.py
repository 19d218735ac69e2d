"""Turning a compiled table into kernel objects: maps, programs, netfilter links.

Two lifetimes:
  Ruleset     one table's compiled programs (one per hook) and its counters; replaced
              as a whole by every IPT_SO_SET_REPLACE.
  HookSlot    what is attached at one hook: a one-slot prog array and a dispatcher
              program tail-calling through it, attached with a netfilter link. It
              outlives rulesets: replacing a table is one prog-array update per hook,
              atomic for every packet (see compiler.codegen.dispatcher).

Counters are per-CPU (packets, bytes) per table entry, plus a plain array of offsets
that IPT_SO_SET_ADD_COUNTERS adds to: the programs never touch it, so userspace
additions never race with packet accounting.

The classifier's maps (ClassifierMaps) have a third lifetime: a table's successive
rulesets share them while their runs fit, so a replace that keeps most runs
(compiler.classifier.EarlierRuns) writes only the keys of its new ones.
"""
from __future__ import annotations

import array
import errno
import functools
import itertools
import os
import struct
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Optional

from . import ctnetns, kmodule, netns
from .decode import table_from_blob
from .bpf import syscall as bpf
from .bpf.btf import Btf
from .packet import facts
from . import ext
from .compiler.classifier import KEYS, VALUE_SIZE
from .compiler.runs import RECORD_SIZE, Classified, TupleSpace
from .compiler.templates import INSTANCES
from .compiler.trace import TRACE_INFO
from .ext import xtmatch
from .bpf.insn import Kfunc, MapRef
from .errors import BpfilterError
from .compiler.codegen import (CLASSIFIER, CLASSIFIER_RECORDS, COUNTERS, PROG_ARRAY,
                               CompiledTable, HookProgram, compile_table, dispatcher,
                               facts_needed)
from .model import Family, Hook, Table
from .tables import TABLES

COUNTER = struct.Struct("<QQ")   # struct { u64 packets; u64 bytes; }
_CLASSIFIER_VALUE = struct.Struct("<II")   # entry, verdict
_KEY0 = struct.pack("<I", 0)


@dataclass
class HookRules:
    hook: Hook
    program: Optional[HookProgram]   # None when recovered from a pin (not recompiled)
    prog_fd: int
    insn_count: int


@dataclass
class Ruleset:
    table: Table
    counters_fd: int
    offsets_fd: int
    hooks: dict[Hook, HookRules] = field(default_factory=dict)
    compiled: Optional[CompiledTable] = None        # None when recovered from a pin
    classifier: Optional["ClassifierMaps"] = None   # shared with the rulesets after it
    # the kernel matches this load made (ext/xtmatch.py), until a generation holds them
    kernel_matches: Optional[xtmatch.HeldInstances] = None

    @functools.cached_property
    def traced(self) -> bool:
        """Whether its programs trace (compiler/trace.py): they read its trace info."""
        if self.compiled is not None:
            return self.compiled.trace_info is not None
        maps = _state_maps(self)
        try:
            return f"{self.table.name}{_TRACE_INFO_SUFFIX}" in maps
        finally:
            for fd in maps.values():
                os.close(fd)

    @functools.cached_property
    def uses_conntrack(self) -> bool:
        """Whether its programs read conntrack (it must be on in their namespace)."""
        needs = self.compiled.needs if self.compiled else facts_needed(self.table)
        return bool(needs & facts.READ_CONNTRACK)

    @functools.cached_property
    def counts_conntrack(self) -> bool:
        """Whether its programs read conntrack's accounting (it must be on)."""
        needs = self.compiled.needs if self.compiled else facts_needed(self.table)
        return bool(needs & facts.COUNT_CONNTRACK)

    def counters(self) -> list[tuple[int, int]]:
        """(packets, bytes) per table entry: summed over CPUs, plus added offsets."""
        return list(COUNTER.iter_unpack(self.packed_counters()))

    def packed_counters(self) -> bytes:
        """counters() as an array of struct xt_counters, summed as the kernel sums
        them (u64, wrapping)."""
        count = self.table.num_entries
        cpus = bpf.possible_cpus()
        _, added = bpf.map_lookup_batch(self.offsets_fd, 4, COUNTER.size, count)
        _, per_cpu = bpf.map_lookup_batch(self.counters_fd, 4,
                                          bpf.percpu_value_size(COUNTER.size), count)
        return _sum_u64([added, *(_cpu_values(per_cpu, cpu, cpus) for cpu in range(cpus))])

    def add_counters(self, added: list[tuple[int, int]]) -> None:
        """IPT_SO_SET_ADD_COUNTERS: (packets, bytes) per entry, added as the kernel
        adds them (u64, wrapping)."""
        count = self.table.num_entries
        keys, current = bpf.map_lookup_batch(self.offsets_fd, 4, COUNTER.size, count)
        summed = _sum_u64([current, b"".join(itertools.starmap(COUNTER.pack, added))])
        bpf.map_update_batch(self.offsets_fd, keys, summed, count)

    def took_over(self, previous: "Ruleset") -> None:
        """Once its programs replaced those of `previous` at every hook, and
        previous's programs have finished (bpf.wait_for_programs): keys of runs it
        does not use go from the maps they shared."""
        if self.classifier is not None and self.classifier is previous.classifier:
            self.classifier.keep_only(self.compiled.runs)

    def fds(self) -> list[int]:
        return [self.counters_fd, self.offsets_fd] + [h.prog_fd for h in self.hooks.values()]

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)
        self.hooks.clear()
        try:
            if self.kernel_matches is not None:
                held, self.kernel_matches = self.kernel_matches, None
                held.release()
        finally:
            if self.classifier is not None:
                self.classifier.release()
                self.classifier = None


class ClassifierMaps:
    """The classifier's maps of a table (codegen.CLASSIFIER, codegen.CLASSIFIER_RECORDS),
    shared by its successive rulesets while the tuple space stays the same and its
    runs fit: a ruleset writes the runs it classified anew, and once it took over
    (Ruleset.took_over) the keys of the runs it dropped go. Keys of a ruleset that
    failed to load stay until then, under tuple ids no program looks up."""

    def __init__(self, name: str, space: TupleSpace, runs: list[Classified]):
        live_keys = sum(len(run.keys) for run in runs)
        # room for the keys of the ruleset in place beside the next one's, and for
        # runs that appends add
        self.key_capacity = 2 * live_keys + 1024
        self.record_capacity = space.next_record + space.next_record // 4 + 1024
        self.space = space
        self.written: dict[int, Classified] = {}   # serial -> run whose keys are in
        self.key_count = 0
        self.users = 0
        with ExitStack() as undo:
            # elements allocated as written: the room costs nothing until used
            self.keys_fd = _owned(undo, bpf.map_create(
                bpf.BPF_MAP_TYPE_HASH, KEYS[space.family].size, VALUE_SIZE, self.key_capacity,
                f"{name}_cls",
                flags=bpf.BPF_F_NO_PREALLOC))
            self.records_fd = _owned(undo, bpf.map_create(
                bpf.BPF_MAP_TYPE_ARRAY, 4, RECORD_SIZE, self.record_capacity, f"{name}_rec"))
            undo.pop_all()

    def room_for(self, space: TupleSpace, runs: list[Classified]) -> bool:
        new_keys = sum(len(run.keys) for run in runs if run.serial not in self.written)
        return (space is self.space and self.key_count + new_keys <= self.key_capacity
                and space.next_record <= self.record_capacity)

    def write(self, runs: list[Classified]) -> None:
        """The keys and records of the runs not in the maps yet."""
        new = [run for run in runs if run.serial not in self.written]
        keys = [key for run in new for key in run.keys]
        values = [value for run in new for value in run.keys.values()]
        if keys:
            bpf.map_update_batch(self.keys_fd, b"".join(keys),
                                 b"".join(itertools.starmap(_CLASSIFIER_VALUE.pack, values)),
                                 len(keys))
        for run in new:
            if run.records:
                slots = range(run.record_base, run.record_base + run.record_count)
                bpf.map_update_batch(self.records_fd, array.array("I", slots).tobytes(),
                                     bytes(run.records), run.record_count)
            self.written[run.serial] = run
            self.key_count += len(run.keys)

    def keep_only(self, runs: list[Classified]) -> None:
        """Delete the keys of every run but `runs`; their records are left, unread."""
        keep = {run.serial for run in runs}
        gone = [run for serial, run in self.written.items() if serial not in keep]
        keys = [key for run in gone for key in run.keys]
        if keys:
            bpf.map_delete_batch(self.keys_fd, b"".join(keys), len(keys))
        for run in gone:
            del self.written[run.serial]
            self.key_count -= len(run.keys)

    def maps(self) -> dict[MapRef, int]:
        return {CLASSIFIER: self.keys_fd, CLASSIFIER_RECORDS: self.records_fd}

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            os.close(self.keys_fd)
            os.close(self.records_fd)


@dataclass
class HookSlot:
    hook: Hook
    prog_array_fd: int
    dispatcher_fd: int
    link_fd: Optional[int] = None

    def fill(self, rules: HookRules) -> None:
        bpf.map_update(self.prog_array_fd, _KEY0, struct.pack("<I", rules.prog_fd))

    def fds(self) -> list[int]:
        return [fd for fd in (self.prog_array_fd, self.dispatcher_fd, self.link_fd)
                if fd is not None]

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)


def _cpu_values(per_cpu: bytes, cpu: int, cpus: int) -> bytes:
    """One CPU's counters out of a per-CPU batch (each entry's CPUs in a row)."""
    if cpus == 1:
        return per_cpu
    out = bytearray(len(per_cpu) // cpus)
    for byte in range(COUNTER.size):
        out[byte::COUNTER.size] = per_cpu[cpu * COUNTER.size + byte::cpus * COUNTER.size]
    return out


def _sum_u64(arrays: list[bytes]) -> bytes:
    """The element-wise sum of equally long arrays of little-endian u64, wrapping as
    u64 arithmetic does. A loop over 100k counters a CPU would cost a tenth of a
    second; Python adds big integers at C speed: each array is spread to 128-bit
    lanes (a lane's sum stays below 2^128, so no carry reaches the next one), read as
    one integer, and the total's lanes are cut back to their low 64 bits."""
    count = len(arrays[0]) // 8
    total = 0
    for words in arrays:
        wide = bytearray(16 * count)
        for byte in range(8):
            wide[byte::16] = words[byte::8]
        total += int.from_bytes(wide, "little")
    wide = total.to_bytes(16 * count, "little")
    out = bytearray(8 * count)
    for byte in range(8):
        out[byte::8] = wide[byte::16]
    return bytes(out)


_TRACE_INFO_SUFFIX = "_trace"   # the TRACE_INFO map's kernel name, after its table's


def _owned(undo: ExitStack, fd: int) -> int:
    undo.callback(os.close, fd)
    return fd


def load_ruleset(table: Table, environment: Optional[dict[MapRef, int]] = None,
                 previous: Optional[Ruleset] = None, netns_path: Optional[str] = None,
                 traced: bool = False) -> Ruleset:
    """Compile and load `table` (nothing attached) for the namespace at `netns_path` (the
    calling thread's if None), where its kernel matches are set up. `environment`: the
    maps the loader's caller provides to extensions (the service's log ring, for LOG
    rules; see ext.environment_maps). `previous`, the ruleset it is to replace, lends
    its classified runs and their maps (see ClassifierMaps). `traced`: its programs
    trace (compiler/trace.py). On failure nothing stays loaded."""
    return _load(table, environment, previous, netns_path, traced, None)


def load_twin(ruleset: Ruleset, traced: bool, environment: Optional[dict[MapRef, int]] = None,
              netns_path: Optional[str] = None) -> Ruleset:
    """`ruleset`'s table loaded again, its programs tracing or not (compiler/trace.py),
    as one table with it: the twin counts in its counters, keeps state in its
    extensions' maps (limit's buckets, statistic's counters) and runs its kernel match
    instances; only programs and read-only maps are new. Its generation must name
    the same instances (Store.discard gives back only those no other names)."""
    return _load(ruleset.table, environment, ruleset, netns_path, traced,
                 _state_maps(ruleset))


def _state_maps(ruleset: Ruleset) -> dict[str, int]:
    """The maps `ruleset`'s programs use, by their kernel names (a table's are distinct):
    new fds, the caller's to close."""
    maps: dict[str, int] = {}
    try:
        for rules in ruleset.hooks.values():
            for map_id in bpf.prog_info(rules.prog_fd)["map_ids"]:
                fd = bpf.map_get_fd_by_id(map_id)
                name = bpf.map_info(fd)["name"]
                if name in maps:
                    os.close(fd)
                else:
                    maps[name] = fd
    except BaseException:
        for fd in maps.values():
            os.close(fd)
        raise
    return maps


def _load(table: Table, environment: Optional[dict[MapRef, int]], previous: Optional[Ruleset],
          netns_path: Optional[str], traced: bool,
          kept: Optional[dict[str, int]]) -> Ruleset:
    """load_ruleset(), or with `kept` (previous's maps by name, owned here) its twin."""
    btf = Btf.vmlinux()
    size = max(table.num_entries, 1)
    with ExitStack() as undo, ExitStack() as transient:
        for fd in (kept or {}).values():
            transient.callback(os.close, fd)
        compiled = compile_table(table, facts.KernelOffsets.from_btf(btf),
                                 previous.compiled if previous else None, traced)
        if kept is not None:
            counters_fd = _owned(undo, os.dup(previous.counters_fd))
            offsets_fd = _owned(undo, os.dup(previous.offsets_fd))
        else:
            counters_fd = _owned(undo, bpf.map_create(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4,
                                                      COUNTER.size, size, f"{table.name}_ctrs"))
            offsets_fd = _owned(undo, bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, COUNTER.size,
                                                     size, f"{table.name}_added"))
        ruleset = Ruleset(table, counters_fd, offsets_fd, compiled=compiled)
        maps = {COUNTERS: counters_fd, **(environment or {})}
        if compiled.runs:
            shared = previous and previous.classifier
            classifier = shared if shared and shared.room_for(compiled.space, compiled.runs) \
                else ClassifierMaps(table.name, compiled.space, compiled.runs)
            classifier.users += 1
            ruleset.classifier = classifier
            undo.callback(classifier.release)
            classifier.write(compiled.runs)
            maps.update(classifier.maps())
        planned = compiled.templates
        if planned is not None and planned.count:
            # the chain templates' records (compiler/templates.py), read-only to programs
            fd = _owned(transient, bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, planned.record_size,
                                                  planned.count, f"{table.name}_tmpl"))
            bpf.map_update_batch(fd, array.array("I", range(planned.count)).tobytes(),
                                 planned.records, planned.count)
            maps[INSTANCES] = fd
        if compiled.trace_info is not None:
            fd = _owned(transient, bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4,
                                                  len(compiled.trace_info), 1,
                                                  f"{table.name}{_TRACE_INFO_SUFFIX}"))
            bpf.map_update(fd, bytes(4), compiled.trace_info)
            maps[TRACE_INFO] = fd
        for ref, fd in ext.table_maps(table).items():
            maps[ref] = _owned(transient, fd)
            if kept is not None:   # the twin keeps the state its table kept
                maps[ref] = kept.get(bpf.map_info(fd)["name"], fd)
        if kept is not None:
            instances = kept.get(f"{table.name}{xtmatch.INSTANCES_SUFFIX}")
            held = instances and xtmatch.HeldInstances(os.dup(instances), 0, [], pinned=True)
        else:
            held = xtmatch.held_instances(table, netns_path)
        if held is not None:
            ruleset.kernel_matches = held
            undo.callback(held.release)
            maps[xtmatch.INSTANCES] = held.fd
        kfuncs = _Kfuncs(btf, transient)
        for program in compiled.programs:
            asm = program.asm
            code = program.assemble(map_fd=lambda ref: _map_fd(maps, ref), kfunc_id=kfuncs)
            prog_fd = _owned(undo, bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, code, program.name,
                                                 expected_attach_type=bpf.BPF_NETFILTER,
                                                 fd_array=kfuncs.fd_array(),
                                                 functions=asm.functions if asm.has_callbacks
                                                 else None))
            ruleset.hooks[program.hook] = HookRules(program.hook, program, prog_fd,
                                                    len(code) // 8)
        undo.pop_all()
        return ruleset


class _Kfuncs:
    """(BTF id, fd_array index) of each kfunc the programs call, and their fd_array:
    a module's kfunc is named by its id in the module's BTF and by the index of an
    fd of that BTF in the program's fd_array (0 stands for vmlinux's)."""

    def __init__(self, vmlinux: Btf, fds: ExitStack):
        self.vmlinux, self.fds = vmlinux, fds
        self.modules: dict[str, tuple[Btf, int]] = {}   # name -> (its BTF, its index)
        self.array: list[int] = [-1]                    # index 0 is never read

    def __call__(self, kfunc: Kfunc) -> tuple[int, int]:
        if kfunc.module is None:
            return self.vmlinux.kfunc_id(kfunc.name), 0
        if kfunc.module not in self.modules:
            self.array.append(_owned(self.fds, bpf.kernel_btf_fd(kfunc.module)))
            self.modules[kfunc.module] = Btf.module(kfunc.module), len(self.array) - 1
        btf, index = self.modules[kfunc.module]
        return btf.kfunc_id(kfunc.name), index

    def fd_array(self) -> Optional[list[int]]:
        return self.array if self.modules else None


def _map_fd(maps: dict[MapRef, int], ref: MapRef) -> int:
    if ref not in maps:
        raise BpfilterError(errno.EOPNOTSUPP, f"{ref.purpose or f'map {ref.name} is needed'}; "
                                              "none is available here")
    return maps[ref]


def attach_slots(ruleset: Ruleset, netns_path: Optional[str] = None) -> dict[Hook, HookSlot]:
    """A slot per hook of `ruleset`, filled with it and linked in `netns_path` (or the
    calling thread's netns). On failure nothing stays attached."""
    table = ruleset.table
    slots: dict[Hook, HookSlot] = {}
    with ExitStack() as undo:
        for hook, rules in ruleset.hooks.items():
            array_fd = _owned(undo, bpf.map_create(bpf.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1,
                                                   f"{table.name}_{hook.chain_name}"))
            code = dispatcher().assemble(map_fd={PROG_ARRAY: array_fd}.__getitem__)
            disp_fd = _owned(undo, bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, code,
                                                 f"bpfilter_{hook.short_name}",
                                                 expected_attach_type=bpf.BPF_NETFILTER))
            slots[hook] = HookSlot(hook, array_fd, disp_fd)
            slots[hook].fill(rules)
        kind = TABLES[table.name]
        if kind.nat_lookups:
            cookie = netns.cookie(netns_path)
            for slot in slots.values():
                kmodule.nat_attach(netns_path, table.family, slot.hook,
                                   kind.priority(slot.hook), slot.dispatcher_fd)
                undo.callback(kmodule.nat_detach, cookie, table.family, slot.hook)
        else:
            with netns.entered(netns_path) if netns_path else nullcontext():
                for slot in slots.values():
                    slot.link_fd = _owned(undo, bpf.link_create_netfilter(
                        slot.dispatcher_fd, table.family, slot.hook, kind.priority(slot.hook)))
        undo.pop_all()
    return slots


@dataclass
class LoadedTable:
    """A ruleset with its own slots: the simple, non-replaceable case (tests, demo)."""

    ruleset: Ruleset
    slots: dict[Hook, HookSlot] = field(default_factory=dict)
    conntrack: bool = False          # it keeps conntrack on in conntrack_netns
    conntrack_netns: Optional[str] = None

    @property
    def table(self) -> Table:
        return self.ruleset.table

    @property
    def hooks(self) -> dict[Hook, HookRules]:
        return self.ruleset.hooks

    def counters(self) -> list[tuple[int, int]]:
        return self.ruleset.counters()

    def test_run(self, hook: Hook, packet: bytes) -> int:
        """The verdict (0 drop, 1 accept) of the hook's ruleset program for an IP packet."""
        return bpf.nf_test_run(self.ruleset.hooks[hook].prog_fd, hook, packet)[0]

    def fds(self) -> list[int]:
        return self.ruleset.fds() + [fd for s in self.slots.values() for fd in s.fds()]

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()
        self.slots.clear()
        self.ruleset.close()
        if self.conntrack:
            self.conntrack = False
            ctnetns.release(self.conntrack_netns, self.table.family)


def load_filter_table(replace_blob: bytes, netns_name: Optional[str] = None,
                      attach: bool = True, environment: Optional[dict[MapRef, int]] = None,
                      *, family: Family = Family.IPV4) -> LoadedTable:
    """The whole path for a SET_REPLACE payload of `family`: validate, model, compile,
    load, and unless told otherwise attach in `netns_name`. `environment`: see
    load_ruleset."""
    where = netns_name and netns.path_of(netns_name)
    ruleset = load_ruleset(table_from_blob(replace_blob, family)[1], environment,
                           netns_path=where or None)
    conntrack = attach and ruleset.uses_conntrack
    held = False   # a hold that failed has nothing to give back
    try:
        if conntrack:
            ctnetns.hold(where, family)
            held = True
            if ruleset.counts_conntrack:
                ctnetns.force_accounting(where)
        return LoadedTable(ruleset, attach_slots(ruleset, netns_name) if attach else {},
                           conntrack=conntrack, conntrack_netns=where)
    except BaseException:
        if held:
            ctnetns.release(where, family)
        ruleset.close()
        raise
