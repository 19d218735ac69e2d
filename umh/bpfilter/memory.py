"""What a request may make the service spend, checked before it is spent.

The kernel's ip_tables copies a replace into memory charged to its caller's memory
cgroup (GFP_KERNEL_ACCOUNT), so a caller limited to some memory cannot make the
kernel spend more on its tables. The service spends its own memory on a request,
many times the payload's size (decoded entries, the program's instructions), which
no cgroup of the caller's pays for. So before it reads a payload it reserves what
the request may need, and refuses it (ENOMEM, the kernel's answer when a charge
fails) if that is more than the caller's memory cgroup has left under its limit, or
than the machine has available: reserved, not charged, as a cgroup limit reads it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from .errors import BpfilterError

# What the service spends on a request, measured (tests/test_memory.py holds the
# reservation to what the service's peak memory grows by): a replace's decoded
# entries per byte of its payload, then its programs per instruction, reserved
# as the compiler emits them (spend()).
SPENT_PER_REPLACE_BYTE = 28
SPENT_PER_INSN = 320
SPENT_PER_REPLACE = 16 << 20   # an empty table's programs and maps, the old counters
INSNS_PER_SPEND = 1 << 14
# Left to the rest of the machine whatever the service reserves: its memory is not
# the service's to exhaust.
MACHINE_SHARE_LEFT = 8   # 1/8 of MemTotal
# Less is reserved without a check: `iptables -L` answered on a machine short of
# memory, as the kernel answers it.
UNCHECKED = 1 << 20


def needed(replace: bool, payload: int) -> int:
    """What a request with a payload of that size makes the service spend before it
    compiles anything. A get's answer is not counted: it is as big as the table,
    which is there already, whatever length the caller asks for."""
    if replace:
        return SPENT_PER_REPLACE + SPENT_PER_REPLACE_BYTE * payload
    return 2 * payload


@dataclass(frozen=True)
class _Controller:
    """The memory controller's hierarchy: where it is mounted, and its files."""
    root: str
    v2: bool

    @property
    def limit(self) -> str:
        return "memory.max" if self.v2 else "memory.limit_in_bytes"

    @property
    def usage(self) -> str:
        return "memory.current" if self.v2 else "memory.usage_in_bytes"


def _controller() -> Optional[_Controller]:
    """cgroup v1's memory hierarchy if mounted (a hybrid host keeps memory there),
    else cgroup v2's; None if neither is."""
    v2 = None
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            sep = fields.index("-")
            kind, options = fields[sep + 1], fields[sep + 3].split(",")
            if kind == "cgroup" and "memory" in options:
                return _Controller(fields[4], v2=False)
            if kind == "cgroup2" and v2 is None:
                v2 = _Controller(fields[4], v2=True)
    return v2


def _cgroup_of(pid: int, controller: _Controller) -> Optional[str]:
    """The process's memory cgroup, a path under the controller's root."""
    try:
        with open(f"/proc/{pid}/cgroup") as lines:
            for line in lines:
                _, names, path = line.rstrip("\n").split(":", 2)
                if (controller.v2 and names == "") or \
                        (not controller.v2 and "memory" in names.split(",")):
                    return path
    except (OSError, ValueError):
        pass
    return None


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _levels(path: str) -> list[str]:
    """The cgroup and its ancestors below the root: each one's limit applies."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}


class Reservation:
    """What a request holds of a Budget (None: of none, a check's own process)."""

    def __init__(self, budget: Optional["Budget"], nbytes: int, cgroup: Optional[str]):
        self.budget, self.nbytes = budget, nbytes
        self.levels = _levels(cgroup) if cgroup else []
        self.owner = os.getpid()   # a forked child's copy reserves nothing

    def release(self) -> None:
        if self.budget is not None:
            self.budget._give_back(self)
            self.budget = None


_current = threading.local()


@contextmanager
def spending(reservation: Optional[Reservation]) -> Iterator[None]:
    """The request this thread serves spends from `reservation`, which it releases
    at the end (None: a request that reserved nothing, such as `bpfilter check`)."""
    _current.reservation = reservation
    try:
        yield
    finally:
        _current.reservation = None
        if reservation is not None:
            reservation.release()


def spend_insns(count: int) -> None:
    """`count` more instructions emitted for the request this thread serves: more
    reserved for it, or BpfilterError(ENOMEM) if that is more than its caller's
    memory cgroup or the machine has left."""
    reservation = getattr(_current, "reservation", None)
    if reservation is not None and reservation.budget is not None \
            and reservation.owner == os.getpid():
        reservation.budget.extend(reservation, count * SPENT_PER_INSN)


class Budget:
    """The service's reservations: in all, and per memory cgroup of their callers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.controller = _controller()
        self.machine = 0
        self.per_cgroup: dict[str, int] = {}

    def caller_cgroup(self, pid: int) -> Optional[str]:
        if self.controller is None:   # mounted since we looked
            self.controller = _controller()
        return _cgroup_of(pid, self.controller) if self.controller and pid > 0 else None

    def reserve(self, nbytes: int, cgroup: Optional[str]) -> Reservation:
        """nbytes reserved for a request of a caller in that memory cgroup (None:
        unknown, the machine's limit only), or BpfilterError(ENOMEM) saying whose
        limit it would pass."""
        reservation = Reservation(self, 0, cgroup)
        self.extend(reservation, nbytes)
        return reservation

    def extend(self, reservation: Reservation, nbytes: int) -> None:
        levels = reservation.levels
        with self.lock:
            if nbytes < UNCHECKED:
                self._add(reservation, nbytes)
                return
            info = _meminfo()
            left = info["MemAvailable"] - info["MemTotal"] // MACHINE_SHARE_LEFT - self.machine
            if nbytes > left:
                raise BpfilterError(errno.ENOMEM, f"bpfilter needs {nbytes >> 20} MiB more to "
                                                  f"translate this request and the machine has "
                                                  f"{max(left, 0) >> 20} MiB to spare")
            for level in levels:
                directory = os.path.join(self.controller.root, level.lstrip("/"))
                limit = _read_int(os.path.join(directory, self.controller.limit))
                usage = _read_int(os.path.join(directory, self.controller.usage))
                if limit is None or usage is None or limit >= 1 << 62:   # v1's unlimited
                    continue
                room = limit - usage - self.per_cgroup.get(level, 0)
                if nbytes > room:
                    raise BpfilterError(errno.ENOMEM, f"bpfilter needs {nbytes >> 20} MiB more "
                                                      f"to translate this request, which the "
                                                      f"caller's memory cgroup {level} has not "
                                                      f"left under its limit "
                                                      f"({max(room, 0) >> 20} of "
                                                      f"{limit >> 20} MiB)")
            self._add(reservation, nbytes)

    def _add(self, reservation: Reservation, nbytes: int) -> None:
        self.machine += nbytes
        for level in reservation.levels:
            self.per_cgroup[level] = self.per_cgroup.get(level, 0) + nbytes
        reservation.nbytes += nbytes

    def _give_back(self, reservation: Reservation) -> None:
        with self.lock:
            self.machine -= reservation.nbytes
            for level in reservation.levels:
                self.per_cgroup[level] -= reservation.nbytes
                if self.per_cgroup[level] <= 0:
                    del self.per_cgroup[level]


M_ARENA_MAX = -8   # mallopt(3)
SERVICE_ARENAS = 2


def cap_malloc_arenas(count: int = SERVICE_ARENAS) -> None:
    """glibc gives a thread that allocates beside others an arena of its own (up to
    eight per core), and an arena keeps what it grew to: with a thread per request, the
    service's RSS would step up with how many requests once ran at the same time, not
    with what it holds. A few arenas keep it to what the tables need."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, count)
    except (OSError, AttributeError):
        pass   # another C library, with a policy of its own
