"""The lists of -m recent rules run without bpfilter.ko (ext/recent.py), which the
service keeps as the kernel keeps xt_recent's: a list is made, with its first rule's
mask, when a table first names it (recent_mt_check(), before the table's rules run),
is shared by name by every table of its namespace, both families' included, and goes
with its entries when no table of the namespace names it any more (recent_mt_destroy()
of its last rule). The maps are pinned beside the tables, so that a restarted service's
programs go on with them.
"""
from __future__ import annotations

import os

from .bpf import syscall as bpf
from .bpf.btfgen import BtfBuilder
from .ext.recent import (ENTRY_KEY, ENTRY_VALUE, LIST_KEY, LIST_VALUE, RECENT_BLANK,
                         RECENT_ENTRIES, RECENT_LISTS, list_id, served_lists)
from .model import Table

MAX_LISTS = 4096
MAX_ENTRIES = 1 << 16
_PINS = {"recent_lists": RECENT_LISTS, "recent_entries": RECENT_ENTRIES,
         "recent_blank": RECENT_BLANK}


def locked_btf(name: str, key_size: int, value_size: int) -> tuple[bytes, int, int]:
    """BTF for a key of `key_size` bytes and a value with a bpf_spin_lock first."""
    b = BtfBuilder()
    u8 = b.integer("unsigned char", 1, False)
    int32 = b.integer("int", 4, True)
    lock = b.struct("bpf_spin_lock", 4, [("val", int32, 0)])
    key = b.struct(f"{name}_key", key_size, [(f"b{i}", u8, 8 * i) for i in range(key_size)])
    value = b.struct(name, value_size, [("lock", lock, 0),
                                        *((f"b{i}", u8, 8 * i) for i in range(4, value_size))])
    return b.blob(), key, value


class RecentLists:
    def __init__(self, fds: dict[str, int]):
        self.fds = fds

    @classmethod
    def pinned(cls, root: str, log=None) -> "RecentLists":
        return cls(bpf.pinned_maps(root, _PINS, _create_closing_btf))

    @classmethod
    def create(cls) -> "RecentLists":
        return cls({name: _create_closing_btf(name) for name in _PINS})

    def maps(self) -> dict:
        return {ref: self.fds[name] for name, ref in _PINS.items()}

    def names(self, table: Table) -> bool:
        return bool(served_lists(table))

    def prepare(self, inum: int, table: Table) -> None:
        """The lists a table about to be loaded names, made (with the mask of the
        first rule to name each) unless they exist."""
        for name, mask in served_lists(table):
            key = LIST_KEY.pack(inum, 0, list_id(name))
            if bpf.map_lookup(self.fds["recent_lists"], key, LIST_VALUE.size) is None:
                bpf.map_update(self.fds["recent_lists"], key, LIST_VALUE.pack(0, 0, 0, mask),
                               bpf.BPF_NOEXIST)

    def retain(self, tables: dict[int, list[Table]]) -> None:
        """Every list, and its entries, that no table names any more: `tables` gives,
        for each namespace with tables, its tables."""
        ids = {inum: {list_id(name) for table in named for name, _ in served_lists(table)}
               for inum, named in tables.items()}
        lists, entries = self.fds["recent_lists"], self.fds["recent_entries"]
        gone = set()
        key = None
        while (key := bpf.map_next_key(lists, key, LIST_KEY.size)) is not None:
            inum, _, ident = LIST_KEY.unpack(key)
            if ident not in ids.get(inum, ()):
                gone.add((inum, ident))
        if not gone:
            return
        stale, key = [], None
        while (key := bpf.map_next_key(entries, key, ENTRY_KEY.size)) is not None:
            inum, _, ident, _ = ENTRY_KEY.unpack(key)
            if (inum, ident) in gone:
                stale.append(key)
        for key in stale:
            bpf.map_delete(entries, key)
        for inum, ident in gone:
            bpf.map_delete(lists, LIST_KEY.pack(inum, 0, ident))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _create_closing_btf(name: str) -> int:
    """The map `name`, with BTF for its value's bpf_spin_lock (closed once the map
    holds it); the blank entry needs none: it is only copied from."""
    short = {"recent_lists": "bpf_rlists", "recent_entries": "bpf_rentries",
             "recent_blank": "bpf_rblank"}[name]
    if name == "recent_blank":
        return bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, ENTRY_VALUE.size, 1, short)
    key_size, value_size, entries = ((LIST_KEY.size, LIST_VALUE.size, MAX_LISTS)
                                     if name == "recent_lists"
                                     else (ENTRY_KEY.size, ENTRY_VALUE.size, MAX_ENTRIES))
    blob, key_type, value_type = locked_btf(name, key_size, value_size)
    btf_fd = bpf.btf_load(blob)
    try:
        return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, key_size, value_size, entries, short,
                              flags=bpf.BPF_F_NO_PREALLOC, btf=(btf_fd, key_type, value_type))
    finally:
        os.close(btf_fd)
