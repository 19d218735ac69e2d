"""The htables of -m hashlimit rules run without bpfilter.ko (ext/hashlimit.py), which
the service keeps as xt_hashlimit keeps its own: one per name and family in a
namespace, made with the configuration of the first rule to name it when its table is
loaded (hashlimit_mt_check_common(), before the table's rules run), shared by every
table of the namespace, and gone with its entries once no table names it
(htable_put() of its last rule). Every --hashlimit-htable-gcinterval a collector
removes the entries past their expiry (htable_gc()), in a thread of its own.

An htable is a hash map of its own, whose max_entries is the htable's max (a new
address finding it full is a hotdrop, as dsthash_alloc_init()'s), held by one map of
maps (the programs find it by netns, family and name) and described by a map of
configurations (what binds a later table's rules to it, after a restart too). The
maps are pinned beside the tables, so that a restarted service's programs go on with
them.
"""
from __future__ import annotations

import os
import struct
from typing import Callable

from .bpf import syscall as bpf
from .duetimers import DueTimers
from .ext.hashlimit import (ENTRY_KEY, ENTRY_VALUE, E_EXPIRES, HASHLIMIT_BLANK, HASHLIMIT_TABLES,
                            TABLE_KEY, HtableConfig, bind, served_htables, table_id)
from .ext.limit import jiffies
from .model import Table
from .recentlists import locked_btf

MAX_TABLES = 4096
_PINS = ("hashlimit_tables", "hashlimit_blank", "hashlimit_configs")
_REFS = {"hashlimit_tables": HASHLIMIT_TABLES, "hashlimit_blank": HASHLIMIT_BLANK}
# hashlimit_configs: the htable's key, then its name's length and name (up to NAME_MAX)
CONFIG_VALUE = struct.Struct(f"<{HtableConfig.PACKED.size}sB255s")
_SHORT = {"hashlimit_tables": "bpf_hltables", "hashlimit_blank": "bpf_hlblank",
          "hashlimit_configs": "bpf_hlconfigs"}


class Hashlimits:
    def __init__(self, fds: dict[str, int], log: Callable[[str], None] = lambda line: None):
        self.fds = fds
        self.timers = DueTimers("hashlimit: collecting expired entries", log)

    @classmethod
    def pinned(cls, root: str, log=lambda line: None) -> "Hashlimits":
        made = cls(bpf.pinned_maps(root, _PINS, _create), log)
        made.timers.start(made.collect_due, "hashlimit-gc")
        return made

    @classmethod
    def create(cls) -> "Hashlimits":
        return cls({name: _create(name) for name in _PINS})

    def maps(self) -> dict:
        return {ref: self.fds[name] for name, ref in _REFS.items()}

    def configs(self, inum: int, family: int) -> dict[str, HtableConfig]:
        """The htables of a namespace's family, by name."""
        found = {}
        for key, value in self._configs():
            k_inum, k_family, _ = TABLE_KEY.unpack(key)
            if (k_inum, k_family) == (inum, family):
                packed, length, name = CONFIG_VALUE.unpack(value)
                found[name[:length].decode("latin-1")] = HtableConfig.unpack(packed)
        return found

    def prepare(self, inum: int, table: Table) -> None:
        """Binds `table`'s rules to their htables (ext/hashlimit.bind), making the ones
        it names first, as its load's checkentries would."""
        if not served_htables(table):
            return
        family = int(table.family)
        with self.timers.lock:
            existing = self.configs(inum, family)
            bind(table, existing)
            for name, cfg in served_htables(table):
                if name in existing:
                    continue
                existing[name] = cfg
                key = TABLE_KEY.pack(inum, family, table_id(name))
                entries = _create_entries("bpf_hlentries", cfg.max)
                try:
                    bpf.map_update(self.fds["hashlimit_tables"], key, struct.pack("<I", entries))
                finally:
                    os.close(entries)
                raw = name.encode("latin-1")
                bpf.map_update(self.fds["hashlimit_configs"], key,
                               CONFIG_VALUE.pack(cfg.pack(), len(raw), raw))
                self.timers.wake()

    def names(self, table: Table) -> bool:
        return bool(served_htables(table))

    def retain(self, tables: dict[int, list[Table]]) -> None:
        """Every htable, and its entries, that no table names any more: `tables`
        gives, for each namespace with tables, its tables."""
        ids = {inum: {(int(table.family), table_id(name)) for table in named
                      for name, _ in served_htables(table)}
               for inum, named in tables.items()}
        with self.timers.lock:
            for key, _ in self._configs():
                inum, family, ident = TABLE_KEY.unpack(key)
                if (family, ident) not in ids.get(inum, ()):
                    bpf.map_delete(self.fds["hashlimit_tables"], key)
                    bpf.map_delete(self.fds["hashlimit_configs"], key)
                    self.timers.next.pop(key, None)

    def _configs(self) -> list[tuple[bytes, bytes]]:
        return bpf.map_items(self.fds["hashlimit_configs"], TABLE_KEY.size, CONFIG_VALUE.size)

    # -- htable_gc() ---------------------------------------------------------------

    def collect_due(self, now: float) -> int:
        """htable_gc() of every htable whose interval ran out; how many entries went."""
        gone = 0
        with self.timers.lock:
            due = []
            for key, value in self._configs():
                cfg = HtableConfig.unpack(value)
                when = self.timers.next.setdefault(key, now + cfg.gc_interval / 1000)
                if when <= now:
                    due.append(key)
                    self.timers.next[key] = now + cfg.gc_interval / 1000
            if not due:
                return 0
            jiffies_now = jiffies()
            for key in due:
                gone += self._expire(key, jiffies_now)
        return gone

    def _expire(self, key: bytes, now: int) -> int:
        """The entries of one htable past their expiry (time_after_eq(jiffies,
        expires)), removed."""
        found = bpf.map_lookup(self.fds["hashlimit_tables"], key, 4)
        if found is None:
            return 0
        fd = bpf.map_get_fd_by_id(struct.unpack("<I", found)[0])
        gone = 0
        try:
            entry = None
            stale = []
            while (entry := bpf.map_next_key(fd, entry, ENTRY_KEY.size)) is not None:
                value = bpf.map_lookup(fd, entry, ENTRY_VALUE.size)
                if value is None:
                    continue
                expires = struct.unpack_from("<Q", value, E_EXPIRES)[0]
                if (now - expires) & (1 << 63) == 0:
                    stale.append(entry)
            for entry in stale:
                gone += bpf.map_delete(fd, entry)
        finally:
            os.close(fd)
        return gone

    def close(self) -> None:
        self.timers.stop()
        for fd in self.fds.values():
            os.close(fd)


def _create_entries(name: str, max_entries: int) -> int:
    """An htable's map: a bpf_spin_lock first in its values, so BTF for them."""
    blob, key_type, value_type = locked_btf("hashlimit_entry", ENTRY_KEY.size, ENTRY_VALUE.size)
    btf_fd = bpf.btf_load(blob)
    try:
        return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, ENTRY_KEY.size, ENTRY_VALUE.size,
                              max_entries, name, flags=bpf.BPF_F_NO_PREALLOC,
                              btf=(btf_fd, key_type, value_type))
    finally:
        os.close(btf_fd)


def _create(name: str) -> int:
    short = _SHORT[name]
    if name == "hashlimit_blank":
        return bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, ENTRY_VALUE.size, 1, short)
    if name == "hashlimit_configs":
        return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, TABLE_KEY.size, CONFIG_VALUE.size,
                              MAX_TABLES, short, flags=bpf.BPF_F_NO_PREALLOC)
    template = _create_entries("bpf_hltemplate", 1)
    try:
        return bpf.map_create(bpf.BPF_MAP_TYPE_HASH_OF_MAPS, TABLE_KEY.size, 4, MAX_TABLES,
                              short, inner_map_fd=template)
    finally:
        os.close(template)
