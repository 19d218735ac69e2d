"""What must survive the service: pinned in a bpffs, so that a killed or restarted
service leaves every table filtering and a new one finds them again.

    <root>/<netns inum>-<netns cookie>/<family>-<table>/
        link_<HOOK>     the netfilter link (keeps the dispatcher and the hook alive)
        slot_<HOOK>     the prog array the dispatcher tail-calls through
        counters        per-CPU counters of the current ruleset
        added           counter offsets from IPT_SO_SET_ADD_COUNTERS
        blob            the ipt_replace blob iptables set (an array map of chunks)

The ruleset programs need no pin: their slots hold them. The inum finds namespaces
that died (see netnswatch); the cookie tells a reused inum apart.
Files are replaced by pinning under a temporary name and renaming over the old one,
so a crash leaves either the old or the new object, never none.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Iterator

from .bpf import syscall as bpf
from .abi.xtables import RawTable
from .decode import table_from_blob
from .loader import HookRules, HookSlot, Ruleset
from .paths import DEFAULT_ROOT
from .model import Family, Hook

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


class Store:
    def __init__(self, root: str = DEFAULT_ROOT):
        self.root = root

    def path(self, key: TableKey, name: str = "") -> str:
        return os.path.join(self.root, key.netns_dir, key.table_dir, name)

    def save_ruleset(self, key: TableKey, ruleset: Ruleset, blob: bytes) -> None:
        blob_fd = write_blob(blob)
        try:
            _pin(blob_fd, self.path(key, "blob"))
        finally:
            os.close(blob_fd)
        _pin(ruleset.counters_fd, self.path(key, "counters"))
        _pin(ruleset.offsets_fd, self.path(key, "added"))

    def save_slots(self, key: TableKey, slots: dict[Hook, HookSlot]) -> None:
        os.makedirs(self.path(key), mode=0o700, exist_ok=True)
        for hook, slot in slots.items():
            _pin(slot.prog_array_fd, self.path(key, f"slot_{hook.chain_name}"))
            _pin(slot.link_fd, self.path(key, f"link_{hook.chain_name}"))

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

    def load(self, key: TableKey) -> tuple[bytes, RawTable, Ruleset, dict[Hook, HookSlot]]:
        """Reopen a pinned table, its model rebuilt from its blob."""
        blob_fd = bpf.obj_get(self.path(key, "blob"))
        try:
            blob = read_blob(blob_fd)
        finally:
            os.close(blob_fd)
        raw, table = table_from_blob(blob, key.family)
        ruleset = Ruleset(table, bpf.obj_get(self.path(key, "counters")),
                          bpf.obj_get(self.path(key, "added")))
        slots = {}
        for chain in table.hook_chains():
            hook = chain.hook
            array_fd = bpf.obj_get(self.path(key, f"slot_{hook.chain_name}"))
            link_fd = bpf.obj_get(self.path(key, f"link_{hook.chain_name}"))
            prog_id = struct.unpack("<I", bpf.map_lookup(array_fd, _KEY0, 4))[0]
            prog_fd = bpf.prog_get_fd_by_id(prog_id)
            info = bpf.prog_info(prog_fd)
            ruleset.hooks[hook] = HookRules(hook, None, prog_fd, info["xlated_prog_len"] // 8)
            slots[hook] = HookSlot(hook, array_fd, dispatcher_fd=None, link_fd=link_fd)
        return blob, raw, ruleset, slots

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
        shutil.rmtree(path)
        netns_dir = os.path.dirname(path.rstrip("/"))
        if not os.listdir(netns_dir):
            os.rmdir(netns_dir)
