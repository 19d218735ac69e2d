"""A namespace lab for differential tests of the filter table.

One sender namespace S and several target namespaces that are wired
identically (same addresses, interface names and MACs), so that the same
frame sent to each target meets the same routing and the same `-i`/`-o`
names; only the filter behind the hooks differs.

Per target T (names as seen from T):

    S:s<k>i  <-- veth -->  T:vin0   198.18.0.1/24   (S side: 198.18.0.2)
    S:s<k>o  <-- veth -->  T:vout0  198.19.0.1/24   (S side: 198.19.0.2)

Paths:
  input    S injects a frame on s<k>i; T delivers it locally; raw sockets in
           T (one per IP protocol) see it after LOCAL_IN.
  forward  S injects on s<k>i; T routes it out vout0 (or back out vin0 for
           198.18.0.2); S captures it on s<k>o / s<k>i.
  reverse  S injects on s<k>o, to 198.18.0.2; T routes it out vin0; S captures
           it on s<k>i: the other way through FORWARD, for replies.
  output   a raw IP_HDRINCL socket inside T emits it (LOCAL_OUT); S captures
           it on s<k>o / s<k>i.

Only test packets may cross T's hooks, or the counters would not be exact:
IPv6 is off (no ND/MLD), neighbours are static (no ARP), S has no addresses
and no routes (it never answers), and T's main routing table is empty, so
everything T's own stack would send back (TCP RSTs, echo replies, ICMP
errors) fails its route lookup before LOCAL_OUT.  T's real routes live in
table 100, reached by frames arriving on vin0 or vout0 and by the lab's raw socket
(SO_MARK 0x42).
"""
from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from bpfilter.abi import codec, sockopt
from bpfilter.loader import load_filter_table
from bpfilter.netns import entered

from . import namespaces
from .scratch import replace_blob


PATHS = ("input", "forward", "reverse", "output")

T_IN, T_OUT = "vin0", "vout0"
T_IN_ADDR, S_IN_ADDR = "198.18.0.1", "198.18.0.2"
T_OUT_ADDR, S_OUT_ADDR = "198.19.0.1", "198.19.0.2"
T_IN_MAC, S_IN_MAC = "02:bf:00:00:01:01", "02:bf:00:00:01:02"
T_OUT_MAC, S_OUT_MAC = "02:bf:00:00:02:01", "02:bf:00:00:02:02"
LAB_NET = "198.18.0.0/15"
# Destinations a target treats as its own (local or broadcast); everything
# else in LAB_NET is forwarded / sent out.
T_LOCAL = frozenset({T_IN_ADDR, T_OUT_ADDR, "198.18.0.0", "198.18.0.255",
                     "198.19.0.0", "198.19.0.255"})
ROUTE_TABLE = 100
LAB_MARK = 0x42

PROTO_NUMBERS = {"icmp": socket.IPPROTO_ICMP, "tcp": socket.IPPROTO_TCP,
                 "udp": socket.IPPROTO_UDP}

_SO_MARK = 36
_SO_RCVBUFFORCE = 33
_SOL_PACKET = 263
_PACKET_IGNORE_OUTGOING = 23
_ETH_P_IP = 0x0800
_RCVBUF = 8 << 20
_IFA_F_NOPREFIXROUTE = 0x200
_NUD_PERMANENT = 0x80
_RTNH_F_ONLINK = 0x04
_INJECT_SRC = {side: bytes.fromhex(mac.replace(":", "")) + struct.pack("!H", _ETH_P_IP)
               for side, mac in (("in", S_IN_MAC), ("out", S_OUT_MAC))}

_seq = itertools.count()


# ---------------------------------------------------------------- packets

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass(frozen=True)
class Packet:
    """An IPv4 packet to build; see build() for the tag it carries."""
    src: str
    dst: str
    proto: "str | int" = "udp"
    sport: int = 40000
    dport: int = 80
    tcp_flags: int = 0x02
    icmp_type: int = 8
    icmp_code: int = 0
    ttl: int = 64
    frag_offset: int = 0          # in 8-byte units
    more_fragments: bool = False
    options: bytes = b""          # raw IP options, padded to 4 bytes with EOL
    payload_len: int = 16
    truncate_l4: "int | None" = None  # keep only this many transport header bytes
    seq: int = 1                  # tcp sequence and acknowledgement numbers
    ack: int = 0
    quoted: bytes = b""           # an ICMP error's quote of the packet it is about
    eth_dst: "str | None" = None  # the frame's destination MAC; default: T's on that side
    tcp_options: bytes = b""      # raw, after the 20-byte tcp header
    tcp_doff: "int | None" = None  # the data offset field; default: header and options

    @property
    def proto_number(self) -> int:
        return PROTO_NUMBERS.get(self.proto, self.proto) if isinstance(self.proto, str) \
            else self.proto

    @property
    def header_len(self) -> int:
        return {6: 20, 17: 8, 1: 8}.get(self.proto_number, 0)

    def build(self, ident: int, nonce: int) -> bytes:
        """The packet, tagged by IP ID `ident` and `nonce` in the payload.

        The payload starts with four zero bytes so that, as the body of an
        ICMP error, it never parses as an embedded IP header (which could
        make T update route exceptions); the nonce follows. Only `quoted`,
        for conntrack's RELATED, puts a header there.
        """
        payload = (bytes(4) + struct.pack("!I", nonce & 0xFFFFFFFF)).ljust(
            self.payload_len, b"\0")[:self.payload_len]
        payload = self.quoted + payload if self.quoted else payload
        if self.frag_offset:
            body = payload
        else:
            body = self._transport(payload)
            if self.truncate_l4 is not None:
                if not 0 <= self.truncate_l4 < self.header_len:
                    raise ValueError(f"truncate_l4={self.truncate_l4} for proto "
                                     f"{self.proto} (header {self.header_len})")
                body = body[:self.truncate_l4]
        opts = self.options + bytes(-len(self.options) % 4)
        frag = (0x2000 if self.more_fragments else 0) | self.frag_offset
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45 + len(opts) // 4, 0,
                          20 + len(opts) + len(body), ident, frag, self.ttl,
                          self.proto_number, 0, socket.inet_aton(self.src),
                          socket.inet_aton(self.dst)) + opts
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        return hdr + body

    def _transport(self, payload: bytes) -> bytes:
        p = self.proto_number
        if p == 6:
            doff = 5 + len(self.tcp_options) // 4 if self.tcp_doff is None else self.tcp_doff
            seg = struct.pack("!HHIIBBHHH", self.sport, self.dport, self.seq, self.ack, doff << 4,
                              self.tcp_flags, 65535, 0, 0) + self.tcp_options + payload
        elif p == 17:
            seg = struct.pack("!HHHH", self.sport, self.dport, 8 + len(payload), 0) + payload
        elif p == 1:
            seg = struct.pack("!BBHI", self.icmp_type, self.icmp_code, 0, 0) + payload
            return seg[:2] + struct.pack("!H", _csum(seg)) + seg[4:]
        else:
            return payload
        pseudo = socket.inet_aton(self.src) + socket.inet_aton(self.dst) + \
            struct.pack("!BBH", 0, p, len(seg))
        off = 16 if p == 6 else 6
        c = _csum(pseudo + seg) or (0xFFFF if p == 17 else 0)
        return seg[:off] + struct.pack("!H", c) + seg[off + 2:]


@dataclass(frozen=True)
class Case:
    packet: Packet
    path: str  # one of PATHS


def _masked(pkt: bytes) -> bytes:
    """TTL and header checksum change on the forward path; nothing else may."""
    return pkt[:8] + b"\0" + pkt[9:10] + b"\0\0" + pkt[12:]


def _check_case(case: Case) -> None:
    p = case.packet
    if case.path not in PATHS:
        raise ValueError(f"unknown path {case.path!r}")
    if case.path == "input":
        if p.dst not in (T_IN_ADDR, T_OUT_ADDR):
            raise ValueError(f"input case needs a local dst, got {p.dst}")
        if p.frag_offset or p.more_fragments:
            raise ValueError("fragments are reassembled before LOCAL_IN; "
                             "use the forward or output path")
        if p.proto_number in (0, socket.IPPROTO_RAW):
            raise ValueError(f"no raw socket can receive protocol {p.proto_number}")
        if p.proto_number == 1 and p.truncate_l4 is not None:
            raise ValueError("raw ICMP sockets drop truncated ICMP (icmp_filter); "
                             "use the forward or output path")
    elif case.path == "reverse" and p.dst != S_IN_ADDR:
        raise ValueError(f"reverse case goes to {S_IN_ADDR}, not {p.dst}")
    elif p.dst in T_LOCAL:
        raise ValueError(f"{case.path} case needs a non-local dst, got {p.dst}")


# ---------------------------------------------------------------- backends

def kernel_counters(netns: str, table: str = "filter") -> list[tuple[int, int]]:
    """(packets, bytes) per entry of the kernel's iptables `table` in `netns`."""
    with entered(netns):
        size = codec.parse_getinfo(sockopt.get_info(table))["size"]
        entries = codec.parse_get_entries(sockopt.get_entries(table, size))["entries"]
    out, off = [], 0
    while off < len(entries):
        out.append(struct.unpack_from("<QQ", entries, off + 96))
        off += struct.unpack_from("<H", entries, off + 90)[0]
    return out


class KernelBackend:
    """The kernel's own iptables in the target namespace: the reference."""

    def load(self, lab: "Lab", target: str, ruleset: str) -> None:
        lab.iptables_restore(lab.netns(target), ruleset)

    def counters(self, lab: "Lab", target: str) -> list[tuple[int, int]]:
        return kernel_counters(lab.netns(target))

    def close(self, lab: "Lab", target: str) -> None:
        pass


class BpfilterBackend:
    """bpfilter's BPF programs, loaded from the blob the kernel made of the ruleset."""

    def __init__(self) -> None:
        self.loaded = None

    def load(self, lab: "Lab", target: str, ruleset: str) -> None:
        blob = replace_blob(ruleset)
        self.close(lab, target)
        self.loaded = load_filter_table(blob, lab.netns(target))

    def counters(self, lab: "Lab", target: str) -> list[tuple[int, int]]:
        return list(self.loaded.counters())

    def close(self, lab: "Lab", target: str) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None


BACKENDS: dict[str, Callable[[], object]] = {"kernel": KernelBackend,
                                              "bpfilter": BpfilterBackend}


# ---------------------------------------------------------------- the lab

def _rcvbuf(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
    s.setblocking(False)
    return s


class _Target:
    def __init__(self, name: str, index: int, netns: str, backend) -> None:
        self.name, self.index, self.netns, self.backend = name, index, netns, backend
        self.s_in, self.s_out = f"s{index}i", f"s{index}o"
        self.inject: dict[str, socket.socket] = {}  # S, AF_PACKET on s_in ("in"), s_out
        self.wire: list[socket.socket] = []         # S, AF_PACKET captures
        self.emit: "socket.socket | None" = None     # T, raw IP_HDRINCL
        self.local: dict[int, socket.socket] = {}    # T, raw per protocol


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
        namespaces.write_sysctls(name, {"net.ipv6.conf.all.disable_ipv6": 1,
                                        "net.ipv6.conf.default.disable_ipv6": 1,
                                        "net.ipv4.ip_forward": 0})

    def _build(self) -> None:
        self._add_netns(self.sender)
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
                                      socket.htons(_ETH_P_IP))
                    s.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
                    s.bind((ifname, _ETH_P_IP))
                    t.wire.append(_rcvbuf(s))

    def _build_target(self, t: _Target) -> None:
        self._add_netns(t.netns)
        conf = {"forwarding": 1, "rp_filter": 0, "accept_local": 1,
                "send_redirects": 0, "accept_redirects": 0}
        namespaces.write_sysctls(t.netns, {f"net.ipv4.conf.{dev}.{k}": v
                                           for dev in ("all", "default") for k, v in conf.items()})
        with namespaces.netlink(self.sender) as ipr:
            for s_if, s_mac, t_if, t_mac in ((t.s_in, S_IN_MAC, T_IN, T_IN_MAC),
                                             (t.s_out, S_OUT_MAC, T_OUT, T_OUT_MAC)):
                ipr.link("add", ifname=s_if, address=s_mac, kind="veth",
                         peer={"ifname": t_if, "address": t_mac, "net_ns_fd": t.netns})
        namespaces.write_sysctls(t.netns, {f"net.ipv4.conf.{dev}.{k}": v
                                           for dev in (T_IN, T_OUT) for k, v in conf.items()}
                                 | {f"net.ipv6.conf.{dev}.disable_ipv6": 1
                                    for dev in (T_IN, T_OUT)})
        with namespaces.netlink(t.netns) as ipr:
            index = {dev: ipr.link_lookup(ifname=dev)[0] for dev in (T_IN, T_OUT)}
            for dev, address in ((T_IN, T_IN_ADDR), (T_OUT, T_OUT_ADDR)):
                ipr.addr("add", index=index[dev], address=address, prefixlen=24,
                         flags=_IFA_F_NOPREFIXROUTE)
                ipr.link("set", index=index[dev], state="up")
            for address, mac, dev in ((S_IN_ADDR, S_IN_MAC, T_IN), (S_OUT_ADDR, S_OUT_MAC, T_OUT)):
                ipr.neigh("replace", dst=address, lladdr=mac, ifindex=index[dev],
                          state=_NUD_PERMANENT)
            ipr.route("add", dst=f"{S_IN_ADDR}/32", oif=index[T_IN], table=ROUTE_TABLE)
            ipr.route("add", dst=LAB_NET, gateway=S_OUT_ADDR, oif=index[T_OUT],
                      table=ROUTE_TABLE, flags=_RTNH_F_ONLINK)
            for dev in (T_IN, T_OUT):
                ipr.rule("add", iifname=dev, table=ROUTE_TABLE, priority=100)
            ipr.rule("add", fwmark=LAB_MARK, table=ROUTE_TABLE, priority=101)
        with entered(t.netns):
            t.emit = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            t.emit.setsockopt(socket.SOL_SOCKET, _SO_MARK, LAB_MARK)

    def close(self) -> None:
        errors = []
        for t in self._targets.values():
            try:
                t.backend.close(self, t.name)
            except Exception as e:  # keep tearing down; report at the end
                errors.append(e)
            for s in [*t.inject.values(), t.emit, *t.wire, *t.local.values()]:
                if s is not None:
                    s.close()
            t.inject, t.emit = {}, None
            t.wire, t.local = [], {}
        while self._namespaces:
            name = self._namespaces.pop()
            try:
                namespaces.delete(name)
            except OSError as e:
                errors.append(RuntimeError(f"deleting netns {name}: {e}"))
        if errors:
            raise errors[0]

    # -- rulesets and counters

    @staticmethod
    def iptables_restore(netns: str, ruleset: str) -> None:
        argv = ["ip", "netns", "exec", netns, "iptables-legacy-restore", "-w", "10"]
        done = subprocess.run(argv, input=ruleset, text=True, capture_output=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}")

    def load(self, ruleset: str) -> None:
        for t in self._targets.values():
            t.backend.load(self, t.name, ruleset)

    def counters(self, target: str) -> list[tuple[int, int]]:
        return [tuple(c) for c in self._targets[target].backend.counters(self, target)]

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
        # expected[(target, "local" | "wire")][ip id] = [(masked bytes, case index)]
        expected: dict[tuple[str, str], dict[int, list[tuple[bytes, int]]]] = {}
        for n in names:
            t = self._targets[n]
            for proto in {c.packet.proto_number for c in cases if c.path == "input"}:
                if proto not in t.local:
                    with entered(t.netns):
                        t.local[proto] = _rcvbuf(socket.socket(
                            socket.AF_INET, socket.SOCK_RAW, proto))
            for i, (c, pkt) in enumerate(zip(cases, built)):
                kind = "local" if c.path == "input" else "wire"
                expected.setdefault((n, kind), {}).setdefault(
                    struct.unpack_from("!H", pkt, 4)[0], []).append((_masked(pkt), i))
        socks = {}
        for n in names:
            t = self._targets[n]
            socks.update({s: (n, "local", 0) for s in t.local.values()})
            socks.update({s: (n, "wire", 14) for s in t.wire})
        for s in socks:
            self._drain(s, None)

        def receive(s: socket.socket) -> None:
            n, kind, strip = socks[s]
            table = expected.get((n, kind), {})

            def match(frame: bytes) -> None:
                pkt = frame[strip:]
                if len(pkt) < 20:
                    return
                pkt = pkt[:struct.unpack_from("!H", pkt, 2)[0]]
                for want, i in table.get(struct.unpack_from("!H", pkt, 4)[0], ()):
                    if _masked(pkt) == want:
                        arrived[n][i] = True
            self._drain(s, match)

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
        if case.path == "output":
            try:
                t.emit.sendto(pkt, (case.packet.dst, 0))
            except PermissionError:
                pass  # LOCAL_OUT dropped it: that is an observation, not an error
        else:
            side = "out" if case.path == "reverse" else "in"
            dst = case.packet.eth_dst or (T_OUT_MAC if side == "out" else T_IN_MAC)
            t.inject[side].send(bytes.fromhex(dst.replace(":", "")) + _INJECT_SRC[side] + pkt)

    @staticmethod
    def _drain(s: socket.socket, handle: "Callable[[bytes], None] | None") -> None:
        while True:
            try:
                data = s.recv(65535)
            except BlockingIOError:
                return
            if handle is not None:
                handle(data)


# ---------------------------------------------------------------- the service

def service_request(socket_path: str, netns_path: str, op: int, optname: int = 0,
                    payload: bytes = b"", family: int = 2) -> tuple[int, bytes]:
    """One request to a running `bpfilter serve` (kmod/bpfilter_proto.h), made as
    the preload shim makes it: the namespace `netns_path` names rides along by
    SCM_RIGHTS. Returns (status, reply payload)."""
    from bpfilter import proto

    ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = proto.request.build(dict(
            version=proto.VERSION, op=op, family=family, optname=optname, netns_cookie=0,
            netns_inum=os.fstat(ns_fd).st_ino, pid=os.getpid(), len=len(payload), netns_fd=-1))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(socket_path)
            request = header + payload
            sent = s.sendmsg([request],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", ns_fd))])
            if sent < len(request):   # a large table's GET_ENTRIES outgrows the socket buffer
                s.sendall(request[sent:])
            data = b""
            while len(data) < proto.reply.sizeof():
                chunk = s.recv(proto.reply.sizeof() - len(data))
                if not chunk:
                    raise ConnectionResetError(f"{socket_path} hung up without a reply")
                data += chunk
            reply = proto.reply.parse(data)
            body = b""
            while len(body) < reply.len:
                chunk = s.recv(reply.len - len(body))
                if not chunk:
                    raise ConnectionResetError(f"{socket_path} hung up mid-reply")
                body += chunk
    finally:
        os.close(ns_fd)
    return reply.status, body


def service_counters(socket_path: str, netns_path: str,
                     table: str = "filter") -> list[tuple[int, int]]:
    """(packets, bytes) per entry of the service's `table` for the namespace at
    netns_path, read with IPT_SO_GET_INFO/GET_ENTRIES as iptables reads them."""
    from bpfilter import proto
    from bpfilter.abi import xtables as X

    status, info = service_request(socket_path, netns_path, proto.Op.GETSOCKOPT,
                                   X.IPT_SO_GET_INFO, codec.getinfo_request(table))
    if status:
        raise OSError(-status, f"IPT_SO_GET_INFO: {info.decode(errors='replace')}")
    size = codec.parse_getinfo(info)["size"]
    status, reply = service_request(socket_path, netns_path, proto.Op.GETSOCKOPT,
                                    X.IPT_SO_GET_ENTRIES, codec.get_entries_request(table, size))
    if status:
        raise OSError(-status, f"IPT_SO_GET_ENTRIES: {reply.decode(errors='replace')}")
    entries = codec.parse_get_entries(reply)["entries"]
    out, off = [], 0
    while off < len(entries):
        out.append(struct.unpack_from("<QQ", entries, off + 96))
        off += struct.unpack_from("<H", entries, off + 90)[0]
    return out


class ServiceBackend:
    """bpfilter's service, reached as a person reaches it: the unmodified
    iptables-legacy-restore under `bpfilter exec` loads the ruleset (starting a
    service on `socket_path` if none answers there), and the counters come back
    from the service with the same socket options iptables uses."""

    def __init__(self, socket_path: str, bpffs: "str | None" = None,
                 env: "Mapping[str, str] | None" = None) -> None:
        self.socket_path, self.bpffs = socket_path, bpffs
        self.env = dict(os.environ if env is None else env, BPFILTER_SOCKET=socket_path)
        if bpffs is not None:
            self.env["BPFILTER_BPFFS"] = bpffs

    def exec(self, lab: "Lab", target: str, argv: Sequence[str],
             stdin: "str | None" = None) -> subprocess.CompletedProcess:
        """argv in the target's namespace under `bpfilter exec`."""
        import sys
        return subprocess.run(["ip", "netns", "exec", lab.netns(target), sys.executable, "-m",
                               "bpfilter", "exec", "--", *argv],
                              input=stdin, text=True, capture_output=True, env=self.env,
                              timeout=60)

    def load(self, lab: "Lab", target: str, ruleset: str) -> None:
        done = self.exec(lab, target, ["iptables-legacy-restore", "-w", "10"], ruleset)
        if done.returncode:
            raise RuntimeError(f"iptables-legacy-restore through bpfilter exec failed "
                               f"({done.returncode}): {done.stderr.strip()}")

    def counters(self, lab: "Lab", target: str) -> list[tuple[int, int]]:
        from bpfilter.netns import path_of
        return service_counters(self.socket_path, path_of(lab.netns(target)))

    def close(self, lab: "Lab", target: str) -> None:
        pass   # the service drops the table once the lab deletes the namespace
