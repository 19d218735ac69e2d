"""The translator service: iptables' socket options answered as the kernel answers
them, per network namespace, backed by BPF.

Requests come one at a time (kmod/bpfilter_proto.h), from bpfilter.ko or from the
preload shim of `bpfilter exec`. A bad request gets an errno and a log line saying
why; nothing a client sends can stop the service or change a table it did not
validly replace. Tables live in a bpffs (store.py), so they keep filtering when the
service exits or is killed, and a new service takes them over.
"""
from __future__ import annotations

import errno
import gc
import os
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

from . import ctnetns, netns, proto
from .abi import codec, families
from .abi import xtables as X
from .decode import table_from_blob
from .bpf import syscall as bpf
from .bpf.syscall import BpfError
from .errors import BpfilterError
from .ext import known_match_revisions, known_target_revisions
from .klog import LogRing, devkmsg_unlimited
from .loader import HookSlot, Ruleset, attach_slots, load_ruleset
from .model import Family, Hook, Table
from .store import Store, TableKey
from .tables import implemented

SO_NETNS_COOKIE = 71
SWEEP_INTERVAL = 2.0
# Requests that come without a pause of SWEEP_INTERVAL never let when_idle collect:
# what each leaves in a cycle (construct's parse contexts, some 5 KB a request) would
# stay frozen as long as they keep coming. Every this many requests one collects
# (a 100k-rule table makes that a second: a hundredth of one per request).
COLLECT_EVERY = 100


_log_sink = None   # None: stderr


def log(message: str) -> None:
    for line in message.splitlines() or [""]:
        print(f"bpfilter: {line}", file=_log_sink or sys.stderr, flush=True)


def log_to_kernel() -> None:
    """A helper spawned by bpfilter.ko has no stderr: its lines go to the kernel log."""
    global _log_sink
    _log_sink = open("/dev/kmsg", "w", buffering=1)


@dataclass
class TableState:
    key: TableKey
    raw: X.RawTable
    ruleset: Ruleset
    slots: dict[Hook, HookSlot] = field(default_factory=dict)
    kernel_entries: Optional[bytes] = None   # codec.kernel_entries(raw), once built

    def entries(self) -> bytes:
        """IPT_SO_GET_ENTRIES' answer: the table's entries as the kernel returns
        them, built once per table, and the current counters."""
        self.build_entries()
        return codec.with_counters(self.raw, self.kernel_entries, self.ruleset.packed_counters())

    def build_entries(self) -> None:
        if self.kernel_entries is None:
            self.kernel_entries = codec.kernel_entries(self.raw)

    def successor_entries(self, raw: X.RawTable) -> Optional[bytes]:
        """kernel_entries of `raw`, parsed against this table, if this table has
        its own and most entries of `raw` are this table's again: derived from them
        they are cheap, and the next iptables command asks for them. Those of a table
        mostly new (a restore) are left to when the service is idle, or asked: the
        command that sent it waits for its rules, not for them (half a second at
        100k rules)."""
        if self.kernel_entries is None or 2 * len(raw.same_as) < len(raw.entries):
            return None
        return codec.kernel_entries(raw, (self.raw, self.kernel_entries))

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()
        self.ruleset.close()


def netns_identity(netns_fd: int) -> tuple[int, int]:
    """(inum, cookie) of a network namespace given as an nsfs file descriptor."""
    inum = os.fstat(netns_fd).st_ino
    with netns.entered(f"/proc/self/fd/{netns_fd}"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            cookie = struct.unpack("<Q", probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    return inum, cookie


class Service:
    """Python's cyclic collector would rescan every object of every table (a
    100k-rule table makes millions, none in a cycle) at each of a request's
    allocations past its thresholds, a second at a time: requests run without
    it, what they leave is frozen out of its scans, and it runs when the
    service is idle (when_idle)."""

    def __init__(self, store: Store):
        self.store = store
        self.tables: dict[TableKey, TableState] = {}
        self.log_ring = LogRing.pinned(store.root)
        self._last_request: Optional[float] = None   # since the last collection
        self._uncollected = 0                          # requests since the last collection
        self.closed = False
        self._recover()

    # -- lifetime -------------------------------------------------------------

    def _recover(self) -> None:
        for key in list(self.store.keys()):
            try:
                blob, raw, ruleset, slots = self.store.load(key)
            except (OSError, BpfilterError) as err:
                log(f"cannot recover {self.store.path(key)}: {err}; leaving it as it is")
                continue
            self.tables[key] = TableState(key, raw, ruleset, slots)
            log(f"recovered {families.of(key.family).command} table {key.table} of netns {key.inum}")

    def sweep(self, live_inums: set[int]) -> None:
        """Drop the tables of namespaces nothing uses any more. Our links hold a
        reference on their namespace, so without this a deleted namespace would
        stay alive, hooked, forever."""
        for key in [k for k in self.tables if k.inum not in live_inums]:
            log(f"netns {key.inum} is gone: detaching table {key.table}")
            self.tables.pop(key).close()
            self.store.remove(key)

    def when_idle(self) -> None:
        """Once no request came for SWEEP_INTERVAL, the work the requests since the
        last time left: the entries of the tables they replaced (every iptables
        command starts by asking for them), and the collection they skipped, which
        frees their garbage in a cycle (construct's parses make a few) and freezes
        the tables out of the collector's scans."""
        if self._last_request is None or time.monotonic() - self._last_request < SWEEP_INTERVAL:
            return
        for state in self.tables.values():
            state.build_entries()
        self._collect()
        self._last_request = None

    def _collect(self) -> None:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._uncollected = 0

    def environment(self) -> dict:
        """The maps the service provides to the tables it loads: its log ring, whose
        lines it writes to /dev/kmsg, only while the kernel does not rate-limit that
        (otherwise it would drop most of the lines of LOG rules)."""
        return self.log_ring.maps() if devkmsg_unlimited() else {}

    def close(self) -> None:
        """Let go of file descriptors only: what is pinned keeps filtering."""
        if self.closed:
            return
        self.closed = True
        for state in self.tables.values():
            state.close()
        self.tables.clear()
        self.log_ring.close()

    # -- requests -------------------------------------------------------------

    def handle(self, req, payload: bytes, netns_fd: Optional[int]) -> tuple[int, bytes]:
        self._last_request = time.monotonic()
        self._uncollected += 1
        with codec.gc_paused():
            try:
                return self._handle(req, payload, netns_fd)
            finally:
                # before the collector is back: its first pass would scan all the
                # request made (a third of a second for a 100k-rule table)
                gc.freeze()
                if self._uncollected >= COLLECT_EVERY:
                    self._collect()

    def _handle(self, req, payload: bytes, netns_fd: Optional[int]) -> tuple[int, bytes]:
        if req.version != proto.VERSION:
            raise BpfilterError(errno.EPROTO, f"protocol version {req.version}, "
                                              f"this service speaks {proto.VERSION}")
        if req.family not in set(Family):
            raise BpfilterError(errno.EAFNOSUPPORT, f"family {req.family} is not supported")
        family = Family(req.family)
        if netns_fd is None:
            raise BpfilterError(errno.EINVAL, "request without its network namespace")
        inum, cookie = netns_identity(netns_fd)
        where = _Caller(self, inum, cookie, netns_fd, family)
        if req.op == proto.Op.TABLE_NAMES:
            names = sorted(k.table for k in self.tables
                           if (k.inum, k.cookie, k.family) == (inum, cookie, family))
            return 0, "".join(f"{n}\n" for n in names).encode()
        if req.op == proto.Op.GETSOCKOPT:
            return where.get(req.optname, payload)
        if req.op == proto.Op.SETSOCKOPT:
            return where.set(req.optname, payload)
        raise BpfilterError(errno.EINVAL, f"unknown operation {req.op}")


def _name(raw: bytes) -> str:
    # the kernel forces the last byte of every name field to NUL
    return X.cstr(raw[:-1])


def revision_answer(abi: X.EntryFamily, optname: int, payload: bytes) -> tuple[int, bytes]:
    """GET_REVISION_MATCH / _TARGET: whether bpfilter has that revision of the
    extension in the family, as xt_find_revision() answers for the kernel's."""
    if len(payload) != X.xt_get_revision.sizeof():
        raise BpfilterError(errno.EINVAL, f"GET_REVISION with length {len(payload)}")
    name, revision = _name(payload[:X.XT_EXTENSION_MAXNAMELEN]), payload[-1]
    known = (known_match_revisions if optname == abi.so_get_revision_match
             else known_target_revisions)(name, abi.family)
    if not known:
        return -errno.ENOENT, b""
    if revision not in known:
        return -errno.EPROTONOSUPPORT, b""
    return 0, payload


class _Caller:
    """One request's view: the service seen from the caller's network namespace."""

    def __init__(self, service: Service, inum: int, cookie: int, netns_fd: int,
                 family: Family):
        self.service, self.inum, self.cookie, self.netns_fd = service, inum, cookie, netns_fd
        self.family, self.abi = family, families.of(family)

    def key(self, table: str) -> TableKey:
        return TableKey(self.inum, self.cookie, self.family, table)

    def table(self, name: str) -> TableState:
        """The table by that name, created as the kernel creates it on first use."""
        key = self.key(name)
        state = self.service.tables.get(key)
        if state is None:
            supported = implemented(self.family)
            if name not in supported:
                raise BpfilterError(errno.ENOENT, f"{self.abi.command} table '{name}' does not "
                                                  f"exist in bpfilter (supported: "
                                                  f"{', '.join(supported)})")
            blob = codec.initial_replace(name, self.family)
            raw, table = table_from_blob(blob, self.family)
            state = self._install(key, blob, raw, table, previous=None)
        return state

    def _install(self, key: TableKey, blob: bytes, raw: X.RawTable, table: Table,
                 previous: Optional[TableState]) -> TableState:
        ruleset = load_ruleset(table, self.service.environment(), previous and previous.ruleset)
        store = self.service.store
        slots = previous.slots if previous else {}
        netns_path = f"/proc/self/fd/{self.netns_fd}"
        had_conntrack = previous is not None and previous.ruleset.uses_conntrack
        needs_conntrack = ruleset.uses_conntrack
        held = False   # a hold that failed has nothing to give back
        try:
            if needs_conntrack and not had_conntrack:
                ctnetns.hold(netns_path, self.family)   # before the first packet meets the new rules
                held = True
            if previous is None:
                slots = attach_slots(ruleset, netns_path)
                store.save_slots(key, slots)
            for hook, slot in slots.items():
                slot.fill(ruleset.hooks[hook])
            store.save_ruleset(key, ruleset, blob)
        except BaseException:
            if previous is None:
                for slot in slots.values():
                    slot.close()
                if os.path.isdir(store.path(key)):
                    store.remove(key)
            else:
                for hook, slot in slots.items():
                    slot.fill(previous.ruleset.hooks[hook])
            ruleset.close()
            if held:
                ctnetns.release(netns_path, self.family)
            raise
        if had_conntrack and not needs_conntrack:
            ctnetns.release(netns_path, self.family)
        state = TableState(key, raw, ruleset, slots)
        self.service.tables[key] = state
        return state

    # -- getsockopt -----------------------------------------------------------

    def get(self, optname: int, payload: bytes) -> tuple[int, bytes]:
        if optname == X.IPT_SO_GET_INFO:
            if len(payload) != X.SIZEOF_IPT_GETINFO:
                raise BpfilterError(errno.EINVAL, f"IPT_SO_GET_INFO with length {len(payload)}")
            return 0, codec.getinfo_bytes(self.table(_name(payload[:X.XT_TABLE_MAXNAMELEN])).raw)
        if optname == X.IPT_SO_GET_ENTRIES:
            header = codec.parse_get_entries(payload)
            state = self.table(header["name"])
            if header["size"] != state.raw.size:
                raise BpfilterError(errno.EAGAIN, f"IPT_SO_GET_ENTRIES: size {header['size']} "
                                                  f"but the table has {state.raw.size}")
            return 0, payload[:X.SIZEOF_IPT_GET_ENTRIES] + state.entries()
        if optname in (self.abi.so_get_revision_match, self.abi.so_get_revision_target):
            return self._revision(optname, payload)
        raise BpfilterError(errno.EINVAL, f"unknown getsockopt {optname}")

    def _revision(self, optname: int, payload: bytes) -> tuple[int, bytes]:
        return revision_answer(self.abi, optname, payload)

    # -- setsockopt -----------------------------------------------------------

    def set(self, optname: int, payload: bytes) -> tuple[int, bytes]:
        if optname == X.IPT_SO_SET_REPLACE:
            return self._replace(payload)
        if optname == X.IPT_SO_SET_ADD_COUNTERS:
            name, counters = codec.parse_counters_info(payload)
            state = self.table(name)
            if len(counters) != state.raw.num_entries:
                raise BpfilterError(errno.EINVAL, f"IPT_SO_SET_ADD_COUNTERS: {len(counters)} "
                                                  f"counters for {state.raw.num_entries} entries")
            state.ruleset.add_counters(counters)
            return 0, b""
        raise BpfilterError(errno.EINVAL, f"unknown setsockopt {optname}")

    def _replace(self, blob: bytes) -> tuple[int, bytes]:
        started = time.monotonic()
        # Most replaces change a few rules of a table: what did not change is
        # taken over from the table in place rather than parsed and decoded again.
        in_place = self.service.tables.get(self.key(codec.replace_name(blob)))
        raw, table = table_from_blob(blob, self.family, optlen=len(blob),
                                     previous=in_place and (in_place.raw, in_place.ruleset.table))
        previous = self.table(raw.name)
        if raw.num_counters != previous.raw.num_entries:
            raise BpfilterError(errno.EAGAIN, f"num_counters {raw.num_counters} but table "
                                              f"'{raw.name}' has {previous.raw.num_entries} entries")
        entries = previous.successor_entries(raw)
        state = self._install(previous.key, blob, raw, table, previous)
        state.kernel_entries = entries
        # As the kernel does before it reads the old table's counters: wait until no
        # packet is still in it.
        bpf.wait_for_programs()
        old = previous.ruleset.packed_counters()
        state.ruleset.took_over(previous.ruleset)
        previous.ruleset.close()
        log(f"netns {self.inum}: {self.abi.command} table {raw.name} replaced in {time.monotonic() - started:.3f} s: "
            f"{raw.num_entries} entries, " + ", ".join(f"{r.hook.chain_name} {r.insn_count} insns"
                                                       for r in state.ruleset.hooks.values()))
        return 0, old


def handled(service: Service, req, payload: bytes, netns_fd,
             log_refusals: bool = True) -> tuple[int, bytes]:
    """Never raises: every failure becomes an errno and a message for the caller."""
    what = f"pid {req.pid} op {req.op} optname {req.optname}"
    try:
        return service.handle(req, payload, netns_fd)
    except BpfilterError as err:
        if log_refusals:
            log(f"{what}: {err}")
        return -err.errno, str(err).encode()
    except BpfError as err:
        log(f"{what}: the kernel refused: {err}")
        return -(err.errno or errno.EINVAL), str(err).encode()
    except Exception as err:
        log(f"{what}: internal error, request refused:\n{traceback.format_exc()}")
        return -errno.EIO, f"bpfilter internal error: {err}".encode()


def live_netns_inums() -> set[int]:
    """Every network namespace something still uses: a task's, an open fd's, a
    bind mount's (ip netns add). Ours are excluded by construction: we hold none."""
    live: set[int] = set()

    def note(link: str) -> None:
        if link.startswith("net:["):
            live.add(int(link[5:-1]))

    for pid in filter(str.isdigit, os.listdir("/proc")):
        base = f"/proc/{pid}"
        try:
            for tid in os.listdir(f"{base}/task"):
                note(os.readlink(f"{base}/task/{tid}/ns/net"))
            for fd in os.listdir(f"{base}/fd"):
                note(os.readlink(f"{base}/fd/{fd}"))
            with open(f"{base}/mountinfo") as mounts:
                for line in mounts:
                    fields = line.split()
                    if fields[fields.index("-") + 1] == "nsfs":
                        note(fields[3])
        except OSError:
            continue
    return live
