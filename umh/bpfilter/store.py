"""What must survive the service: pinned in a bpffs, so that a killed or restarted
service leaves every table filtering and a new one finds them again.

    <root>/<netns inum>-<netns cookie>/<family>-<table>/
        link_<HOOK>     the netfilter link (keeps the dispatcher and the hook alive)
        slot_<HOOK>     the prog array the dispatcher tail-calls through
        current         a symlink naming the committed generation
        gen_<n>/        a generation: one ruleset, whole
            prog_<HOOK> its program for the hook
            counters    its per-CPU counters
            added       counter offsets from IPT_SO_SET_ADD_COUNTERS
            blob        the ipt_replace blob iptables set (an array map of chunks)
            xt_instances  the instances of its kernel matches (ext/xtmatch.py), which
                        bpfilter.ko keeps for it and is told to destroy as it goes

A replace stages its ruleset as a new generation, then commits it by renaming a
symlink to it over `current`: that one rename is the commit point. Only then are
the hooks' slots swapped to its programs, and the previous generation dropped. A
service that dies anywhere leaves `current` naming either the previous generation
or the new one, complete either way; the next service (Service._recover) makes the
slots run what it names and drops every other generation. The inum finds
namespaces that died (see netnswatch); the cookie tells a reused inum apart.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Iterator, Optional

from . import kmodule
from .bpf import syscall as bpf
from .abi.xtables import RawTable
from .decode import table_from_blob
from .ext import xtmatch
from .loader import HookRules, HookSlot, Ruleset
from .paths import DEFAULT_ROOT
from .model import Family, Hook
from .tables import TABLES

BPF_FS_MAGIC = "bpf"
_CHUNK = 1 << 16
_LEN = struct.Struct("<Q")
_KEY0 = struct.pack("<I", 0)


def ensure_bpffs(root: str) -> None:
    """Mount a private bpffs at `root` unless one is there already (mounting twice
    would stack an empty instance over the pins)."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    real = os.path.realpath(root)
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fields[4] == real and fstype == BPF_FS_MAGIC:
                return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpffs", os.fsencode(real), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting a bpffs on {real}: {os.strerror(err)}")


def _pin(fd: int, path: str) -> None:
    # bpffs refuses names with dots: they are reserved for its own entries
    tmp = os.path.join(os.path.dirname(path), "new_" + os.path.basename(path))
    if os.path.exists(tmp):
        os.unlink(tmp)
    bpf.obj_pin(fd, tmp)
    os.rename(tmp, path)


def write_blob(blob: bytes) -> int:
    """An array map holding `blob` (length first), chunked to stay under the kernel's
    value size limits."""
    data = _LEN.pack(len(blob)) + blob
    count = -(-len(data) // _CHUNK)
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, _CHUNK, count, "bpfilter_blob")
    try:
        for i in range(count):
            chunk = data[i * _CHUNK:(i + 1) * _CHUNK]
            bpf.map_update(fd, struct.pack("<I", i), chunk.ljust(_CHUNK, b"\0"))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_blob(fd: int) -> bytes:
    first = bpf.map_lookup(fd, _KEY0, _CHUNK)
    (length,) = _LEN.unpack_from(first)
    data = bytearray(first)
    i = 1
    while len(data) < length + _LEN.size:
        data += bpf.map_lookup(fd, struct.pack("<I", i), _CHUNK)
        i += 1
    return bytes(data[_LEN.size:_LEN.size + length])


@dataclass(frozen=True)
class TableKey:
    inum: int
    cookie: int
    family: Family
    table: str

    @property
    def netns_dir(self) -> str:
        return f"{self.inum}-{self.cookie}"

    @property
    def table_dir(self) -> str:
        return f"{self.family.name.lower()}-{self.table}"


CURRENT = "current"         # the symlink naming the committed generation
_GENERATION = "gen_"
_RULESET_PINS = ("blob", "counters", "added")   # in a table's own directory before generations
_HOOK_OF = {hook.chain_name: hook for hook in Hook}


@dataclass
class Generation:
    """A generation's pins, opened and not decoded: enough to make the hooks run it."""

    name: str
    blob: bytes
    counters_fd: int
    offsets_fd: int
    rules: dict[Hook, HookRules]

    def ruleset(self, table) -> Ruleset:
        return Ruleset(table, self.counters_fd, self.offsets_fd, dict(self.rules))

    def close(self) -> None:
        for fd in [self.counters_fd, self.offsets_fd, *(r.prog_fd for r in self.rules.values())]:
            os.close(fd)


def _opened(undo: ExitStack, path: str) -> int:
    fd = bpf.obj_get(path)
    undo.callback(os.close, fd)
    return fd


def _slot_program(array_fd: int) -> int:
    """An fd of the program a hook's slot holds."""
    return bpf.prog_get_fd_by_id(struct.unpack("<I", bpf.map_lookup(array_fd, _KEY0, 4))[0])


def _rules(hook: Hook, prog_fd: int) -> HookRules:
    return HookRules(hook, None, prog_fd, bpf.prog_info(prog_fd)["xlated_prog_len"] // 8)


class Store:
    def __init__(self, root: str = DEFAULT_ROOT):
        self.root = root

    def path(self, key: TableKey, name: str = "") -> str:
        return os.path.join(self.root, key.netns_dir, key.table_dir, name)

    # -- a replace: stage, commit, and drop what it replaced

    def stage(self, key: TableKey, ruleset: Ruleset, blob: bytes) -> str:
        """Pin `ruleset` and its blob as a new generation of the table, uncommitted:
        until commit() the table is what it was. On failure nothing is left."""
        gen = _GENERATION + str(1 + max((int(g[len(_GENERATION):]) for g in self.generations(key)),
                                        default=0))
        path = self.path(key, gen)
        os.makedirs(path, mode=0o700)
        try:
            blob_fd = write_blob(blob)
            try:
                bpf.obj_pin(blob_fd, os.path.join(path, "blob"))
            finally:
                os.close(blob_fd)
            bpf.obj_pin(ruleset.counters_fd, os.path.join(path, "counters"))
            bpf.obj_pin(ruleset.offsets_fd, os.path.join(path, "added"))
            for hook, rules in ruleset.hooks.items():
                bpf.obj_pin(rules.prog_fd, os.path.join(path, f"prog_{hook.chain_name}"))
            if ruleset.kernel_matches is not None:
                bpf.obj_pin(ruleset.kernel_matches.fd, os.path.join(path, xtmatch.PIN))
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if ruleset.kernel_matches is not None:
            ruleset.kernel_matches.pinned = True   # the generation holds them from here on
        return gen

    def committed_blob(self, key: TableKey) -> bytes:
        """The replace blob of the table's committed generation."""
        fd = bpf.obj_get(self.path(key, os.path.join(self.committed(key), "blob")))
        try:
            return read_blob(fd)
        finally:
            os.close(fd)

    def commit(self, key: TableKey, gen: str) -> None:
        """The commit point: `gen` becomes the table's generation in one rename."""
        tmp = self.path(key, "new_" + CURRENT)
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(gen, tmp)
        os.rename(tmp, self.path(key, CURRENT))

    def committed(self, key: TableKey) -> Optional[str]:
        try:
            return os.readlink(self.path(key, CURRENT))
        except FileNotFoundError:
            return None

    def generations(self, key: TableKey) -> list[str]:
        try:
            names = os.listdir(self.path(key))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(_GENERATION))

    def discard(self, key: TableKey, gen: str) -> None:
        """The generation unpinned, and what the module holds for it given back (its
        kernel matches: ext/xtmatch.py), but for what the committed generation names
        too (a twin's, loader.load_twin)."""
        path = self.path(key, gen)
        try:
            held = os.path.join(path, xtmatch.PIN)
            if os.path.lexists(held) and kmodule.present():
                instances = set(self._pinned_instances(held))
                keep = self.committed(key)
                kept = keep and self.path(key, os.path.join(keep, xtmatch.PIN))
                if keep != gen and kept and os.path.lexists(kept):
                    instances -= set(self._pinned_instances(kept))
                kmodule.xt_match_destroy(key.cookie, sorted(instances))
        finally:
            shutil.rmtree(path)

    @staticmethod
    def _pinned_instances(path: str) -> list[int]:
        fd = bpf.obj_get(path)
        try:
            return xtmatch.pinned_instances(fd)
        finally:
            os.close(fd)

    def kernel_matches(self) -> dict[int, set[int]]:
        """netns cookie -> the kernel match instances its pinned generations name."""
        named: dict[int, set[int]] = {}
        for key in self.keys():
            for gen in self.generations(key):
                held = self.path(key, os.path.join(gen, xtmatch.PIN))
                if os.path.lexists(held):
                    named.setdefault(key.cookie, set()).update(self._pinned_instances(held))
        return named

    def discard_uncommitted(self, key: TableKey) -> None:
        """Every generation but the committed one (a replace that died before its
        commit, or after it with its predecessor still there), and what a commit or a
        migration that died left."""
        keep = self.committed(key)
        for gen in self.generations(key):
            if gen != keep:
                self.discard(key, gen)
        for name in ("new_" + CURRENT, *_RULESET_PINS):
            if os.path.lexists(self.path(key, name)):
                os.unlink(self.path(key, name))

    def save_ruleset(self, key: TableKey, ruleset: Ruleset, blob: bytes) -> None:
        """Stage and commit at once (a table pinned from scratch)."""
        self.commit(key, self.stage(key, ruleset, blob))

    def save_slots(self, key: TableKey, slots: dict[Hook, HookSlot]) -> None:
        os.makedirs(self.path(key), mode=0o700, exist_ok=True)
        for hook, slot in slots.items():
            _pin(slot.prog_array_fd, self.path(key, f"slot_{hook.chain_name}"))
            if slot.link_fd is not None:   # a nat table's lookups are the module's
                _pin(slot.link_fd, self.path(key, f"link_{hook.chain_name}"))

    # -- finding tables again

    def keys(self) -> Iterator[TableKey]:
        if not os.path.isdir(self.root):
            return
        for netns_dir in sorted(os.listdir(self.root)):
            inum, _, cookie = netns_dir.partition("-")
            if not (inum.isdigit() and cookie.isdigit()):
                continue   # a bpffs also shows the kernel's own entries (maps.debug, ...)
            for table_dir in sorted(os.listdir(os.path.join(self.root, netns_dir))):
                family, _, table = table_dir.partition("-")
                yield TableKey(int(inum), int(cookie), Family[family.upper()], table)

    def unversioned(self, key: TableKey) -> bool:
        """Pinned by a bpfilter from before generations: its ruleset's pins in the
        table's own directory, its programs held by its slots only."""
        return self.committed(key) is None and os.path.lexists(self.path(key, "blob"))

    def migrate(self, key: TableKey) -> None:
        """An unversioned table made generation 1 of itself: its pins copied into it,
        its programs pinned from its slots, committed, and only then the old pins
        unlinked (discard_uncommitted). A migration that dies is made again."""
        for gen in self.generations(key):
            self.discard(key, gen)
        path = self.path(key, _GENERATION + "1")
        os.mkdir(path, mode=0o700)
        with ExitStack() as fds:
            for name in _RULESET_PINS:
                bpf.obj_pin(_opened(fds, self.path(key, name)), os.path.join(path, name))
            for name in os.listdir(self.path(key)):
                if name.startswith("slot_"):
                    prog_fd = _slot_program(_opened(fds, self.path(key, name)))
                    fds.callback(os.close, prog_fd)
                    bpf.obj_pin(prog_fd, os.path.join(path, "prog_" + name[len("slot_"):]))
        self.commit(key, _GENERATION + "1")

    def open_committed(self, key: TableKey) -> Generation:
        gen = self.committed(key)
        if gen is None:
            raise OSError(errno.ENOENT, f"{self.path(key)} has no committed generation")
        path = self.path(key, gen)
        with ExitStack() as undo:
            blob_fd = _opened(undo, os.path.join(path, "blob"))
            blob = read_blob(blob_fd)
            counters_fd = _opened(undo, os.path.join(path, "counters"))
            offsets_fd = _opened(undo, os.path.join(path, "added"))
            rules = {}
            for name in sorted(os.listdir(path)):
                if name.startswith("prog_"):
                    hook = _HOOK_OF[name[len("prog_"):]]
                    rules[hook] = _rules(hook, _opened(undo, os.path.join(path, name)))
            undo.pop_all()
        os.close(blob_fd)
        return Generation(gen, blob, counters_fd, offsets_fd, rules)

    def open_slots(self, key: TableKey) -> dict[Hook, HookSlot]:
        slots = {}
        with ExitStack() as undo:
            for name in sorted(os.listdir(self.path(key))):
                if name.startswith("slot_"):
                    chain = name[len("slot_"):]
                    link = self.path(key, f"link_{chain}")
                    slots[_HOOK_OF[chain]] = HookSlot(
                        _HOOK_OF[chain], _opened(undo, self.path(key, name)), dispatcher_fd=None,
                        link_fd=None if TABLES[key.table].nat_lookups else _opened(undo, link))
            undo.pop_all()
        return slots

    def load(self, key: TableKey) -> tuple[bytes, RawTable, Ruleset, dict[Hook, HookSlot]]:
        """Reopen a pinned table as its committed generation says, its model rebuilt
        from its blob (nothing changed: `bpfilter show`)."""
        gen = self.open_committed(key)
        try:
            raw, table = table_from_blob(gen.blob, key.family)
            slots = self.open_slots(key)
        except BaseException:
            gen.close()
            raise
        return gen.blob, raw, gen.ruleset(table), slots

    def remove(self, key: TableKey) -> None:
        """Detach the table's links (pins alone would keep a dead netns hooked) and
        drop its pins."""
        path = self.path(key)
        for name in os.listdir(path):
            if name.startswith("link_"):
                fd = bpf.obj_get(os.path.join(path, name))
                try:
                    bpf.link_detach(fd)
                finally:
                    os.close(fd)
            elif name.startswith("slot_") and TABLES[key.table].nat_lookups \
                    and kmodule.present():
                kmodule.nat_detach(key.cookie, key.family, _HOOK_OF[name[len("slot_"):]])
        for gen in self.generations(key):
            self.discard(key, gen)
        shutil.rmtree(path)
        netns_dir = os.path.dirname(path.rstrip("/"))
        if not os.listdir(netns_dir):
            os.rmdir(netns_dir)
