"""Namespaces for the packet-rate measurement: one sender/receiver pair per system.

    <prefix>-<system>-s  v0 198.18.0.2/24, 198.18.0.3/24  <-- veth -->  v0 198.18.0.1/24  <prefix>-<system>-r

Every pair is wired identically, so the same ruleset means the same thing in every
receiver, and systems never share a netns: iptables-legacy, nftables and bpfilter
tables are per netns, so all of them stay loaded side by side and the measurements
can be interleaved. Only the measured flows cross the veth: IPv6 is off and the
neighbours are static (no ARP, ND or MLD).

The count is Ip InDelivers of the receiver's netns: packets that passed the INPUT
hook and reached UDP (the sink never reads; once its buffer is full UDP drops at
the socket, after the hook). veth delivers in the sender's softirq, so one core
(SEND_CPU) runs the whole path, send, receive and filter, and the rate is taken per
second of the CPU time that core gave the flood and ksoftirqd: other load on a
shared machine then takes time away from a measurement without changing its
result. The plain per-second rate is kept too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

from rules import FLOWS, Flow

PAYLOAD = 18   # UDP payload: 14 + 20 + 8 + 18 = 60-byte frame, 64 on the wire with its FCS
S_MAC, R_MAC = "02:bb:00:00:00:02", "02:bb:00:00:00:01"
SEND_CPU = 0
WARMUP = 0.15
SETTLE_TIMEOUT = 10.0


def run(argv: list[str], stdin: "str | None" = None) -> None:
    done = subprocess.run(argv, input=stdin, text=True, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")


def build_flood(src: str, out_dir: str) -> str:
    binary = os.path.join(out_dir, "udpflood")
    run(["cc", "-O2", "-Wall", "-Werror", "-o", binary, src])
    return binary


def _wait_up(netns: str, ifname: str, timeout: float = 5.0) -> None:
    """Until linkwatch has run for the device it sits on the noop qdisc, which drops
    everything sent: the first measurement would see nothing arrive."""
    deadline = time.monotonic() + timeout
    while "state UP" not in subprocess.run(["ip", "-n", netns, "-o", "link", "show", ifname],
                                           capture_output=True, text=True).stdout:
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

    def delivered(self) -> int:
        """Ip InDelivers of the receiver's netns, read through the sink that lives there."""
        with open(f"/proc/{self.sink.pid}/net/snmp") as f:
            names, values = f.readline().split(), f.readline().split()
        return int(values[names.index("InDelivers")])


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
        run(["ip", "netns", "add", name])
        self._made.append(name)
        run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
             "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])

    def _build(self, pair: Pair) -> None:
        self._netns(pair.sender)
        self._netns(pair.receiver)
        run(["ip", "-n", pair.sender, "link", "add", "v0", "address", S_MAC, "type", "veth",
             "peer", "name", "v0", "address", R_MAC, "netns", pair.receiver])
        run(["ip", "-n", pair.sender, "-batch", "-"], f"""\
link set lo up
addr add 198.18.0.2/24 dev v0
addr add 198.18.0.3/24 dev v0
link set v0 up
neigh replace 198.18.0.1 lladdr {R_MAC} dev v0 nud permanent
""")
        run(["ip", "-n", pair.receiver, "-batch", "-"], f"""\
link set lo up
addr add 198.18.0.1/24 dev v0
link set v0 up
neigh replace 198.18.0.2 lladdr {S_MAC} dev v0 nud permanent
neigh replace 198.18.0.3 lladdr {S_MAC} dev v0 nud permanent
""")
        for ns in (pair.sender, pair.receiver):
            _wait_up(ns, "v0")
        ports = sorted({str(f.dport) for f in FLOWS.values()})
        pair.sink = subprocess.Popen(
            ["ip", "netns", "exec", pair.receiver, self.flood, "sink", *ports],
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
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if done.returncode:
                errors.append(f"ip netns del {name}: {done.stderr.strip()}")
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
        sender = subprocess.Popen(
            ["ip", "netns", "exec", pair.sender, self.flood, "send", flow.src, str(flow.sport),
             flow.dst, str(flow.dport), str(PAYLOAD), str(WARMUP + window + 30),
             str(SEND_CPU)], stdout=subprocess.DEVNULL)
        try:
            time.sleep(WARMUP)
            c0, t0, cpu0 = pair.delivered(), time.monotonic(), self._cpu(sender.pid)
            time.sleep(window)
            c1, t1, cpu1 = pair.delivered(), time.monotonic(), self._cpu(sender.pid)
        finally:
            sender.send_signal(signal.SIGTERM)
            sender.wait()
        if sender.returncode:
            raise RuntimeError(f"the flood into {pair.receiver} failed ({sender.returncode})")
        self._settle(pair)
        cpu = cpu1 - cpu0
        return {"pps": (c1 - c0) / (t1 - t0), "pps_cpu": (c1 - c0) / cpu if cpu > 0 else 0.0,
                "cpu_share": cpu / (t1 - t0)}

    def _cpu(self, pid: int) -> float:
        return _runtime(pid) + _runtime(self.ksoftirqd)

    @staticmethod
    def _settle(pair: Pair) -> None:
        """Wait until the packets queued in the backlog have been processed: behind a
        slow filter that is up to a second of softirq work, and it would be charged
        to the next measurement."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last = pair.delivered()
        while time.monotonic() < deadline:
            time.sleep(0.03)
            now = pair.delivered()
            if now == last:
                return
            last = now
