"""The kernel's wall clock as -m time rules run without bpfilter.ko read it
(ext/time.py): a netfilter program has the TAI clock (bpf_ktime_get_tai_ns()), which
is the wall clock plus the TAI offset a time daemon may set (adjtimex), and xt_time's
--kerneltz shifts by the kernel's time zone (sys_tz, settimeofday()). The service keeps
both in a map, read again every second, pinned beside the tables."""
from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from typing import Optional

from .bpf import syscall as bpf
from .ext.time import WALLCLOCK
from .model import Table

VALUE = struct.Struct("<qq")     # TAI offset, time zone: seconds (ext/time.py's W_*)
_NAME = "wallclock"


class _Timezone(ctypes.Structure):
    _fields_ = [("tz_minuteswest", ctypes.c_int), ("tz_dsttime", ctypes.c_int)]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


def kernel_clock() -> bytes:
    """The map's value now: CLOCK_TAI - CLOCK_REALTIME (whole seconds), and sys_tz's
    minutes west of UTC in seconds."""
    offset = round(time.clock_gettime(time.CLOCK_TAI) - time.clock_gettime(time.CLOCK_REALTIME))
    tz = _Timezone()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.gettimeofday(ctypes.byref(_Timeval()), ctypes.byref(tz)) != 0:
        raise OSError(ctypes.get_errno(), "gettimeofday")
    return VALUE.pack(offset, 60 * tz.tz_minuteswest)


class WallClock:
    def __init__(self, fd: int):
        self.fd = fd
        self._stop = threading.Event()
        self._follower: Optional[threading.Thread] = None

    @classmethod
    def pinned(cls, root: str, log=lambda line: None) -> "WallClock":
        made = cls(bpf.pinned_maps(root, (_NAME,), lambda _: _create())[_NAME])
        made.refresh()
        made._follower = threading.Thread(target=made._follow, args=(log,), name="wallclock",
                                          daemon=True)
        made._follower.start()
        return made

    @classmethod
    def create(cls) -> "WallClock":
        made = cls(_create())
        made.refresh()
        return made

    def refresh(self) -> None:
        bpf.map_update(self.fd, bytes(4), kernel_clock())

    def _follow(self, log) -> None:
        while not self._stop.wait(1.0):
            try:
                self.refresh()
            except OSError as err:
                log(f"wallclock: cannot read the kernel's clock: {err}")

    def maps(self) -> dict:
        return {WALLCLOCK: self.fd}

    # what tables name: nothing (SharedState's interface)
    def names(self, table: Table) -> bool:
        return False

    def prepare(self, inum: int, table: Table) -> None:
        pass

    def retain(self, tables) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join()
        os.close(self.fd)


def _create() -> int:
    return bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, VALUE.size, 1, "bpf_wallclock")
