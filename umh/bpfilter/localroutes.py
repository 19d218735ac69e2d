"""The service's mirror of each namespace's local routing table, for -m addrtype
without bpfilter.ko.

The kernel's addrtype match asks __inet_dev_addr_type(): the type (LOCAL,
BROADCAST, ...) and device of the route the address meets in the namespace's local
table (RT_TABLE_LOCAL), which a netfilter BPF program cannot look up. The service
keeps that table in an LPM trie (ext/addrtype.py's LOCAL_ROUTES: one map for every
namespace, keyed by netns inum and prefix), filled from a dump when the first
addrtype table of a namespace is loaded, before it is attached, and kept current
from the namespace's rtnetlink route events (pyroute2), which the kernel sends as it
changes the table (an address added, a link down). What the mirror cannot be is
instantaneous: a packet that meets the rules between the kernel's change and the
service's handling of its event sees the table as it was (documented, README).

A route the kernel's lookup would answer with an error (unreachable, prohibit,
blackhole, throw) makes the address UNICAST, as the lookup's failure does; of
several routes for one prefix, the one a lookup with no TOS finds is kept: the
first with TOS 0 in the kernel's order (by priority).

Each followed namespace has one netlink socket of ours open, which holds it: the
sweep counts it among our references (Service.sweep, netnswatch).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import threading
from typing import Callable, Optional

from .bpf import syscall as bpf
from .errors import BpfilterError
from .ext.addrtype import LOCAL_ROUTES, ROUTE_KEY, ROUTE_KEY_PREFIX, ROUTE_VALUE
from .netns import entered

RT_TABLE_LOCAL = 255
RTNLGRP_IPV4_ROUTE = 7
RTN_UNICAST, RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW = 1, 6, 7, 8, 9
FAILING = frozenset({RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT, RTN_THROW})
MAX_ROUTES = 1 << 16
PIN_NAME = "local_routes"


def _nexthop_device(route) -> int:
    oif = route.get_attr("RTA_OIF")
    if oif is None:
        multipath = route.get_attr("RTA_MULTIPATH")
        if multipath:
            oif = multipath[0]["oif"]
    return oif or 0


class _Mirror:
    """One namespace's local table: its routes by prefix, and the socket whose
    events keep them current."""

    def __init__(self, inum: int, events):
        self.inum, self.events = inum, events
        # (prefix bytes, length) -> [(priority, tos, type, device)], the kernel's order
        self.routes: dict[tuple[bytes, int], list[tuple[int, int, int, int]]] = {}

    def key(self, prefix: bytes, length: int) -> bytes:
        return ROUTE_KEY.pack(ROUTE_KEY_PREFIX + length, self.inum, prefix)

    def effective(self, prefix: bytes, length: int) -> Optional[bytes]:
        for _, tos, kind, device in self.routes.get((prefix, length), ()):
            if tos == 0:
                return ROUTE_VALUE.pack(RTN_UNICAST if kind in FAILING else kind, device)
        return None


class LocalRoutes:
    """The LPM trie and the mirrors that fill it; `note` gets the service's remarks."""

    def __init__(self, fd: int, note: Callable[[str], None]):
        self.fd, self.note = fd, note
        self._mirrors: dict[tuple[int, int], _Mirror] = {}    # (inum, cookie) -> mirror
        self._stale: set[int] = set()     # mirrors that lost events, to make anew
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._marshal = None    # pyroute2's, once a namespace is followed (not in
                                # bpfilter.ko's helper, which never follows one)
        self._stop = False
        self._thread = threading.Thread(target=self._follow_events, daemon=True,
                                        name="bpfilter local routes")
        self._thread.start()

    @classmethod
    def pinned(cls, root: str, note) -> "LocalRoutes":
        """The map pinned under `root` (a restarted service's programs still read
        it), made and pinned there if missing. Its entries are refreshed as the
        namespaces are followed again."""
        path = os.path.join(root, PIN_NAME)
        if os.path.exists(path):
            return cls(bpf.obj_get(path), note)
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_LPM_TRIE, ROUTE_KEY.size, ROUTE_VALUE.size,
                            MAX_ROUTES, "bpfilter_routes", flags=bpf.BPF_F_NO_PREALLOC)
        bpf.obj_pin(fd, path)
        return cls(fd, note)

    @classmethod
    def create(cls, note=lambda _: None) -> "LocalRoutes":
        """An unpinned map (tests, `bpfilter check`)."""
        return cls(bpf.map_create(bpf.BPF_MAP_TYPE_LPM_TRIE, ROUTE_KEY.size, ROUTE_VALUE.size,
                                  MAX_ROUTES, "bpfilter_routes", flags=bpf.BPF_F_NO_PREALLOC),
                   note)

    def maps(self) -> dict:
        return {LOCAL_ROUTES: self.fd}

    def followed(self) -> dict[int, int]:
        """{netns cookie: our references on it (the event socket)}."""
        with self._lock:
            return {cookie: 1 for _, cookie in self._mirrors}

    def follow(self, inum: int, cookie: int, netns_path: str) -> None:
        """Mirror the namespace's local table from now on (nothing if it is already):
        subscribed to its route events first, then dumped, so that no change falls
        between the two."""
        with self._lock:
            if (inum, cookie) in self._mirrors and inum not in self._stale:
                return
            stale = self._mirrors.pop((inum, cookie), None)
            self._stale.discard(inum)
        if stale is not None:
            stale.events.close()
        try:
            from pyroute2 import IPRoute
            from pyroute2.netlink.rtnl.marshal import MarshalRtnl
        except ImportError as err:   # bpfilter.ko's frozen helper leaves it out
            raise BpfilterError(errno.EOPNOTSUPP, "addrtype rules without bpfilter.ko need "
                                f"pyroute2, which this build of bpfilter lacks ({err})")
        self._marshal = self._marshal or MarshalRtnl()
        with entered(netns_path):
            # a socket of our own for the events: pyroute2's keep to the thread that
            # made them, and the events are read by another
            events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
            dump = IPRoute()
        try:
            events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            events.bind((0, 1 << (RTNLGRP_IPV4_ROUTE - 1)))
            mirror = _Mirror(inum, events)
            for route in dump.get_routes(family=socket.AF_INET, table=RT_TABLE_LOCAL):
                self._apply(mirror, route, "RTM_NEWROUTE")
            # what an earlier service left of this inum and the dump did not renew
            fresh = {mirror.key(prefix, length) for prefix, length in mirror.routes}
            stale, key = [], None
            while (key := bpf.map_next_key(self.fd, key, ROUTE_KEY.size)) is not None:
                if ROUTE_KEY.unpack(key)[1] == inum and key not in fresh:
                    stale.append(key)
            for key in stale:
                bpf.map_delete(self.fd, key)
        except BaseException:
            events.close()
            raise
        finally:
            dump.close()
        with self._lock:
            self._mirrors[(inum, cookie)] = mirror
        os.write(self._wake_w, b"x")

    def forget(self, keep: set[tuple[int, int]]) -> None:
        """Stop mirroring every namespace but those in `keep` ((inum, cookie)), and
        drop their entries."""
        with self._lock:
            gone = [k for k in self._mirrors if k not in keep]
            mirrors = [self._mirrors.pop(k) for k in gone]
        for mirror in mirrors:
            mirror.events.close()
            for prefix, length in list(mirror.routes):
                try:
                    bpf.map_delete(self.fd, mirror.key(prefix, length))
                except OSError:
                    pass
        if mirrors:
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        with self._lock:
            for mirror in self._mirrors.values():
                mirror.events.close()
            self._mirrors.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
        os.close(self.fd)

    # -- the events ------------------------------------------------------------

    def _follow_events(self) -> None:
        while not self._stop:
            with self._lock:
                mirrors = {m.events.fileno(): m for m in self._mirrors.values()}
            try:
                ready = select.select([self._wake_r, *mirrors], [], [])[0]
            except (OSError, ValueError):    # a socket closed meanwhile: look again
                continue
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            for fd in ready:
                mirror = mirrors.get(fd)
                if mirror is None:
                    continue
                try:
                    data = mirror.events.recv(1 << 20)
                    for message in self._marshal.parse(data):
                        if message.get("event") in ("RTM_NEWROUTE", "RTM_DELROUTE"):
                            self._apply(mirror, message, message["event"])
                except OSError as err:
                    lost = (" (events lost: the mirror may be stale until the namespace's "
                            "addrtype tables are replaced)" if err.errno == errno.ENOBUFS else "")
                    self.note(f"netns {mirror.inum}: following its local routes: {err!r}{lost}")
                    if err.errno == errno.ENOBUFS:
                        self._stale.add(mirror.inum)
                except Exception as err:   # never the end of following
                    self.note(f"netns {mirror.inum}: following its local routes: {err!r}")

    def _apply(self, mirror: _Mirror, route, event: str) -> None:
        if (route.get_attr("RTA_TABLE") or route["table"]) != RT_TABLE_LOCAL:
            return
        length = route["dst_len"]
        dst = route.get_attr("RTA_DST") or "0.0.0.0"
        prefix = ipaddress.IPv4Network(f"{dst}/{length}", strict=False).network_address.packed
        entry = (route.get_attr("RTA_PRIORITY") or 0, route["tos"], route["type"],
                 _nexthop_device(route))
        with self._lock:
            routes = mirror.routes.setdefault((prefix, length), [])
            same = [r for r in routes if r[:2] == entry[:2]]
            for r in same:
                routes.remove(r)
            if event == "RTM_NEWROUTE":
                routes.append(entry)
                routes.sort(key=lambda r: r[0])
            if not routes:
                del mirror.routes[(prefix, length)]
            value = mirror.effective(prefix, length)
            key = mirror.key(prefix, length)
            if value is None:
                try:
                    bpf.map_delete(self.fd, key)
                except OSError:
                    pass
            else:
                bpf.map_update(self.fd, key, value)
