"""`bpfilter show`: every pinned table with its live counters, read straight from the
bpffs, so it works whether or not the service runs (and shows what really filters,
not what a service believes)."""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from . import netns
from .bpf import syscall
from .bpf.disasm import Kallsyms, disassemble
from .errors import BpfilterError
from .listing import render
from .loader import HookSlot, Ruleset
from .model import Family, Hook
from .store import Store, TableKey
from .tables import TABLES

_MAP_TYPES = {value: name[len("BPF_MAP_TYPE_"):].lower()
              for name, value in vars(syscall).items() if name.startswith("BPF_MAP_TYPE_")}


def _netns_names() -> dict[int, list[str]]:
    """`ip netns` names by the inode of the namespace they are bound to."""
    names: dict[int, list[str]] = {}
    if not os.path.isdir(netns.NETNS_RUN_DIR):
        return names
    # A name whose bind mount is gone is a plain file, its inode number meaningless.
    nsfs = os.stat(f"/proc/{os.getpid()}/ns/net").st_dev
    for name in sorted(os.listdir(netns.NETNS_RUN_DIR)):
        try:
            st = os.stat(os.path.join(netns.NETNS_RUN_DIR, name))
        except OSError:
            continue
        if st.st_dev == nsfs:
            names.setdefault(st.st_ino, []).append(name)
    return names


def _heading(key: TableKey, names: dict[int, list[str]]) -> str:
    known = ", ".join(names.get(key.inum, [])) or "no ip netns name"
    return (f"# netns {key.inum} ({known}), cookie {key.cookie}: "
            f"{key.family.name.lower()} table {key.table}")


def _prog_line(role: str, fd: int) -> str:
    info = syscall.prog_info(fd)
    return (f"  {role:<10} prog {info['id']} {info['name']}: "
            f"{info['xlated_prog_len'] // 8} insns, {info['jited_prog_len']} bytes jited")


def _map_line(map_id: int) -> str:
    fd = syscall.map_get_fd_by_id(map_id)
    try:
        info = syscall.map_info(fd)
    finally:
        os.close(fd)
    kind = _MAP_TYPES.get(info["type"], str(info["type"]))
    return (f"  map {info['id']} {kind}: {info['max_entries']} entries of "
            f"{info['value_size']} bytes, {info['name']}")


def _show_hook(hook: Hook, ruleset: Ruleset, slot: HookSlot, kallsyms: Kallsyms) -> None:
    prog_fd = ruleset.hooks[hook].prog_fd
    map_ids = []
    if slot.link_fd is None:   # the nat table's: a lookup bpfilter.ko registered
        kind = TABLES[ruleset.table.name]
        print(f"{hook.chain_name}: the NAT core's lookup at "
              f"{ruleset.table.family.name.lower()} {hook.name}, priority {kind.priority(hook)}")
    else:
        link = syscall.link_info(slot.link_fd)
        print(f"{hook.chain_name}: link {link['id']} at {Family(link['pf']).name.lower()} "
              f"{Hook(link['hooknum']).name}, priority {link['priority']}")
        dispatcher_fd = syscall.prog_get_fd_by_id(link["prog_id"])
        try:
            print(_prog_line("dispatcher", dispatcher_fd))
            map_ids = syscall.prog_info(dispatcher_fd)["map_ids"]
        finally:
            os.close(dispatcher_fd)
    print(_prog_line("ruleset", prog_fd))
    for map_id in sorted(set(map_ids + syscall.prog_info(prog_fd)["map_ids"])):
        print(_map_line(map_id))
    for line in disassemble(syscall.prog_xlated_insns(prog_fd), kallsyms):
        print(f"  {line}")
    print()


def _show_table(store: Store, key: TableKey, kallsyms) -> None:
    _, _, ruleset, slots = store.load(key)
    with ExitStack() as close:
        close.callback(ruleset.close)
        for slot in slots.values():
            close.callback(slot.close)
        print(render(ruleset.table, ruleset.counters()))
        if kallsyms is not None:
            for hook, slot in slots.items():
                _show_hook(hook, ruleset, slot, kallsyms)


def show(root: str, bpf: bool = False) -> int:
    """Print the tables pinned under `root`; with `bpf`, the kernel objects behind
    each hook and its ruleset program's disassembly. 1 if a table could not be read."""
    store = Store(root)
    keys = list(store.keys())
    if not keys:
        print(f"no tables pinned in {root}")
        return 0
    names = _netns_names()
    kallsyms = Kallsyms.read() if bpf else None
    status = 0
    for key in keys:
        # flushed so that a table's error on stderr follows its heading
        print(_heading(key, names), flush=True)
        try:
            _show_table(store, key, kallsyms)
        except (OSError, BpfilterError) as err:
            print(f"bpfilter: cannot read {store.path(key)}: {err}", file=sys.stderr)
            status = 1
    return status
