"""The rate estimators of RATEEST and rateest rules run without bpfilter.ko
(ext/rateest.py), which the service keeps as xt_RATEEST keeps the kernel's: one per
name in a namespace, made when a table about to be loaded names it in a RATEEST rule
first (xt_rateest_tg_checkentry(), gen_new_estimator(): its interval and EWMA weight
for good), found by a later rule of any table of the namespace, gone once no rule
names it (xt_rateest_put() of the last). A rateest rule naming none is refused
(ENOENT), as one asking an existing estimator for another interval or weight (EINVAL).

Every (HZ/4) << (interval + 2) jiffies a timer folds an estimator's counters into its
averages with est_timer()'s arithmetic; it runs in a thread of the service, on the
monotonic clock, and catches up as the kernel's does when it was late (the next tick
is one jiffy away). The counters are read under their lock (BPF_F_LOCK), the
averages written whole (the programs read one version or the other, as the kernel's
seqcount gives them). The maps are pinned beside the tables, so that a restarted
service's programs go on with them; the timer starts its intervals afresh then.
"""
from __future__ import annotations

import errno
import os
import struct
import time
from typing import Callable, Optional

from .bpf import syscall as bpf
from .duetimers import DueTimers
from .errors import BpfilterError
from .ext.limit import kernel_hz
from .ext.rateest import (COUNTERS, KEY, RATEEST_COUNTERS, RATEEST_RATES, RATES,
                          named_estimators, served_estimators)
from .model import Table
from .recentlists import locked_btf

MAX_ESTIMATORS = 4096
U64 = (1 << 64) - 1
_PINS = ("rateest_counters", "rateest_rates", "rateest_configs")
_REFS = {"rateest_counters": RATEEST_COUNTERS, "rateest_rates": RATEEST_RATES}
# rateest_configs (the service's): interval, ewma_log, the counters at the last tick
CONFIG = struct.Struct("<bB6xQQ")
_SHORT = {"rateest_counters": "bpf_recounters", "rateest_rates": "bpf_rerates",
          "rateest_configs": "bpf_reconfigs"}


def est_timer(counters: tuple[int, int], config: tuple[int, int, int, int],
              rates: tuple[int, int]) -> tuple[int, int]:
    """est_timer()'s new (avbps, avpps), from the counters (bytes, packets), the
    estimator's (interval, ewma_log, last bytes, last packets) and its averages."""
    interval, ewma_log, *last = config
    shift = 10 - (interval + 2)
    out = []
    for now, before, average in zip(counters, last, rates):
        rate = ((now - before) & U64) << shift & U64
        rate = ((rate >> ewma_log) - (average >> ewma_log)) & U64
        out.append((average + rate) & U64)
    return out[0], out[1]


class RateEstimators:
    def __init__(self, fds: dict[str, int], log: Callable[[str], None] = lambda line: None):
        self.fds = fds
        self.timers = DueTimers("rateest: updating the estimators", log)
        self._hz: Optional[int] = None

    @classmethod
    def pinned(cls, root: str, log=lambda line: None) -> "RateEstimators":
        made = cls(bpf.pinned_maps(root, _PINS, _create), log)
        made.timers.start(made.tick_due, "rateest-timer")
        return made

    @classmethod
    def create(cls) -> "RateEstimators":
        return cls({name: _create(name) for name in _PINS})

    def maps(self) -> dict:
        return {ref: self.fds[name] for name, ref in _REFS.items()}

    def names(self, table: Table) -> bool:
        return bool(served_estimators(table))

    def configs(self, inum: int) -> dict[str, tuple[int, int]]:
        """A namespace's estimators: name -> (interval, ewma_log)."""
        found = {}
        for key, value in self._items():
            k_inum, raw = KEY.unpack(key)
            if k_inum == inum:
                interval, ewma_log, _, _ = CONFIG.unpack(value)
                found[raw.rstrip(b"\0").decode("latin-1")] = (interval, ewma_log)
        return found

    def prepare(self, inum: int, table: Table) -> None:
        """The checks of `table`'s RATEEST and rateest rules against the namespace's
        estimators, in the kernel's order, making those its RATEEST rules name first;
        the first that fails raises (what the table made goes with the next
        retain())."""
        checked = served_estimators(table)
        if not checked:
            return
        with self.timers.lock:
            existing = self.configs(inum)
            for check in checked:
                target = check.target
                if target is None:
                    for name in check.names:
                        if name not in existing:
                            raise BpfilterError(errno.ENOENT, f"{check.where}: no rate estimator "
                                                              f"{name!r} (a RATEEST rule makes it)")
                    continue
                asked = (target.interval, target.ewma_log)
                if target.est in existing:
                    if asked == (0, 0) or asked != existing[target.est]:
                        raise BpfilterError(errno.EINVAL, f"{check.where}: estimator "
                                                          f"{target.est!r} exists with another "
                                                          f"interval or EWMA weight")
                    continue
                # gen_new_estimator()
                if not -2 <= target.interval <= 3:
                    raise BpfilterError(errno.EINVAL, f"{check.where}: interval "
                                                      f"{target.interval} is not in -2..3")
                if not 0 < target.ewma_log < 31:
                    raise BpfilterError(errno.EINVAL, f"{check.where}: EWMA log "
                                                      f"{target.ewma_log} is not in 1..30")
                self._make(KEY.pack(inum, target.est.encode("latin-1")), *asked)
                existing[target.est] = asked

    def _make(self, key: bytes, interval: int, ewma_log: int) -> None:
        bpf.map_update(self.fds["rateest_counters"], key, COUNTERS.pack(0, 0, 0))
        bpf.map_update(self.fds["rateest_rates"], key, RATES.pack(0, 0))
        bpf.map_update(self.fds["rateest_configs"], key, CONFIG.pack(interval, ewma_log, 0, 0))
        self.timers.next[key] = time.monotonic() + self._period(interval)
        self.timers.wake()

    def retain(self, tables: dict[int, list[Table]]) -> None:
        """Every estimator no rule of its namespace names any more goes: `tables`
        gives, for each namespace with tables, its tables."""
        names = {inum: {name for table in named for name in named_estimators(table)}
                 for inum, named in tables.items()}
        with self.timers.lock:
            for key, _ in self._items():
                inum, raw = KEY.unpack(key)
                if raw.rstrip(b"\0").decode("latin-1") not in names.get(inum, ()):
                    for name in _PINS:
                        bpf.map_delete(self.fds[name], key)
                    self.timers.next.pop(key, None)

    def _items(self) -> list[tuple[bytes, bytes]]:
        return bpf.map_items(self.fds["rateest_configs"], KEY.size, CONFIG.size)

    # -- est_timer() -----------------------------------------------------------------

    def _period(self, interval: int) -> float:
        if self._hz is None:
            self._hz = kernel_hz()
        return ((self._hz // 4) << (interval + 2)) / self._hz

    def tick_due(self, now: float) -> int:
        """est_timer() of every estimator whose interval ran out; how many."""
        ticked = 0
        with self.timers.lock:
            for key, value in self._items():
                interval, ewma_log, last_bytes, last_packets = CONFIG.unpack(value)
                period = self._period(interval)
                when = self.timers.next.setdefault(key, now + period)
                if when > now:
                    continue
                counted = bpf.map_lookup(self.fds["rateest_counters"], key, COUNTERS.size,
                                         bpf.BPF_F_LOCK)
                rates = bpf.map_lookup(self.fds["rateest_rates"], key, RATES.size)
                if counted is None or rates is None:
                    continue
                _, nbytes, npackets = COUNTERS.unpack(counted)
                averages = est_timer((nbytes, npackets),
                                     (interval, ewma_log, last_bytes, last_packets),
                                     RATES.unpack(rates))
                bpf.map_update(self.fds["rateest_rates"], key, RATES.pack(*averages))
                bpf.map_update(self.fds["rateest_configs"], key,
                               CONFIG.pack(interval, ewma_log, nbytes, npackets))
                when += period
                if now >= when:     # late: the next tick a jiffy away, as the kernel's
                    when = now + 1 / self._hz
                self.timers.next[key] = when
                ticked += 1
        return ticked

    def close(self) -> None:
        self.timers.stop()
        for fd in self.fds.values():
            os.close(fd)


def _create(name: str) -> int:
    short = _SHORT[name]
    if name == "rateest_counters":
        blob, key_type, value_type = locked_btf(name, KEY.size, COUNTERS.size)
        btf_fd = bpf.btf_load(blob)
        try:
            return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, KEY.size, COUNTERS.size,
                                  MAX_ESTIMATORS, short, flags=bpf.BPF_F_NO_PREALLOC,
                                  btf=(btf_fd, key_type, value_type))
        finally:
            os.close(btf_fd)
    # written whole: a program holds the old value, or the new (no reuse before RCU)
    size = RATES.size if name == "rateest_rates" else CONFIG.size
    return bpf.map_create(bpf.BPF_MAP_TYPE_HASH, KEY.size, size, MAX_ESTIMATORS, short,
                          flags=bpf.BPF_F_NO_PREALLOC)
