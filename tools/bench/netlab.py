"""Namespaces for the packet-rate measurement: one sender/receiver pair per system.

    <prefix>-<system>-s                                         <prefix>-<system>-r
      v0 198.18.0.2/24, 198.18.0.3/24   <-- veth -->   v0 198.18.0.1/24
      lo 2001:db8:1::2/128, ::3/128                     lo 2001:db8:1::1/128

Every pair is wired identically, so the same ruleset means the same thing in every
receiver, and systems never share a netns: iptables-legacy, nftables and bpfilter
tables are per netns, so all of them stay loaded side by side and the measurements
can be interleaved. The namespaces are made and wired through netlink (pyroute2, as
bpfilter_lab.namespaces does); commands run in them with `ip netns exec`.

Only the measured flows cross the veth. Neighbours are static (no ARP, no neighbour
discovery), and IPv6 starts nothing of its own, as in bpfilter_lab.lab: v0 has no
IPv6 address, not even a link-local one (no DAD, no MLD report for a
solicited-node group, no router solicitation); the IPv6 addresses live on lo, reached
through a route over v0.

The count is the receiver netns' Ip InDelivers (Ip6InDelivers for IPv6 flows):
packets that passed the INPUT hook and reached UDP (the sink never reads; once its
buffer is full UDP drops at the socket, after the hook). veth delivers in the
sender's softirq, so one core (SEND_CPU) runs the whole path, send, receive and
filter, and the rate is taken per second of the CPU time that core gave the flood
and ksoftirqd: other load on a shared machine then takes time away from a
measurement without changing its result. The plain per-second rate is kept too.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from bpfilter_lab import namespaces

from rules import IPV4, IPV6, PORTS, Flow

# UDP payload per family: 14 + 20 + 8 + 18 = 60-byte IPv4 frame, 64 on the wire with
# its FCS; IPv6's smallest, 14 + 40 + 8 = 62, 66 on the wire
PAYLOAD = {IPV4: 18, IPV6: 0}
S_MAC, R_MAC = "02:bb:00:00:00:02", "02:bb:00:00:00:01"
S_ADDRS = {IPV4: ("198.18.0.2", "198.18.0.3"), IPV6: ("2001:db8:1::2", "2001:db8:1::3")}
R_ADDRS = {IPV4: ("198.18.0.1",), IPV6: ("2001:db8:1::1",)}
SEND_CPU = 0
WARMUP = 0.15
SETTLE_TIMEOUT = 10.0
UP_TIMEOUT = 5.0

_NUD_PERMANENT = 0x80
_IFA_F_NODAD = 0x02
# v0 begins no IPv6 traffic of its own (see the module's docstring)
_IPV6_QUIET = {"accept_ra": 0, "accept_dad": 0, "dad_transmits": 0, "router_solicitations": 0,
               "addr_gen_mode": 1, "autoconf": 0}
# /proc/PID/net/<file>: the counter of packets delivered to UDP, per family
_DELIVERED = {IPV4: ("snmp", "Ip", "InDelivers"), IPV6: ("snmp6", None, "Ip6InDelivers")}


def run(argv: list[str], stdin: "str | None" = None) -> None:
    done = subprocess.run(argv, input=stdin, text=True, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")


def build_flood(src: str, out_dir: str) -> str:
    binary = os.path.join(out_dir, "udpflood")
    run(["cc", "-O2", "-Wall", "-Werror", "-o", binary, src])
    return binary


def _wait_up(netns: str, ifname: str, timeout: float = UP_TIMEOUT) -> None:
    """Until linkwatch has run for the device it sits on the noop qdisc, which drops
    everything sent: the first measurement would see nothing arrive."""
    deadline = time.monotonic() + timeout
    with namespaces.netlink(netns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        while ipr.get_links(index)[0].get_attr("IFLA_OPERSTATE") != "UP":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ifname} in {netns} did not come up")
            time.sleep(0.02)


def _ksoftirqd(cpu: int) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == f"ksoftirqd/{cpu}":
                    return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no ksoftirqd/{cpu}")


def _runtime(pid: int) -> float:
    """Seconds on a CPU. Without IRQ time accounting the softirq work a task runs
    (here: the whole receive path, veth delivering in the sender's context) is
    charged to that task."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


@dataclass
class Pair:
    sender: str
    receiver: str
    sink: "subprocess.Popen | None" = None

    def delivered(self, family: int) -> int:
        """The receiver netns' count of packets delivered to UDP, for `family`, read
        through the sink that lives there."""
        name, row, field = _DELIVERED[family]
        with open(f"/proc/{self.sink.pid}/net/{name}") as f:
            if row is None:   # snmp6: one "name value" a line
                return int(next(line.split()[1] for line in f if line.split()[0] == field))
            lines = [line.split() for line in f if line.startswith(f"{row}:")]
        names, values = lines[0], lines[1]
        return int(values[names.index(field)])


class Lab:
    """The pairs, as a context manager that deletes every namespace it made."""

    def __init__(self, prefix: str, systems: list[str], flood: str) -> None:
        self.prefix, self.flood = prefix, flood
        self.pairs = {s: Pair(f"{prefix}-{s}-s", f"{prefix}-{s}-r") for s in systems}
        self._made: list[str] = []
        self.ksoftirqd = _ksoftirqd(SEND_CPU)

    def __enter__(self) -> "Lab":
        try:
            for pair in self.pairs.values():
                self._build(pair)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _netns(self, name: str) -> None:
        namespaces.add(name)
        self._made.append(name)
        namespaces.write_sysctls(name, {f"net.ipv6.conf.{dev}.{key}": value
                                        for dev in ("all", "default")
                                        for key, value in _IPV6_QUIET.items()})

    def _build(self, pair: Pair) -> None:
        self._netns(pair.sender)
        self._netns(pair.receiver)
        with namespaces.netlink(pair.sender) as ipr:
            ipr.link("add", ifname="v0", address=S_MAC, kind="veth",
                     peer={"ifname": "v0", "address": R_MAC, "net_ns_fd": pair.receiver})
        for netns, local, peers, peer_mac in (
                (pair.sender, S_ADDRS, R_ADDRS, R_MAC),
                (pair.receiver, R_ADDRS, S_ADDRS, S_MAC)):
            with namespaces.netlink(netns) as ipr:
                v0, lo = ipr.link_lookup(ifname="v0")[0], ipr.link_lookup(ifname="lo")[0]
                for family, addresses in local.items():
                    for address in addresses:
                        if family == IPV6:
                            ipr.addr("add", index=lo, address=address, prefixlen=128,
                                     flags=_IFA_F_NODAD)
                        else:
                            ipr.addr("add", index=v0, address=address, prefixlen=24)
                ipr.link("set", index=v0, state="up")
                for family, addresses in peers.items():
                    for address in addresses:
                        if family == IPV6:
                            ipr.route("add", dst=f"{address}/128", oif=v0, family=socket.AF_INET6)
                        ipr.neigh("replace", dst=address, lladdr=peer_mac, ifindex=v0,
                                  state=_NUD_PERMANENT)
        for ns in (pair.sender, pair.receiver):
            _wait_up(ns, "v0")
        pair.sink = subprocess.Popen(
            ["ip", "netns", "exec", pair.receiver, self.flood, "sink", *map(str, PORTS)],
            stdout=subprocess.PIPE, text=True)
        if pair.sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the sink in {pair.receiver} did not start")

    def close(self) -> None:
        errors = []
        for pair in self.pairs.values():
            if pair.sink is not None and pair.sink.poll() is None:
                pair.sink.terminate()
                try:
                    pair.sink.wait(5)
                except subprocess.TimeoutExpired:
                    pair.sink.kill()
                    pair.sink.wait()
            pair.sink = None
        while self._made:
            name = self._made.pop()
            try:
                namespaces.delete(name)
            except OSError as e:
                errors.append(f"deleting netns {name}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))

    def receiver(self, system: str) -> str:
        return self.pairs[system].receiver

    # -- the measurement

    def rate(self, system: str, flow: Flow, window: float) -> dict:
        """What `system`'s receiver delivered while the sender flooded `flow`, over
        `window` seconds of steady state: packets per second of wall clock, and per
        second of CPU time spent on the sending core by the flood and ksoftirqd
        (what the whole path cost, whoever else wanted that core)."""
        pair = self.pairs[system]
        family = flow.family
        sender = subprocess.Popen(
            ["ip", "netns", "exec", pair.sender, self.flood, "send", flow.src, str(flow.sport),
             flow.dst, str(flow.dport), str(PAYLOAD[family]), str(WARMUP + window + 30),
             str(SEND_CPU)], stdout=subprocess.PIPE, text=True)
        try:
            # the warm-up counts from the flood's start, however late a busy machine
            # starts it
            if sender.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the flood into {pair.receiver} did not start")
            time.sleep(WARMUP)
            c0, t0, cpu0 = pair.delivered(family), time.monotonic(), self._cpu(sender.pid)
            time.sleep(window)
            c1, t1, cpu1 = pair.delivered(family), time.monotonic(), self._cpu(sender.pid)
        finally:
            sender.send_signal(signal.SIGTERM)
            sender.communicate()
        if sender.returncode:
            raise RuntimeError(f"the flood into {pair.receiver} failed ({sender.returncode})")
        self._settle(pair, family)
        cpu = cpu1 - cpu0
        return {"pps": (c1 - c0) / (t1 - t0), "pps_cpu": (c1 - c0) / cpu if cpu > 0 else 0.0,
                "cpu_share": cpu / (t1 - t0)}

    def _cpu(self, pid: int) -> float:
        return _runtime(pid) + _runtime(self.ksoftirqd)

    @staticmethod
    def _settle(pair: Pair, family: int) -> None:
        """Wait until the packets queued in the backlog have been processed: behind a
        slow filter that is up to a second of softirq work, and it would be charged
        to the next measurement."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last = pair.delivered(family)
        while time.monotonic() < deadline:
            time.sleep(0.03)
            now = pair.delivered(family)
            if now == last:
                return
            last = now
