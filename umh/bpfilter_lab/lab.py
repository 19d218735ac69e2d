"""A namespace lab for differential tests of the filter table, IPv4 and IPv6.

One sender namespace S and several target namespaces that are wired
identically (same addresses, interface names and MACs), so that the same
frame sent to each target meets the same routing and the same `-i`/`-o`
names; only the filter behind the hooks differs. Every target speaks both
families; a packet's family follows its addresses.

Per target T (names as seen from T):

    S:s<k>i  <-- veth -->  T:vin0   198.18.0.1/24   (S side: 198.18.0.2, 2001:db8:1::2)
    S:s<k>o  <-- veth -->  T:vout0  198.19.0.1/24   (S side: 198.19.0.2, 2001:db8:2::2)
    T:lo     2001:db8:1::1/128, 2001:db8:2::1/128

Paths:
  input    S injects a frame on s<k>i; T delivers it locally; raw sockets in
           T (one per IP protocol) see it after LOCAL_IN.
  forward  S injects on s<k>i; T routes it out vout0 (or back out vin0 for
           the S side's address on vin0); S captures it on s<k>o / s<k>i.
  reverse  S injects on s<k>o, to the S side's address on vin0; T routes it
           out vin0; S captures it on s<k>i: the other way through FORWARD,
           for replies.
  output   a raw header-including socket inside T emits it (LOCAL_OUT); S
           captures it on s<k>o / s<k>i.
Forwarding may change the TTL (hop limit) and IPv4's header checksum, nothing else.

Only test packets may cross T's hooks, or the counters would not be exact.
S has no addresses, no routes and no IPv6 (it never answers); neighbours are
static. T's main routing tables are empty, so everything T's own stack would
send back (TCP RSTs, echo replies, ICMP and ICMPv6 errors) fails its route
lookup before LOCAL_OUT. T's real routes live in table 100, reached by frames
arriving on vin0 or vout0 and by the lab's raw sockets (SO_MARK 0x42).
What IPv6 sends without a route lookup is kept from starting at all:
  - vin0 and vout0 have no IPv6 address (no link-local either: addr_gen_mode
    none), so there is nothing to run DAD for, no router solicitation, and no
    neighbour advertisement: T answers a solicitation only for an address of
    the interface it came in on. T's IPv6 addresses live on lo, reached from
    either side as IPv4's are.
  - vin0 and vout0 have IFF_MULTICAST off when IPv6 forwarding is turned on,
    so they never join the all-routers groups, the only groups they could
    report in MLD (all-nodes is never reported; lo joins no solicited-node
    groups); T's addresses are /128, so no subnet-router anycast either.
  - router advertisements and redirects are not accepted.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from bpfilter.model import Family
from bpfilter.netns import entered

from . import namespaces
from .backends import BACKENDS
from .packets import ICMPV6, Packet, checksum

PATHS = ("input", "forward", "reverse", "output")

T_IN, T_OUT = "vin0", "vout0"
T_IN_MAC, S_IN_MAC = "02:bf:00:00:01:01", "02:bf:00:00:01:02"
T_OUT_MAC, S_OUT_MAC = "02:bf:00:00:02:01", "02:bf:00:00:02:02"
ROUTE_TABLE = 100
LAB_MARK = 0x42

_SO_MARK = 36
_SO_RCVBUFFORCE = 33
_SOL_PACKET = 263
_PACKET_IGNORE_OUTGOING = 23
_ETH_P_ALL = 0x0003
_ETHERTYPE = {Family.IPV4: 0x0800, Family.IPV6: 0x86DD}
_FAMILY_OF_ETHERTYPE = {v: k for k, v in _ETHERTYPE.items()}
_IPV6_FLOWINFO = 11           # the socket option that has recvmsg report the flow info
_IFF_MULTICAST = 0x1000
_IFA_F_NODAD, _IFA_F_NOPREFIXROUTE = 0x02, 0x200
_NUD_PERMANENT = 0x80
_RTNH_F_ONLINK = 0x04
_RCVBUF = 8 << 20


@dataclass(frozen=True)
class Wiring:
    """One family's addresses in the lab, as seen from T."""
    family: Family
    t_in: str
    s_in: str
    t_out: str
    s_out: str
    net: str                # everything in it but s_in is routed out vout0
    t_devices: tuple        # where T's two addresses live
    t_prefix: int           # their prefix length
    t_flags: int            # and their flags (IFA_F_*)
    local: frozenset        # destinations T takes as its own


IPV4 = Wiring(Family.IPV4, "198.18.0.1", "198.18.0.2", "198.19.0.1", "198.19.0.2",
              "198.18.0.0/15", (T_IN, T_OUT), 24, _IFA_F_NOPREFIXROUTE,
              frozenset({"198.18.0.1", "198.19.0.1", "198.18.0.0", "198.18.0.255",
                         "198.19.0.0", "198.19.0.255"}))
IPV6 = Wiring(Family.IPV6, "2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1", "2001:db8:2::2",
              "2001:db8::/32", ("lo", "lo"), 128, _IFA_F_NOPREFIXROUTE | _IFA_F_NODAD,
              frozenset({"2001:db8:1::1", "2001:db8:2::1", "ff02::1"}))
WIRING = {w.family: w for w in (IPV4, IPV6)}

T_IN_ADDR, S_IN_ADDR, T_OUT_ADDR, S_OUT_ADDR = IPV4.t_in, IPV4.s_in, IPV4.t_out, IPV4.s_out
LAB_NET, T_LOCAL = IPV4.net, IPV4.local
T_IN6_ADDR, S_IN6_ADDR, T_OUT6_ADDR, S_OUT6_ADDR = IPV6.t_in, IPV6.s_in, IPV6.t_out, IPV6.s_out
LAB_NET6, T_LOCAL6 = IPV6.net, IPV6.local


_seq = itertools.count()


# ---------------------------------------------------------------- what arrived

def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _multicast(address: str) -> bool:
    return ipaddress.ip_address(address).is_multicast


def _ipv6_delivered(pkt: bytes) -> "tuple[int, int] | None":
    """(protocol, offset) of the first header T's local delivery hands to raw sockets:
    the one after the IPv6 header, or after hop-by-hop options, which are processed
    before any hook; None if T drops the packet for a hop-by-hop header it cannot read."""
    if pkt[6] != 0:
        return pkt[6], 40
    if len(pkt) < 48 or len(pkt) < 40 + (pkt[41] + 1) * 8:
        return None
    return pkt[40], 40 + (pkt[41] + 1) * 8


class _Arrivals:
    """One family's way of recognizing a packet: its tag, the part of it that must
    arrive unchanged, and what a raw socket in T reads of it."""
    family: Family

    def tag(self, what: bytes) -> int:
        """The lab's tag, in a packet or in what must arrive of it."""
        raise NotImplementedError

    def sent_part(self, pkt: bytes) -> "bytes | None":
        """The packet cut to its own length, with what forwarding changes masked."""
        raise NotImplementedError

    def local_socket(self, proto: int) -> socket.socket:
        raise NotImplementedError

    def local_expected(self, pkt: bytes) -> "tuple[int, bytes] | None":
        """(protocol of the raw socket that sees it, what that socket's read gives)."""
        raise NotImplementedError

    def local_read(self, s: socket.socket) -> "tuple[Family, bytes] | None":
        """(family, what the read gives) of one datagram read from a raw socket in T."""
        raise NotImplementedError


class _IPv4Arrivals(_Arrivals):
    family = Family.IPV4

    def tag(self, what: bytes) -> int:
        return struct.unpack_from("!H", what, 4)[0]

    def sent_part(self, pkt: bytes) -> "bytes | None":
        if len(pkt) < 20:
            return None
        pkt = pkt[:struct.unpack_from("!H", pkt, 2)[0]]
        return pkt[:8] + b"\0" + pkt[9:10] + b"\0\0" + pkt[12:]

    def local_socket(self, proto: int) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)

    def local_expected(self, pkt: bytes) -> "tuple[int, bytes] | None":
        return pkt[9], self.sent_part(pkt)

    def local_read(self, s: socket.socket) -> "tuple[Family, bytes] | None":
        what = self.sent_part(s.recv(65535))   # IPv4 raw sockets read the whole packet
        return None if what is None else (self.family, what)


class _IPv6Arrivals(_Arrivals):
    """An IPv6 raw socket reads from the header it is for on; the rest of what must
    match (flow information, addresses) comes from its ancillary data."""
    family = Family.IPV6

    def tag(self, what: bytes) -> int:
        return struct.unpack_from("!I", what, 0)[0] & 0xFFFFF

    def sent_part(self, pkt: bytes) -> "bytes | None":
        if len(pkt) < 40:
            return None
        pkt = pkt[:40 + struct.unpack_from("!H", pkt, 4)[0]]
        return pkt[:7] + b"\0" + pkt[8:]

    def local_socket(self, proto: int) -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, proto)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        s.setsockopt(socket.IPPROTO_IPV6, _IPV6_FLOWINFO, 1)
        return s

    def local_expected(self, pkt: bytes) -> "tuple[int, bytes] | None":
        delivered = _ipv6_delivered(pkt)
        if delivered is None:
            return None
        proto, offset = delivered
        pkt = pkt[:40 + struct.unpack_from("!H", pkt, 4)[0]]
        return proto, self._seen(pkt[:4], pkt[8:24], pkt[24:40], pkt[offset:])

    def local_read(self, s: socket.socket) -> "tuple[Family, bytes] | None":
        data, ancillary, _, source = s.recvmsg(65535, 256)
        flowinfo, destination = bytes(4), None
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IPV6 and kind == _IPV6_FLOWINFO:
                flowinfo = value[:4]      # sent only when not zero
            elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                destination = value[:16]
        if destination is None:
            return None
        return self.family, self._seen(flowinfo, socket.inet_pton(socket.AF_INET6, source[0]),
                                       destination, data)

    @staticmethod
    def _seen(flowinfo: bytes, src: bytes, dst: bytes, data: bytes) -> bytes:
        """Traffic class and flow label (not the version), addresses, the data read."""
        return bytes([flowinfo[0] & 0x0F]) + flowinfo[1:4] + src + dst + data


ARRIVALS = {a.family: a for a in (_IPv4Arrivals(), _IPv6Arrivals())}


def _check_input(p: Packet) -> None:
    """Refuse an input case no raw socket in T could see (though LOCAL_IN passed it)."""
    if p.family is Family.IPV4:
        if p.frag_offset or p.more_fragments:
            raise ValueError("fragments are reassembled before LOCAL_IN; "
                             "use the forward or output path")
        proto = p.proto_number
        if proto == 1 and p.truncate_l4 is not None:
            raise ValueError("raw ICMP sockets drop truncated ICMP (icmp_filter); "
                             "use the forward or output path")
    else:
        pkt = p.build(1, 0)
        delivered = _ipv6_delivered(pkt)
        if delivered is None:
            return   # T drops it before any hook: it never arrives, and nothing to see
        proto, offset = delivered
        if proto == ICMPV6:
            message = pkt[offset:]
            pseudo = pkt[8:40] + struct.pack("!IxxxB", len(message), ICMPV6)
            if len(message) < 4 or checksum(pseudo + message):
                raise ValueError("raw ICMPv6 sockets drop ICMPv6 shorter than 4 bytes or "
                                 "with a wrong checksum; use the forward or output path")
    if proto in (0, socket.IPPROTO_RAW):
        raise ValueError(f"no raw socket can receive protocol {proto}")


def _check_case(case: Case) -> None:
    p = case.packet
    wiring = WIRING[p.family]
    if case.path not in PATHS:
        raise ValueError(f"unknown path {case.path!r}")
    if case.path == "input":
        if p.dst not in wiring.local:
            raise ValueError(f"input case needs a local dst, got {p.dst}")
        _check_input(p)
    elif case.path == "reverse" and p.dst != wiring.s_in:
        raise ValueError(f"reverse case goes to {wiring.s_in}, not {p.dst}")
    elif p.dst in wiring.local or _multicast(p.dst):
        raise ValueError(f"{case.path} case needs a unicast, non-local dst, got {p.dst}")


@dataclass(frozen=True)
class Case:
    packet: Packet
    path: str  # one of PATHS


# ---------------------------------------------------------------- the lab

def _rcvbuf(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
    s.setblocking(False)
    return s


class _Target:
    def __init__(self, name: str, index: int, netns: str, backend) -> None:
        self.name, self.index, self.netns, self.backend = name, index, netns, backend
        self.s_in, self.s_out = f"s{index}i", f"s{index}o"
        self.inject: dict[str, socket.socket] = {}   # S, AF_PACKET on s_in ("in"), s_out
        self.wire: list[socket.socket] = []          # S, AF_PACKET captures
        self.emit: dict[Family, socket.socket] = {}  # T, raw header-including, per family
        self.local: dict[tuple[Family, int], socket.socket] = {}  # T, raw per protocol


class Lab:
    """The lab; use as a context manager.

    `targets` maps a target name to a backend kind from BACKENDS ("kernel",
    "bpfilter") or to a backend object with load/counters/close.
    """

    def __init__(self, targets: "Mapping[str, object] | None" = None,
                 grace: float = 0.2) -> None:
        targets = {"kernel": "kernel", "bpf": "bpfilter"} if targets is None else targets
        self.prefix = f"bpfl-{os.getpid()}-{next(_seq)}"
        self.sender = f"{self.prefix}-S"
        self.grace = grace
        self._targets = {
            name: _Target(name, i, f"{self.prefix}-{name}",
                          BACKENDS[kind]() if isinstance(kind, str) else kind)
            for i, (name, kind) in enumerate(targets.items())}
        self._namespaces: list[str] = []
        self._tags = itertools.count(1)

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    def netns(self, target: str) -> str:
        return self._targets[target].netns

    def backend(self, target: str):
        return self._targets[target].backend

    # -- lifecycle

    def __enter__(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        namespaces.add(name)
        self._namespaces.append(name)

    def _build(self) -> None:
        self._add_netns(self.sender)
        namespaces.write_sysctls(self.sender, {"net.ipv6.conf.all.disable_ipv6": 1,
                                               "net.ipv6.conf.default.disable_ipv6": 1,
                                               "net.ipv4.ip_forward": 0})
        for t in self._targets.values():
            self._build_target(t)
        with namespaces.netlink(self.sender) as ipr:
            for t in self._targets.values():
                for ifname in (t.s_in, t.s_out):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        with entered(self.sender):
            for t in self._targets.values():
                for side, ifname in (("in", t.s_in), ("out", t.s_out)):
                    t.inject[side] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                    t.inject[side].bind((ifname, 0))
                for ifname in (t.s_in, t.s_out):
                    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                      socket.htons(_ETH_P_ALL))
                    s.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
                    s.bind((ifname, _ETH_P_ALL))
                    t.wire.append(_rcvbuf(s))

    def _build_target(self, t: _Target) -> None:
        self._add_netns(t.netns)
        ipv4_conf = {"forwarding": 1, "rp_filter": 0, "accept_local": 1,
                     "send_redirects": 0, "accept_redirects": 0}
        # What interfaces start with, so that vin0 and vout0 never begin any IPv6
        # traffic of their own (see the module's docstring); forwarding comes later.
        ipv6_quiet = {"accept_ra": 0, "accept_redirects": 0, "accept_dad": 0,
                      "dad_transmits": 0, "router_solicitations": 0, "addr_gen_mode": 1,
                      "autoconf": 0}
        namespaces.write_sysctls(
            t.netns, {f"net.ipv4.conf.{dev}.{k}": v for dev in ("all", "default")
                      for k, v in ipv4_conf.items()}
            | {f"net.ipv6.conf.default.{k}": v for k, v in ipv6_quiet.items()}
            | {"net.ipv6.conf.all.accept_dad": 0})
        with namespaces.netlink(self.sender) as ipr:
            for s_if, s_mac, t_if, t_mac in ((t.s_in, S_IN_MAC, T_IN, T_IN_MAC),
                                             (t.s_out, S_OUT_MAC, T_OUT, T_OUT_MAC)):
                ipr.link("add", ifname=s_if, address=s_mac, kind="veth",
                         peer={"ifname": t_if, "address": t_mac, "net_ns_fd": t.netns})
        namespaces.write_sysctls(t.netns, {f"net.ipv4.conf.{dev}.{k}": v
                                           for dev in (T_IN, T_OUT)
                                           for k, v in ipv4_conf.items()})
        with namespaces.netlink(t.netns) as ipr:
            index = {dev: ipr.link_lookup(ifname=dev)[0] for dev in ("lo", T_IN, T_OUT)}
            for dev in (T_IN, T_OUT):
                ipr.link("set", index=index[dev], flags=0, change=_IFF_MULTICAST)
            namespaces.write_sysctls(t.netns, {"net.ipv6.conf.all.forwarding": 1})
            for w in (IPV4, IPV6):
                for dev, address in zip(w.t_devices, (w.t_in, w.t_out)):
                    ipr.addr("add", index=index[dev], address=address, prefixlen=w.t_prefix,
                             flags=w.t_flags)
            for dev in (T_IN, T_OUT):
                ipr.link("set", index=index[dev], state="up")
            for w in (IPV4, IPV6):
                self._route_target(ipr, w, index)
        for family in (Family.IPV4, Family.IPV6):
            with entered(t.netns):
                s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            s.setsockopt(socket.SOL_SOCKET, _SO_MARK, LAB_MARK)
            t.emit[family] = s

    @staticmethod
    def _route_target(ipr, w: Wiring, index: Mapping[str, int]) -> None:
        """Static neighbours, table 100 and the rules that reach it, for one family."""
        host = 32 if w.family is Family.IPV4 else 128
        for address, mac, dev in ((w.s_in, S_IN_MAC, T_IN), (w.s_out, S_OUT_MAC, T_OUT)):
            ipr.neigh("replace", dst=address, lladdr=mac, ifindex=index[dev],
                      state=_NUD_PERMANENT)
        ipr.route("add", dst=f"{w.s_in}/{host}", oif=index[T_IN], table=ROUTE_TABLE)
        ipr.route("add", dst=w.net, gateway=w.s_out, oif=index[T_OUT], table=ROUTE_TABLE,
                  flags=_RTNH_F_ONLINK)
        for dev in (T_IN, T_OUT):
            ipr.rule("add", family=w.family, iifname=dev, table=ROUTE_TABLE, priority=100)
        ipr.rule("add", family=w.family, fwmark=LAB_MARK, table=ROUTE_TABLE, priority=101)

    def close(self) -> None:
        errors = []
        for t in self._targets.values():
            try:
                t.backend.close(self, t.name)
            except Exception as e:  # keep tearing down; report at the end
                errors.append(e)
            for s in [*t.inject.values(), *t.emit.values(), *t.wire, *t.local.values()]:
                s.close()
            t.inject, t.emit, t.wire, t.local = {}, {}, [], {}
        while self._namespaces:
            name = self._namespaces.pop()
            try:
                namespaces.delete(name)
            except OSError as e:
                errors.append(RuntimeError(f"deleting netns {name}: {e}"))
        if errors:
            raise errors[0]

    # -- rulesets and counters

    def load(self, ruleset: str, family: Family = Family.IPV4) -> None:
        for t in self._targets.values():
            t.backend.load(self, t.name, ruleset, family)

    def counters(self, target: str, family: Family = Family.IPV4) -> list[tuple[int, int]]:
        return [tuple(c) for c in self._targets[target].backend.counters(self, target, family)]

    # -- traffic

    def send(self, target: str, packet: Packet, path: str) -> bool:
        """Send one packet to one target; whether it arrived."""
        return self.run([Case(packet, path)], [target])[target][0]

    def run(self, cases: Sequence[Case], targets: "Iterable[str] | None" = None
            ) -> dict[str, list[bool]]:
        """Send every case to every target; which arrived, per target, in case order."""
        for c in cases:
            _check_case(c)
        names = list(self._targets) if targets is None else list(targets)
        built = []
        for c in cases:
            tag = next(self._tags)
            built.append(c.packet.build((tag - 1) % 0xFFFF + 1, tag))
        arrived = {n: [False] * len(cases) for n in names}
        # expected[(target, "local" | "wire")][(family, tag)] = [(what must arrive, case index)]
        expected: dict[tuple[str, str], dict[tuple[Family, int], list[tuple[bytes, int]]]] = {}
        for n in names:
            t = self._targets[n]
            for i, (c, pkt) in enumerate(zip(cases, built)):
                family = c.packet.family
                arrivals = ARRIVALS[family]
                if c.path == "input":
                    seen = arrivals.local_expected(pkt)
                    if seen is None:
                        continue
                    proto, what = seen
                    if (family, proto) not in t.local:
                        with entered(t.netns):
                            t.local[family, proto] = _rcvbuf(arrivals.local_socket(proto))
                    kind = "local"
                else:
                    what, kind = arrivals.sent_part(pkt), "wire"
                expected.setdefault((n, kind), {}).setdefault(
                    (family, arrivals.tag(what)), []).append((what, i))
        # every socket of the run: (target, kind, its reader)
        socks: dict[socket.socket, tuple[str, str, Callable]] = {}
        for n in names:
            t = self._targets[n]
            socks.update({s: (n, "local", ARRIVALS[family].local_read)
                          for (family, _), s in t.local.items()})
            socks.update({s: (n, "wire", _wire_read) for s in t.wire})
        for s, (_, _, read) in socks.items():
            _drain(s, read, None)

        def receive(s: socket.socket) -> None:
            n, kind, read = socks[s]
            table = expected.get((n, kind), {})

            def match(family: Family, what: bytes) -> None:
                for want, i in table.get((family, ARRIVALS[family].tag(what)), ()):
                    if what == want:
                        arrived[n][i] = True
            _drain(s, read, match)

        for k, (c, pkt) in enumerate(zip(cases, built)):
            for n in names:
                self._emit(self._targets[n], c, pkt)
            if k % 64 == 63:
                for s in socks:
                    receive(s)
        deadline = time.monotonic() + self.grace
        while (left := deadline - time.monotonic()) > 0 and \
                not all(all(a) for a in arrived.values()):
            ready, _, _ = select.select(list(socks), [], [], left)
            for s in ready:
                receive(s)
        return arrived

    @staticmethod
    def _emit(t: _Target, case: Case, pkt: bytes) -> None:
        p = case.packet
        if case.path == "output":
            try:
                t.emit[p.family].sendto(pkt, (p.dst, 0))
            except PermissionError:
                pass  # LOCAL_OUT dropped it: that is an observation, not an error
        else:
            side = "out" if case.path == "reverse" else "in"
            if p.eth_dst is not None:
                dst = _mac(p.eth_dst)
            elif p.family is Family.IPV6 and _multicast(p.dst):   # RFC 2464 7
                dst = b"\x33\x33" + socket.inet_pton(socket.AF_INET6, p.dst)[12:]
            else:
                dst = _mac(T_OUT_MAC if side == "out" else T_IN_MAC)
            src = _mac(S_OUT_MAC if side == "out" else S_IN_MAC)
            t.inject[side].send(dst + src + struct.pack("!H", _ETHERTYPE[p.family]) + pkt)


def _wire_read(s: socket.socket) -> "tuple[Family, bytes] | None":
    frame = s.recv(65535)
    family = _FAMILY_OF_ETHERTYPE.get(struct.unpack_from("!H", frame, 12)[0]) \
        if len(frame) >= 14 else None
    if family is None:
        return None
    what = ARRIVALS[family].sent_part(frame[14:])
    return None if what is None else (family, what)


def _drain(s: socket.socket, read: Callable, handle: "Callable | None") -> None:
    while True:
        try:
            got = read(s)
        except BlockingIOError:
            return
        if got is not None and handle is not None:
            handle(*got)
