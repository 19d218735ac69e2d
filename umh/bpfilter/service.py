"""The translator service: iptables' socket options answered as the kernel answers
them, per network namespace, backed by BPF.

Requests come from bpfilter.ko or from the preload shim of `bpfilter exec`
(kmod/bpfilter_proto.h), the shim's each in its own thread (transport/unix.py): the
requests of one network namespace are serialised, those of others go on beside them.
A bad request gets an errno and a log line saying why; nothing a client sends can
stop the service or change a table it did not validly replace. Tables live in a
bpffs (store.py), so they keep filtering when the service exits or is killed, and a
new service takes them over.
"""
from __future__ import annotations

import errno
import fcntl
import gc
import os
import stat
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from . import ctnetns, kerneltables, kmodule, memory, netns, netnswatch, proto
from .abi import codec, families
from .abi import xtables as X
from .decode import table_from_blob
from .bpf import syscall as bpf
from .bpf.syscall import BpfError
from .compiler import trace
from .errors import BpfilterError
from .ext import known_match_revisions, known_target_revisions, xtmatch
from .ext.addrtype import needs_local_routes
from .klog import ANSWER_REFS, KmsgWriter, LogRing, devkmsg_writable
from .localroutes import LocalRoutes
from .sharedstate import SharedState
from .loader import HookSlot, Ruleset, attach_slots, load_ruleset, load_twin
from .model import Family, Hook, Table
from .store import Store, TableKey
from .tables import TABLES, implemented, kernel_tables

NS_GET_NSTYPE = 0xb703   # linux/nsfs.h: _IO(0xb7, 0x3)
SWEEP_INTERVAL = 2.0
# Requests that come without a pause of SWEEP_INTERVAL never let when_idle collect:
# what each leaves in a cycle (construct's parse contexts, some 5 KB a request) would
# stay frozen as long as they keep coming. Every this many requests one collects
# (a 100k-rule table makes that a second: a hundredth of one per request).
COLLECT_EVERY = 100


_log_sink: Optional[KmsgWriter] = None   # None: stderr


def log(message: str) -> None:
    for line in message.splitlines() or [""]:
        if _log_sink is None:
            print(f"bpfilter: {line}", file=sys.stderr, flush=True)
            continue
        try:
            _log_sink.write(f"bpfilter: {line}\n".encode(errors="replace"))
        except OSError:   # printk_devkmsg=off: nowhere to say it
            pass


def log_to_kernel() -> None:
    """A helper spawned by bpfilter.ko has no stderr: its lines go to the kernel log,
    every one of them (a refusal's names the rule: `dmesg`, iptables says)."""
    global _log_sink
    _log_sink = KmsgWriter()


def _logged(what: str, action) -> bool:
    """Run `action`; if it fails, log it with `what` and go on (work after a commit
    point, which must neither undo the commit nor be left half done)."""
    try:
        action()
        return True
    except Exception:
        log(f"{what}:\n{traceback.format_exc()}")
        return False


@dataclass
class TableState:
    key: TableKey
    raw: Optional[X.RawTable]    # None when broken
    ruleset: Optional[Ruleset]   # None when broken
    slots: dict[Hook, HookSlot] = field(default_factory=dict)
    kernel_entries: Optional[bytes] = None   # codec.kernel_entries(raw), once built
    generation: str = ""         # its committed generation in the store
    # Why recovery could not take the table over: it stays attached, filtering with
    # its last committed ruleset (as far as recovery could make it), and known (it is
    # listed, and swept with its namespace), but every request on it is refused.
    broken: Optional[str] = None

    def entries(self) -> bytes:
        """IPT_SO_GET_ENTRIES' answer: the table's entries as the kernel returns
        them, built once per table, and the current counters."""
        self.build_entries()
        return codec.with_counters(self.raw, self.kernel_entries, self.ruleset.packed_counters())

    def build_entries(self) -> None:
        if self.kernel_entries is None and self.raw is not None:
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
        if self.ruleset is not None:
            self.ruleset.close()


def _is_netns(fd: int) -> bool:
    """Whether fd is a network namespace, asked of the fd itself, which never
    blocks (opening it again would: a FIFO without a writer waits forever): nsfs
    inodes are regular files of nsfs's own device, and only nsfs answers NS_GET_NSTYPE
    (asked only then: a device's driver might read the number as its own)."""
    mode = os.fstat(fd)
    if not stat.S_ISREG(mode.st_mode) or mode.st_dev != os.stat(netns.SELF).st_dev:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == netns.CLONE_NEWNET
    except OSError:
        return False


def netns_identity(netns_fd: int) -> tuple[int, int]:
    """(inum, cookie) of a network namespace given as an nsfs file descriptor."""
    if not _is_netns(netns_fd):
        raise BpfilterError(errno.EINVAL, "the request's namespace descriptor is not a "
                                          "network namespace")
    return os.fstat(netns_fd).st_ino, netns.cookie(f"/proc/self/fd/{netns_fd}")


class Service:
    """Python's cyclic collector would rescan every object of every table (a
    100k-rule table makes millions, none in a cycle) at each of a request's
    allocations past its thresholds, a second at a time: requests run without
    it, what they leave is frozen out of its scans, and it runs when the
    service is idle (when_idle).

    Requests may come from several threads at once. Those that read or change the
    tables of one network namespace hold its lock (locked()), as the kernel's
    take the table's: a GET sees one table with its counters, a replace meets no
    other. A namespace, not a table: its tables share a directory of the store
    (made by the first, removed with the last) and conntrack's hold per family
    (ctnetns). Requests of other namespaces go on meanwhile: a long compile holds
    the interpreter only a few milliseconds at a time, and bpf() lets go of it."""

    def __init__(self, store: Store, beside_ip_tables: bool = True):
        """beside_ip_tables: whether the kernel's own ip_tables may serve the same
        namespaces (socket mode); not with bpfilter.ko, which holds its socket
        options and its names files (whose reading the module asks us to answer)."""
        self.store = store
        self.beside_ip_tables = beside_ip_tables
        self.tables: dict[TableKey, TableState] = {}
        self.log_ring = LogRing.pinned(store.root)
        self.local_routes = LocalRoutes.pinned(store.root, log)
        self.shared = SharedState.pinned(store.root, log)
        self._netns_refs = netnswatch.open_watch(log)
        self._last_request: Optional[float] = None   # since the last collection
        self._uncollected = 0                          # requests since the last collection
        self.closed = False
        # {(inum, cookie): [lock, threads holding or waiting for it]}, under _guard
        self._netns_locks: dict[tuple[int, int], list] = {}
        self._guard = threading.Lock()
        self._in_flight = 0   # requests being handled, under _guard
        self.budget = memory.Budget()
        memory.cap_malloc_arenas()
        self._recover()
        self._follow_local_routes()

    # -- lifetime -------------------------------------------------------------

    def _recover(self) -> None:
        for key in list(self.store.keys()):
            what = f"{families.of(key.family).command} table {key.table} of netns {key.inum}"
            try:
                state = self._recover_table(key)
            except Exception as err:
                # Detaching it would fail open: every packet its rules drop would pass.
                # It stays attached, its hooks running its committed rules if they
                # could be swapped in (a blob that no longer decodes: its rules are
                # fine), and known to the service, which refuses requests on it (it
                # cannot show them) and sweeps it with its namespace.
                log(f"CANNOT RECOVER {what} ({self.store.path(key)}): {err}\n"
                    f"{traceback.format_exc()}it stays attached, filtering as it did, and "
                    f"every request on it is refused; `bpfilter flush` detaches every table")
                try:   # its links, for the sweep to know when only they hold its namespace
                    slots = self.store.open_slots(key)
                except OSError:
                    slots = {}
                state = TableState(key, None, None, slots, broken=f"cannot recover it: {err}")
            if state is not None:
                self.tables[key] = state
                if state.broken is None:
                    log(f"recovered {what}")
        if kmodule.present():
            # a helper that died in a load leaves the kernel matches it made for it
            _logged("giving back the kernel matches no table names", lambda: log(
                f"gave back {xtmatch.release_unnamed(self.store.kernel_matches())} kernel "
                "match instance(s) no table names"))

    def _recover_table(self, key: TableKey) -> Optional[TableState]:
        """Make the hooks run what the committed generation says (a service that died
        between a commit and the swap of the slots leaves them running the previous
        one), drop every other generation, and decode it. None: the table was being
        created when its service died, never committed, never answered for: detached."""
        store = self.store
        if store.committed(key) is None:
            if not store.unversioned(key):
                log(f"{store.path(key)}: a table never committed, detached")
                store.remove(key)
                return None
            store.migrate(key)
        slots = store.open_slots(key)
        gen = None
        try:
            gen = store.open_committed(key)
            for hook, slot in slots.items():
                slot.fill(gen.rules[hook])
            store.discard_uncommitted(key)
            raw, table = table_from_blob(gen.blob, key.family)
            # its rules bound to what they share, as when it was loaded
            self.shared.prepare(key.inum, table)
        except BaseException:
            if gen is not None:
                gen.close()
            for slot in slots.values():
                slot.close()
            raise
        return TableState(key, raw, gen.ruleset(table), slots, generation=gen.name)

    @contextmanager
    def locked(self, inum: int, cookie: int, wait: bool = True) -> Iterator[bool]:
        """The body holding the namespace's lock (see the class); without wait,
        only if no one holds it, and the body is told whether it does."""
        with self._guard:
            entry = self._netns_locks.setdefault((inum, cookie), [threading.Lock(), 0])
            entry[1] += 1
        held = entry[0].acquire(wait)
        try:
            yield held
        finally:
            if held:
                entry[0].release()
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._netns_locks[(inum, cookie)]

    def sweep(self) -> None:
        """Drop the tables of namespaces nothing but our links holds any more. Our
        links hold a reference on their namespace, so without this a deleted
        namespace would stay alive, hooked, forever; one held by anything else (a
        task, an nsfs file or mount, a socket) is alive and keeps its firewall.
        One pass over the host's bpf links (netnswatch), whatever the number of
        processes. A namespace a request is busy with waits for the next sweep."""
        if self._netns_refs is None or not self.tables:
            return
        try:
            ours = [bpf.link_info(slot.link_fd)["id"] for state in list(self.tables.values())
                    for slot in state.slots.values() if slot.link_fd is not None]
            dead = self._netns_refs.dead(ours, self.local_routes.followed())
            # A nat table holds no reference on its namespace, as iptable_nat's does
            # not: its lookups go with the namespace, which the module tells.
            dead |= {key.cookie for key, state in list(self.tables.items())
                     if TABLES[key.table].nat_lookups and state.slots
                     and not kmodule.nat_attached(key.cookie, key.family, next(iter(state.slots)))}
        except (OSError, BpfilterError) as err:   # nothing known: nothing is detached
            log(f"cannot tell which namespaces died: {err}")
            return
        for key in [k for k in list(self.tables) if k.cookie in dead]:
            with self.locked(key.inum, key.cookie, wait=False) as held:
                if not held or key not in self.tables:
                    continue
                log(f"netns {key.inum} is gone: detaching table {key.table}")
                self.tables.pop(key).close()
                self.store.remove(key)
        self.local_routes.forget(self._reading_local_routes())
        self.retain_shared()

    def retain_shared(self) -> None:
        """What recent lists and hashlimit htables some table names; the others go,
        with their entries."""
        named: dict[int, list[Table]] = {}
        for key, state in list(self.tables.items()):
            if state.ruleset is not None:
                named.setdefault(key.inum, []).append(state.ruleset.table)
        self.shared.retain(named)

    def _reading_local_routes(self) -> set[tuple[int, int]]:
        """The namespaces (inum, cookie) with a table that reads the local routes."""
        return {(key.inum, key.cookie) for key, state in list(self.tables.items())
                if state.ruleset is not None and needs_local_routes(state.ruleset.table)}

    def _follow_local_routes(self) -> None:
        """After a recovery: the mirrors of the namespaces whose tables read them."""
        for inum, cookie in self._reading_local_routes():
            path = netns.find(inum)
            if path is None:
                log(f"netns {inum}: no path to it, its local routes are not followed")
                continue
            _logged(f"netns {inum}: following its local routes",
                    lambda: self.local_routes.follow(inum, cookie, path))

    def when_idle(self) -> None:
        """Once no request came for SWEEP_INTERVAL, the work the requests since the
        last time left: the entries of the tables they replaced (every iptables
        command starts by asking for them), and the collection they skipped, which
        frees their garbage in a cycle (construct's parses make a few) and freezes
        the tables out of the collector's scans."""
        if self._last_request is None or time.monotonic() - self._last_request < SWEEP_INTERVAL:
            return
        for key, state in list(self.tables.items()):
            with self.locked(key.inum, key.cookie, wait=False) as held:
                if held:
                    state.build_entries()
        with self._guard:
            if self._in_flight:
                return   # a long request still runs: collect after it
        self._collect()
        self._last_request = None

    def _collect(self) -> None:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._uncollected = 0

    def environment(self) -> dict:
        """The maps the service provides to the tables it loads: its ring, through
        which REJECT rules have it send their answers, and LOG rules have it write
        their lines to /dev/kmsg, unless kernel.printk_devkmsg=off closes that; its
        mirror of the namespaces' local routing tables, for addrtype rules; the lists
        of recent rules."""
        always = {**self.log_ring.maps(ANSWER_REFS), **self.local_routes.maps(),
                  **self.shared.maps()}
        return {**always, **self.log_ring.maps()} if devkmsg_writable() else always

    def close(self) -> None:
        """Let go of file descriptors only: what is pinned keeps filtering."""
        if self.closed:
            return
        self.closed = True
        for state in self.tables.values():
            state.close()
        self.tables.clear()
        self.log_ring.close()
        self.local_routes.close()
        self.shared.close()
        if self._netns_refs is not None:
            self._netns_refs.close()

    # -- requests -------------------------------------------------------------

    def reserve(self, req, caller_pid: int) -> memory.Reservation:
        """The memory req makes the service spend, reserved for it before its payload
        is read, in the machine and, for a replace, the memory cgroup of the caller
        (who has that pid in our pid namespace); or BpfilterError(ENOMEM), as the
        kernel's charge to the caller's cgroup would fail."""
        replace = req.op == proto.Op.SETSOCKOPT and req.optname == X.IPT_SO_SET_REPLACE
        # the kernel charges its caller's cgroup for a table, not for reading one
        cgroup = self.budget.caller_cgroup(caller_pid) if replace else None
        return self.budget.reserve(memory.needed(replace, req.len), cgroup)

    def handle(self, req, payload: bytes, netns_fd: Optional[int]) -> tuple[int, bytes]:
        self._last_request = time.monotonic()
        with self._paused_collector():
            return self._handle(req, payload, netns_fd)

    @contextmanager
    def _paused_collector(self) -> Iterator[None]:
        """codec.gc_paused() for requests that overlap: the collector stays off
        from the first one in to the last one out, who collects once COLLECT_EVERY
        requests have gone by without a pause (when_idle's turn)."""
        with self._guard:
            self._in_flight += 1
            self._uncollected += 1
            if self._in_flight == 1:
                self._collector_was_on = gc.isenabled()
                gc.disable()
        collect = False
        try:
            yield
        finally:
            with self._guard:
                self._in_flight -= 1
                if not self._in_flight:
                    # before the collector is back: its first pass would scan all the
                    # request made (a third of a second for a 100k-rule table)
                    gc.freeze()
                    if self._collector_was_on:
                        gc.enable()
                    collect = self._uncollected >= COLLECT_EVERY
            if collect:
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
            names = sorted(k.table for k in list(self.tables)
                           if (k.inum, k.cookie, k.family) == (inum, cookie, family))
            return 0, "".join(f"{n}\n" for n in names).encode()
        if req.op not in (proto.Op.GETSOCKOPT, proto.Op.SETSOCKOPT):
            raise BpfilterError(errno.EINVAL, f"unknown operation {req.op}")
        with self.locked(inum, cookie):
            if req.op == proto.Op.GETSOCKOPT:
                return where.get(req.optname, req.optlen, payload)
            return where.set(req.optname, payload)


def _name(raw: bytes) -> str:
    # the kernel forces the last byte of every name field to NUL
    return X.cstr(raw[:-1])


def get_answer(abi: X.EntryFamily, optname: int, optlen: int, payload: bytes,
               info: Callable[[str], bytes],
               entries: Callable[[str, int], bytes]) -> tuple[int, bytes]:
    """A getsockopt as do_ipt_get_ctl() (do_ip6t_get_ctl()) answers it, with the
    caller's optlen checked as it checks it and payload the bytes of optval it
    reads (proto.get_reads); info(name) is the table's ipt_getinfo, entries(name,
    size) its entries for a caller that expects size bytes of them."""
    reads = proto.get_reads(abi.family, optname, optlen)
    if len(payload) != reads:
        raise BpfilterError(errno.EPROTO, f"getsockopt {optname} with optlen {optlen} carries "
                                          f"{len(payload)} bytes of optval, not {reads}")
    if optname == X.IPT_SO_GET_INFO:
        if optlen != X.SIZEOF_IPT_GETINFO:
            raise BpfilterError(errno.EINVAL, f"IPT_SO_GET_INFO with length {optlen}")
        return 0, info(_name(payload))
    if optname == X.IPT_SO_GET_ENTRIES:
        header = codec.parse_get_entries_header(payload, optlen)
        return 0, payload + entries(header["name"], header["size"])
    if optname in (abi.so_get_revision_match, abi.so_get_revision_target):
        return _revision_answer(abi, optname, optlen, payload)
    raise BpfilterError(errno.EINVAL, f"unknown getsockopt {optname}")


def _revision_answer(abi: X.EntryFamily, optname: int, optlen: int,
                     payload: bytes) -> tuple[int, bytes]:
    """GET_REVISION_MATCH / _TARGET: whether bpfilter has that revision of the
    extension in the family, as xt_find_revision() answers for the kernel's."""
    if optlen != X.xt_get_revision.sizeof():
        raise BpfilterError(errno.EINVAL, f"GET_REVISION with length {optlen}")
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
        self.stranded: Optional[str] = None   # a generation a failed swap left running

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
            if TABLES[name].nat_lookups and not kmodule.present():
                raise BpfilterError(errno.EOPNOTSUPP, f"{self.abi.command} table '{name}' needs "
                                                      f"bpfilter.ko: its chains are lookups of the "
                                                      f"kernel's NAT core, which only the module "
                                                      f"can register (`modprobe bpfilter`)")
            blob = codec.initial_replace(name, self.family)
            raw, table = table_from_blob(blob, self.family)
            try:
                state = self._install(key, blob, raw, table, previous=None)
            except BpfError as err:
                if err.errno != errno.EBUSY:
                    raise
                raise BpfilterError(errno.EBUSY, self._priority_taken(name)) from None
        if state.broken is not None:
            raise BpfilterError(errno.EIO, f"{self.abi.command} table '{name}' of this namespace: "
                                           f"{state.broken}; it filters as it did, and "
                                           f"`bpfilter flush` detaches every table")
        if self.service.beside_ip_tables and \
                kerneltables.filters(self.netns_path, self.family, name):
            raise BpfilterError(errno.EBUSY, self._beside_ours(name))
        return state

    @property
    def netns_path(self) -> str:
        return f"/proc/self/fd/{self.netns_fd}"

    def _beside_ours(self, name: str) -> str:
        cmd = self.abi.command
        return (f"the kernel's own {cmd} table '{name}' was made in this network namespace "
                f"after bpfilter's ({cmd}-legacy was run here without bpfilter) and holds "
                f"rules or a policy other than ACCEPT: both tables decide every packet, and "
                f"bpfilter answers for its own only once the kernel's is back as the kernel "
                f"made it. Run without bpfilter: `{cmd}-legacy -t {name} -F; {cmd}-legacy "
                f"-t {name} -X` and set every policy to ACCEPT (the kernel keeps the empty "
                f"table until the namespace goes, or `rmmod {kerneltables.holder(self.family, name)}`)")

    def _priority_taken(self, name: str) -> str:
        """Why netfilter refused our hook, and what to do: nf_hook_entries_grow()
        admits no BPF hook at a priority another hook of that hook point has (the
        other way round it lets the kernel's own hook in beside ours)."""
        kernels = self.service.beside_ip_tables and \
            kerneltables.exists(self.netns_path, self.family, name)
        module = kerneltables.holder(self.family, name)
        if kernels:
            return (f"the kernel's own {self.abi.command} table '{name}' exists in this network "
                    f"namespace ({self.abi.command} was run here without bpfilter) and holds "
                    f"the hooks' priority: two '{name}' tables cannot filter one namespace. "
                    f"The kernel keeps its table until the namespace goes or its module does "
                    f"(`rmmod {module}`, which drops it in every namespace): use bpfilter in "
                    f"another namespace, or unload {module}")
        kind = kernel_tables(self.family)[name]
        priorities = " ".join(str(p) for p in sorted(set(kind.priorities)))
        return (f"another netfilter hook of this network namespace has the priority of table "
                f"'{name}' ({priorities}), where netfilter admits no BPF program beside "
                f"it: an nftables base chain "
                f"(`nft list ruleset`; priority filter is 0), or another bpfilter service's "
                f"table; move or delete it")

    def _install(self, key: TableKey, blob: bytes, raw: X.RawTable, table: Table,
                 previous: Optional[TableState]) -> TableState:
        """`table` in place of `previous` (None: a table created), or an exception and
        nothing changed. Loaded, then staged as a generation in the store, which one
        rename commits (Store.commit): that is the replace's commit point. The hooks'
        slots are swapped to it after: a service dying in between leaves its
        recovery to swap them; a swap that fails commits `previous` again. A table
        created is attached before its commit, running the kernel's initial rules
        (every policy ACCEPT, as no table at all): a service dying before the
        commit leaves it to the next one to detach."""
        service, store = self.service, self.service.store
        netns_path = self.netns_path
        traced = self._traced(key, table)
        try:
            service.shared.prepare(self.inum, table)
            ruleset = load_ruleset(table, service.environment(), previous and previous.ruleset,
                                   netns_path, traced)
        except BaseException:
            # what its checkentries made goes with it, as with the kernel's cleanup
            _logged(f"netns {self.inum}: forgetting what a refused table made",
                    service.retain_shared)
            raise
        if needs_local_routes(table):
            # filled before the first packet meets the rules (forgotten, if the replace
            # fails, by the next sweep)
            service.local_routes.follow(self.inum, self.cookie, netns_path)
        # the family's other tables trace as the raw table says: loaded again before
        # anything changes, so that one that cannot refuses the replace
        try:
            twins = self._load_twins(traced) if key.table == "raw" else []
        except BaseException:
            ruleset.close()
            _logged(f"netns {self.inum}: forgetting what a refused table made",
                    service.retain_shared)
            raise
        slots = previous.slots if previous else {}
        had_conntrack = previous is not None and previous.ruleset.uses_conntrack
        needs_conntrack = ruleset.uses_conntrack
        held = False   # a hold that failed has nothing to give back
        gen = None
        try:
            if needs_conntrack and not had_conntrack:
                ctnetns.hold(netns_path, self.family)   # before the first packet meets the new rules
                held = True
            if ruleset.counts_conntrack:
                ctnetns.force_accounting(netns_path)
            gen = store.stage(key, ruleset, blob)
            if previous is None:
                slots = attach_slots(ruleset, netns_path)
                store.save_slots(key, slots)
            store.commit(key, gen)
            if previous is not None:
                self._swap(previous, ruleset, gen)
        except BaseException:
            undo = [slot.close for slot in slots.values()] if previous is None else []
            if previous is None and os.path.isdir(store.path(key)):
                undo.append(lambda: store.remove(key))
            elif previous is not None and gen is not None and store.committed(key) != gen \
                    and self.stranded != gen:
                undo.append(lambda: store.discard(key, gen))   # (committed: see _swap)
            undo.append(ruleset.close)
            undo.append(service.retain_shared)
            undo.extend(twin.close for _, twin in twins)
            if held:
                undo.append(lambda: ctnetns.release(netns_path, self.family))
            for action in undo:
                _logged(f"netns {self.inum}: undoing a failed replace of table {key.table}", action)
            raise
        # Committed and in force: nothing from here on may fail the request.
        if had_conntrack and not needs_conntrack:
            _logged(f"netns {self.inum}: giving conntrack back",
                    lambda: ctnetns.release(netns_path, self.family))
        state = TableState(key, raw, ruleset, slots, generation=gen)
        service.tables[key] = state
        if service.shared.names(table) or (previous is not None and previous.ruleset is not None
                                           and service.shared.names(previous.ruleset.table)):
            _logged(f"netns {self.inum}: forgetting the recent lists and htables no table names",
                    service.retain_shared)
        for sibling, twin in twins:
            self._put_twin(sibling, twin)
        return state

    def _traced(self, key: TableKey, table: Table) -> bool:
        """Whether `table`, to be the table of `key`, traces (compiler/trace.py): the
        raw table of its namespace and family has a TRACE rule, or it is that table
        and has one."""
        if key.table == "raw":
            return trace.sets_trace(table)
        raw = self.service.tables.get(self.key("raw"))
        return raw is not None and raw.ruleset is not None and \
            trace.sets_trace(raw.ruleset.table)

    def _load_twins(self, traced: bool) -> list[tuple[TableState, Ruleset]]:
        """Twins (loader.load_twin) of the other tables of the caller's namespace and
        family whose programs trace otherwise; if one cannot be loaded, none, and why."""
        twins: list[tuple[TableState, Ruleset]] = []
        try:
            for key, state in list(self.service.tables.items()):
                if key == self.key("raw") or key != self.key(key.table) \
                        or state.ruleset is None or state.ruleset.traced == traced:
                    continue
                try:
                    twins.append((state, load_twin(state.ruleset, traced,
                                                   self.service.environment())))
                except (BpfilterError, BpfError) as err:
                    raise BpfilterError(
                        err.errno or errno.EINVAL,
                        f"{self.abi.command} table '{key.table}' of this namespace cannot "
                        f"{'be traced' if traced else 'stop being traced'} (its programs "
                        f"{'with' if traced else 'without'} TRACE's logging): {err}") from None
        except BaseException:
            for _, twin in twins:
                _logged(f"netns {self.inum}: closing a twin", twin.close)
            raise
        return twins

    def _put_twin(self, state: TableState, twin: Ruleset) -> None:
        """The twin in its table's place, as a replace puts a ruleset in (staged,
        committed, its hooks swapped), its table's counters and state its own. After
        the raw table's commit, which nothing may undo: a failure is logged, and the
        table goes on as it was."""
        key, store = state.key, self.service.store
        what = (f"netns {self.inum}: table {key.table} "
                f"{'traced' if twin.traced else 'no longer traced'}")
        gen = None
        try:
            gen = store.stage(key, twin, store.committed_blob(key))
            store.commit(key, gen)
            self._swap(state, twin, gen)
        except BaseException:
            log(f"{what}: failed, it goes on as it was:\n{traceback.format_exc()}")
            if gen is not None and store.committed(key) != gen and self.stranded != gen:
                _logged(f"{what}: unpinning {gen}", lambda: store.discard(key, gen))
            _logged(f"{what}: closing the twin", twin.close)
            return
        previous, before = state.ruleset, state.generation
        state.ruleset, state.generation = twin, gen
        _logged(f"{what}: waiting for the previous programs", bpf.wait_for_programs)
        _logged(f"{what}: dropping the previous classified runs",
                lambda: twin.took_over(previous))
        _logged(f"{what}: closing the previous ruleset", previous.close)
        _logged(f"{what}: unpinning {before}", lambda: store.discard_uncommitted(key))
        log(what)

    def _swap(self, previous: TableState, ruleset: Ruleset, gen: str) -> None:
        """Every hook's slot to `ruleset`, committed as `gen`. If one fails, the
        previous generation is committed again and the hooks swapped back: the
        caller is told of a failure only with the previous rules in force."""
        swapped = []
        try:
            for hook, slot in previous.slots.items():
                slot.fill(ruleset.hooks[hook])
                swapped.append(hook)
        except BaseException:
            key = previous.key
            log(f"netns {self.inum}: table {key.table}: swapping the hooks failed: back to "
                f"{previous.generation}")
            store = self.service.store
            if not _logged("committing it again", lambda: store.commit(key, previous.generation)):
                # Committed stays the new one: a new service would swap the rest in.
                log(f"netns {self.inum}: table {key.table} is {gen} in the store while its "
                    f"hooks may run {previous.generation}: restart the service to recover it")
            back = [_logged("swapping back",
                            lambda: previous.slots[hook].fill(previous.ruleset.hooks[hook]))
                    for hook in swapped]
            if not all(back):
                # a hook still runs it: its pins (its kernel matches) must stay
                self.stranded = gen
                log(f"netns {self.inum}: table {key.table}: {gen} stays pinned, a hook still "
                    f"runs it: restart the service to recover the table")
            raise

    # -- getsockopt -----------------------------------------------------------

    def get(self, optname: int, optlen: int, payload: bytes) -> tuple[int, bytes]:
        return get_answer(self.abi, optname, optlen, payload,
                          lambda name: codec.getinfo_bytes(self.table(name).raw), self._entries)

    def _entries(self, name: str, size: int) -> bytes:
        state = self.table(name)
        if size != state.raw.size:
            raise BpfilterError(errno.EAGAIN, f"IPT_SO_GET_ENTRIES: size {size} "
                                              f"but the table has {state.raw.size}")
        return state.entries()

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
        if in_place is not None and in_place.broken is not None:
            in_place = None   # self.table() refuses it
        raw, table = table_from_blob(blob, self.family, optlen=len(blob),
                                     previous=in_place and (in_place.raw, in_place.ruleset.table))
        decoded = time.monotonic()
        previous = self.table(raw.name)
        if raw.num_counters != previous.raw.num_entries:
            raise BpfilterError(errno.EAGAIN, f"num_counters {raw.num_counters} but table "
                                              f"'{raw.name}' has {previous.raw.num_entries} entries")
        entries = previous.successor_entries(raw)
        state = self._install(previous.key, blob, raw, table, previous)
        state.kernel_entries = entries
        installed = time.monotonic()
        old = self._retire(previous, state)
        done = time.monotonic()
        log(f"netns {self.inum}: {self.abi.command} table {raw.name} replaced in {done - started:.3f} s "
            f"(decoded {decoded - started:.3f}, compiled, loaded and swapped in "
            f"{installed - decoded:.3f}, the previous one retired {done - installed:.3f}): "
            f"{raw.num_entries} entries, {len(blob)} bytes, " + ", ".join(f"{r.hook.chain_name} {r.insn_count} insns"
                                                       for r in state.ruleset.hooks.values()))
        return 0, old

    def _retire(self, previous: TableState, state: TableState) -> bytes:
        """After a replace took effect: the counters of `previous` (the answer) once no
        packet is still in its programs, as the kernel reads them, then its programs,
        maps and generation let go. Whatever fails is logged, not answered: the
        replace took effect (as the kernel, whose failure to copy the counters out is
        silent then); counters that cannot be read are answered as zeros."""
        where = f"netns {self.inum}: after replacing table {previous.key.table}"
        old = [bytes(X.xt_counters.sizeof() * previous.raw.num_entries)]

        def counters() -> None:
            bpf.wait_for_programs()
            old[0] = previous.ruleset.packed_counters()
        _logged(f"{where}, reading the previous counters", counters)
        _logged(f"{where}, dropping the previous classified runs",
                lambda: state.ruleset.took_over(previous.ruleset))
        _logged(f"{where}, closing the previous ruleset", previous.ruleset.close)
        # every generation but the new one: this replace's predecessor, and any an
        # earlier replace failed to unpin
        _logged(f"{where}, unpinning {previous.generation}",
                lambda: self.service.store.discard_uncommitted(previous.key))
        return old[0]


def handled(service: Service, req, payload: bytes, netns_fd, log_refusals: bool = True,
            reservation: Optional[memory.Reservation] = None) -> tuple[int, bytes]:
    """Never raises: every failure becomes an errno and a message for the caller.
    What was reserved for the request (Service.reserve) is given back at the end."""
    what = f"pid {req.pid} op {req.op} optname {req.optname}"
    try:
        with memory.spending(reservation):
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
