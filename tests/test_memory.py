"""What a caller may make the service spend (issue 13): the kernel charges a replace
to its caller's memory cgroup, so a caller held to little memory cannot make it
spend much; the service reserves what a request may spend, in the caller's cgroup,
before it reads the payload.

A ruleset, a cgroup limit, and the answer: refused (ENOMEM, the rules in force
unchanged) or taken; and the reservation held to what the service's memory grows by.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import uuid

import pytest

from bpfilter import memory
from bpfilter.errors import BpfilterError
from kmsg import logging_everywhere
from test_concurrency import shim_env
from test_service import PY, nets, svc  # noqa: F401

pytestmark = pytest.mark.kernel


def ruleset(rules: list[str]) -> str:
    return ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + "".join(r + "\n" for r in rules) + "COMMIT\n")


def address(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


SOURCES = ruleset([f"-A INPUT -s {address(i)}/32 -j DROP" for i in range(20000)])
PORTS = ruleset([f"-A INPUT -s {address(i)}/32 -p tcp -m tcp --dport {i % 60000 + 1} -j ACCEPT"
                 for i in range(20000)])
# little payload, much code: what each instruction costs
LOGS = ruleset([f'-A INPUT -d {address(i)}/32 -p udp -m udp --sport {i + 1} '
                f'-j LOG --log-prefix "r{i} "' for i in range(600)])


class MemoryCgroup:
    """A memory cgroup of its own, in whichever hierarchy has the memory controller."""

    def __init__(self, limit: int):
        controller = memory._controller()
        assert controller is not None, "no memory cgroup controller mounted"
        self.name = f"/bpft-mem-{uuid.uuid4().hex[:8]}"
        self.dir = controller.root + self.name
        os.mkdir(self.dir)
        with open(os.path.join(self.dir, controller.limit), "w") as f:
            f.write(str(limit))

    def run(self, argv: list[str], env: dict, input: str) -> subprocess.CompletedProcess:
        """argv as a process of this cgroup from its first instruction."""
        script = f'echo $$ > {self.dir}/cgroup.procs && exec "$@"'
        return subprocess.run(["sh", "-c", script, "sh", *argv], env=env, input=input,
                              capture_output=True, text=True, timeout=120)

    def remove(self) -> None:
        os.rmdir(self.dir)


@pytest.fixture
def cgroup():
    made = []

    def make(limit: int) -> MemoryCgroup:
        made.append(MemoryCgroup(limit))
        return made[-1]

    yield make
    for group in made:
        group.remove()


def test_a_replace_past_the_callers_memory_limit_is_refused_and_changes_nothing(svc, nets,
                                                                                 cgroup):
    (ns,) = nets(1)
    svc.ok(ns, "iptables-legacy", "-A", "INPUT", "-s", "192.0.2.1", "-j", "DROP")
    group = cgroup(64 << 20)
    restore = ["ip", "netns", "exec", ns, "iptables-legacy-restore"]
    done = group.run(restore, shim_env(svc), SOURCES)
    assert done.returncode != 0
    assert f"memory cgroup {group.name} has not left under its limit" in done.stderr, \
        done.stderr
    assert os.strerror(errno.ENOMEM) in done.stderr or "ENOMEM" in done.stderr, done.stderr
    assert svc.ok(ns, "iptables-legacy", "-S", "INPUT").splitlines() == \
        ["-P INPUT ACCEPT", "-A INPUT -s 192.0.2.1/32 -j DROP"]
    # what fits is taken, in the same cgroup
    small = ruleset([f"-A INPUT -s {address(i)}/32 -j DROP" for i in range(100)])
    done = group.run(restore, shim_env(svc), small)
    assert done.returncode == 0, done.stderr
    assert len(svc.ok(ns, "iptables-legacy", "-S", "INPUT").splitlines()) == 101
    # and what is in flight of the caller's is reserved no longer
    assert svc.cli("show").returncode == 0


def peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) << 10


@pytest.mark.parametrize("rules", [SOURCES, PORTS, LOGS], ids=["sources", "ports", "logs"])
def test_the_reservation_covers_what_a_replace_spends(svc, nets, rules):
    """A fresh service's peak memory grows by no more than it reserved for the
    replace: the payload's share, and the instructions it emitted."""
    (ns,) = nets(1)
    svc.ok(ns, "iptables-legacy", "-L", "-n")   # the initial table: not the replace's
    before = peak(svc.pid)
    # (LOG rules load in `bpfilter serve` only where its lines reach the kernel log
    # unthrottled: issue 17's gap, see README)
    with logging_everywhere() if rules is LOGS else contextlib.nullcontext():
        svc.ok(ns, "iptables-legacy-restore", input=rules)
    grown = peak(svc.pid) - before
    (line,) = [line for line in svc.log_text().splitlines() if "replaced in" in line]
    size = int(re.search(r"(\d+) bytes", line).group(1))
    insns = [int(n) for n in re.findall(r"(\d+) insns", line)]
    blocks = sum(-(-n // memory.INSNS_PER_SPEND) for n in insns)
    reserved = memory.needed(True, size) + \
        blocks * memory.INSNS_PER_SPEND * memory.SPENT_PER_INSN
    assert grown <= reserved, (grown >> 20, reserved >> 20, line)


def test_what_is_in_flight_counts_against_the_cgroup_and_its_ancestors(tmp_path):
    """Two replaces of one caller at once, each within its cgroup's limit alone but
    not together: the second is refused until the first is done; a limit on an
    ancestor holds for every cgroup under it."""
    for level, limit, usage in (("pod", 200 << 20, 0), ("pod/a", 100 << 20, 10 << 20),
                                ("pod/b", "max", 0)):
        os.makedirs(tmp_path / level)
        (tmp_path / level / "memory.max").write_text(f"{limit}\n")
        (tmp_path / level / "memory.current").write_text(f"{usage}\n")
    budget = memory.Budget()
    budget.controller = memory._Controller(str(tmp_path), v2=True)
    first = budget.reserve(50 << 20, "/pod/a")
    with pytest.raises(BpfilterError) as refused:
        budget.reserve(50 << 20, "/pod/a")
    assert refused.value.errno == errno.ENOMEM
    assert "memory cgroup /pod/a has not left under its limit (40 of 100 MiB)" in str(refused.value)
    second = budget.reserve(140 << 20, "/pod/b")   # the pod's 200 MiB: 50 + 140
    with pytest.raises(BpfilterError) as refused:
        budget.extend(second, 20 << 20)
    assert "memory cgroup /pod has not left" in str(refused.value)
    first.release()
    budget.extend(second, 20 << 20)
    second.release()
    assert (budget.machine, budget.per_cgroup) == (0, {})
