"""A replace has one commit point: whatever step the service dies at, or fails at, the
table a new service recovers lists what filters, and the caller's answer was the truth.

The faults come from tests/crashpoints.py, a launcher that wraps, in the service it
starts, every operation changing what is pinned, attached or held, and kills the
service (SIGKILL) or raises at the Nth of them. Each test first counts the steps
of the replace with no fault, then injects one at every step in turn. What filters is
seen by real datagrams over the namespace's loopback (INPUT and OUTPUT) and by a test
run of the program the FORWARD slot holds; what the table shows, by iptables-legacy
-S through `bpfilter exec`.

A service killed before the answer of a replace that took effect leaves its caller
with ECONNRESET (the shim's "the service went away"): the outcome is then
unknown to the caller, never wrong, and the table is whole either way.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from bpfilter import netns, proto
from bpfilter.bpf import syscall as bpf
from bpfilter.model import Hook
from bpfilter_lab.backends import service_request
from bpfilter_lab.packets import Packet
from test_service import PY, Service, inum_of, nets, svc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.kernel

TESTS = os.path.dirname(os.path.abspath(__file__))

# Every hook differs between A and B; B reads conntrack (a hold to take, then give
# back) and has a user chain (another entry count).
A = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --dport 11 -j DROP
-A FORWARD -p udp -m udp --dport 13 -j DROP
-A OUTPUT -p udp -m udp --dport 9 -j DROP
COMMIT
"""
B = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:web - [0:0]
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p udp -m udp --dport 12 -j web
-A FORWARD -p udp -m udp --dport 14 -j DROP
-A OUTPUT -p udp -m udp --dport 10 -j DROP
-A web -j DROP
COMMIT
"""
# what each ruleset does to a datagram to these ports: dropped at OUTPUT (sendto
# refused), dropped at INPUT (never received), dropped at FORWARD, or passed
VERDICTS = {
    "A": {9: "output", 10: "pass", 11: "input", 12: "pass", 13: "forward", 14: "pass"},
    "B": {9: "pass", 10: "output", 11: "pass", 12: "input", 13: "pass", 14: "forward"},
}


def local_verdicts(ns: str) -> dict[int, str]:
    """What the namespace's INPUT and OUTPUT hooks do to a datagram to 9 to 12."""
    seen = {}
    with netns.entered(ns):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for port in (9, 10, 11, 12):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
                    rx.bind(("127.0.0.1", port))
                    rx.settimeout(0.5)
                    try:
                        tx.sendto(b"commit", ("127.0.0.1", port))
                    except PermissionError:
                        seen[port] = "output"
                        continue
                    try:
                        rx.recv(100)
                        seen[port] = "pass"
                    except socket.timeout:
                        seen[port] = "input"
    return seen


def forward_verdicts(table_dir: str) -> dict[int, str]:
    """What the program in the FORWARD slot does to a datagram to 13 and 14."""
    array = bpf.obj_get(os.path.join(table_dir, "slot_FORWARD"))
    try:
        (prog_id,) = struct.unpack("<I", bpf.map_lookup(array, struct.pack("<I", 0), 4))
    finally:
        os.close(array)
    prog = bpf.prog_get_fd_by_id(prog_id)
    try:
        seen = {}
        for port in (13, 14):
            packet = Packet("10.9.0.1", "10.9.0.2", "udp", dport=port).build(1, 0)
            verdict = bpf.nf_test_run(prog, Hook.FORWARD, packet)[0]
            seen[port] = "pass" if verdict == bpf.NF_ACCEPT else "forward"
        return seen
    finally:
        os.close(prog)


class Crashing:
    """The test's service, started now and then through crashpoints with a fault."""

    def __init__(self, svc: Service, ns: str):
        self.svc, self.ns = svc, ns
        self.control = os.path.join(svc.dir, "control")
        self.env = dict(svc.env, PYTHONPATH=os.pathsep.join(
            [TESTS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
        self.set("none", "count", 0)

    def set(self, arm: str, mode: str, at: int) -> None:
        with open(self.control, "w") as f:
            f.write(f"{arm} {mode} {at}\n")

    def steps(self) -> list[str]:
        with open(self.control + ".steps") as f:
            return f.read().split()

    def start(self) -> None:
        """The service, through crashpoints (faults as the control file says)."""
        done = subprocess.run([PY, "-m", "crashpoints", self.control, "--", "serve", "--daemon",
                               "--socket", self.svc.socket, "--bpffs", self.svc.bpffs],
                              env=self.env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr + self.svc.log_text()

    def stop(self) -> None:
        pid = self.svc.pid
        if self.svc.running():
            os.kill(pid, signal.SIGTERM)
        self.wait_dead()

    def wait_dead(self) -> None:
        deadline = time.monotonic() + 10
        while self.svc.running():
            assert time.monotonic() < deadline, "the service does not die"
            time.sleep(0.02)

    def restore(self, text: str) -> subprocess.CompletedProcess:
        return self.svc.exec(self.ns, "iptables-legacy-restore", input=text)

    def listing(self) -> str:
        return self.svc.ok(self.ns, "iptables-legacy", "-S")

    def table_dir(self) -> str:
        (netns_dir,) = [d for d in os.listdir(self.svc.bpffs)
                        if d.startswith(f"{inum_of(self.ns)}-")]
        return os.path.join(self.svc.bpffs, netns_dir, "ipv4-filter")

    def filtering(self) -> str:
        """Which of A and B the hooks run, asserting that it is one of them whole."""
        seen = {**local_verdicts(self.ns), **forward_verdicts(self.table_dir())}
        which = [name for name, verdicts in VERDICTS.items() if verdicts == seen]
        assert which, f"the hooks run neither A nor B: {seen}"
        return which[0]

    def generations(self) -> list[str]:
        return sorted(n for n in os.listdir(self.table_dir()) if n.startswith("gen_"))


def _listed(listings: dict[str, str], listing: str) -> str:
    which = [name for name, text in listings.items() if text == listing]
    assert which, f"the table lists neither A nor B:\n{listing}"
    return which[0]


def _prepare(svc: Service, nets) -> tuple[Crashing, dict[str, str], list[str]]:
    """A service through crashpoints, A in force, the listings of A and B, and the
    steps of a replace of A by B."""
    (ns,) = nets(1)
    crashing = Crashing(svc, ns)
    svc.ok(ns, "iptables-legacy-restore", input=A)
    svc_pid = svc.pid
    os.kill(svc_pid, signal.SIGTERM)
    crashing.wait_dead()
    crashing.start()
    listings = {"A": crashing.listing()}
    crashing.set("replace", "count", 0)
    done = crashing.restore(B)
    assert done.returncode == 0, done.stderr
    steps = crashing.steps()
    listings["B"] = crashing.listing()
    assert crashing.filtering() == "B"
    crashing.set("none", "count", 0)
    assert crashing.restore(A).returncode == 0
    assert crashing.filtering() == "A"
    return crashing, listings, steps


def test_a_service_killed_at_any_step_of_a_replace_recovers_what_it_lists(svc, nets):
    crashing, listings, steps = _prepare(svc, nets)
    crashing.stop()
    assert "answer" in steps and len(steps) >= 5, steps
    outcomes = {}
    for at, name in enumerate(steps, 1):
        crashing.set("replace", "exit", at)
        crashing.start()
        done = crashing.restore(B)
        crashing.wait_dead()
        assert done.returncode != 0, f"step {at} ({name}): the service died, yet the replace succeeded"
        crashing.set("none", "count", 0)
        crashing.svc.start()   # a plain service recovers the table
        where = f"killed at step {at} ({name})"
        assert "cannot recover" not in svc.log_text().lower(), where + "\n" + svc.log_text()
        listed = _listed(listings, crashing.listing())
        assert crashing.filtering() == listed, f"{where}: lists {listed}, filters the other"
        assert len(crashing.generations()) == 1, f"{where}: {crashing.generations()}"
        outcomes[name, at] = listed
        # the next command goes on from there: no silent revert
        assert crashing.restore(A).returncode == 0
        assert crashing.filtering() == _listed(listings, crashing.listing()) == "A"
        crashing.stop()
    # the commit point is one step: before it A, after it B
    seen = list(outcomes.values())
    assert seen == sorted(seen) and seen[0] == "A" and seen[-1] == "B", outcomes


def _fds(pid: int) -> list[str]:
    """The BPF objects the service holds open (anon_inode:bpf-map, bpf-prog, bpf_link)."""
    seen = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("anon_inode:bpf"):
            seen.append(target)
    assert seen
    return sorted(seen)


def test_a_replace_failing_at_any_step_answers_the_truth_and_leaks_nothing(svc, nets):
    crashing, listings, steps = _prepare(svc, nets)
    pid = svc.pid
    for at, name in enumerate(steps, 1):
        if name == "answer":
            continue   # nothing to fail once the answer is made
        where = f"failing at step {at} ({name})"
        fds = _fds(pid)
        crashing.set("replace", "raise", at)
        done = crashing.restore(B)
        crashing.set("none", "count", 0)
        assert svc.running() and svc.pid == pid
        listed = _listed(listings, crashing.listing())
        assert listed == ("B" if done.returncode == 0 else "A"), \
            f"{where}: answered {done.returncode} ({done.stderr.strip()}) and lists {listed}"
        assert crashing.filtering() == listed, f"{where}: lists {listed}, filters the other"
        # A generation whose unpinning failed goes with the next replace.
        assert crashing.restore(A).returncode == 0
        assert len(crashing.generations()) == 1, f"{where}: {crashing.generations()}"
        assert _fds(pid) == fds, f"{where}: the service leaked programs or maps"
        assert crashing.filtering() == _listed(listings, crashing.listing()) == "A"


def test_a_service_killed_while_creating_a_table_leaves_none_or_the_initial_one(svc, nets):
    """A table is created by the first command that names it: killed at any step of
    that, the next service has either no table there (the next command creates it)
    or the kernel's initial one, managed."""
    (ns,) = nets(1)
    crashing = Crashing(svc, ns)
    fresh = ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"]
    svc.ok(ns, "true")   # the service, started by exec
    os.kill(svc.pid, signal.SIGTERM)
    crashing.wait_dead()
    crashing.set("create", "count", 0)
    crashing.start()
    assert crashing.listing().splitlines() == fresh
    steps = crashing.steps()
    assert "answer" in steps and len(steps) >= 5, steps
    assert svc.cli("flush").returncode == 0
    for at, name in enumerate(steps, 1):
        where = f"killed at step {at} ({name})"
        crashing.set("create", "exit", at)
        crashing.start()
        assert svc.exec(ns, "iptables-legacy", "-S").returncode != 0, where
        crashing.wait_dead()
        crashing.set("none", "count", 0)
        crashing.svc.start()
        assert "cannot recover" not in svc.log_text().lower(), where + "\n" + svc.log_text()
        tables = svc.pinned().get(inum_of(ns), [])
        assert tables in ([], ["ipv4-filter"]), f"{where}: {tables}"
        if tables:
            assert len(crashing.generations()) == 1, f"{where}: {crashing.generations()}"
        assert crashing.listing().splitlines() == fresh, where
        assert local_verdicts(ns) == {port: "pass" for port in (9, 10, 11, 12)}, where
        assert svc.cli("flush").returncode == 0


def _corrupt_committed_blob(table_dir: str) -> None:
    """The committed blob replaced by bytes no bpfilter decodes (as a blob a later
    bpfilter refuses, or damage would be)."""
    from bpfilter.store import write_blob
    current = os.path.join(table_dir, "current")
    gen = os.path.join(table_dir, os.readlink(current)) if os.path.lexists(current) else table_dir
    fd = write_blob(b"\xff" * 100)
    try:
        os.unlink(os.path.join(gen, "blob"))
        bpf.obj_pin(fd, os.path.join(gen, "blob"))
    finally:
        os.close(fd)


def test_a_table_that_cannot_be_recovered_keeps_filtering_and_is_managed(svc, nets):
    """It fails closed: attached with its last rules (detached, everything they drop
    would pass), refused with the reason (its rules cannot be shown), listed in the
    namespace's table names, and swept with its namespace."""
    (ns,) = nets(1)
    crashing = Crashing(svc, ns)
    svc.ok(ns, "iptables-legacy-restore", input=A)
    assert crashing.filtering() == "A"
    os.kill(svc.pid, signal.SIGTERM)
    crashing.wait_dead()
    _corrupt_committed_blob(crashing.table_dir())
    svc.start()
    assert "cannot recover" in svc.log_text().lower()
    assert crashing.filtering() == "A"
    done = svc.exec(ns, "iptables-legacy", "-S")
    assert done.returncode != 0 and "cannot recover it" in done.stderr, done.stderr
    assert crashing.filtering() == "A"
    assert service_request(svc.socket, netns.path_of(ns), proto.Op.TABLE_NAMES) == (0, b"filter\n")
    inum = inum_of(ns)
    subprocess.run(["ip", "netns", "del", ns], check=True)
    deadline = time.monotonic() + 10
    while inum in svc.pinned():
        assert time.monotonic() < deadline, "the unrecovered table outlives its namespace"
        time.sleep(0.1)


def test_a_table_pinned_before_generations_is_taken_over(svc, nets):
    """A bpfilter from before generations pinned a table's blob, counters and added
    in the table's own directory, its programs held by its slots only: a new service
    makes that generation 1 and manages it."""
    (ns,) = nets(1)
    crashing = Crashing(svc, ns)
    svc.ok(ns, "iptables-legacy-restore", input=A)
    listing = crashing.listing()
    os.kill(svc.pid, signal.SIGTERM)
    crashing.wait_dead()
    table_dir = crashing.table_dir()
    (gen,) = crashing.generations()
    for name in ("blob", "counters", "added"):
        os.rename(os.path.join(table_dir, gen, name), os.path.join(table_dir, name))
    os.unlink(os.path.join(table_dir, "current"))
    subprocess.run(["rm", "-r", os.path.join(table_dir, gen)], check=True)
    assert crashing.filtering() == "A"
    svc.start()
    assert "cannot recover" not in svc.log_text().lower(), svc.log_text()
    assert crashing.listing() == listing and crashing.filtering() == "A"
    assert sorted(os.listdir(table_dir)) == sorted(
        ["current", "gen_1"] + [f"{kind}_{chain}" for kind in ("link", "slot")
                                for chain in ("INPUT", "FORWARD", "OUTPUT")])
    assert svc.exec(ns, "iptables-legacy-restore", input=B).returncode == 0
    assert crashing.filtering() == "B" and crashing.generations() == ["gen_2"]
