"""The filters under test, each driven in its receiver namespace as a person drives it.

Times are wall-clock times of the whole command (`ip netns exec` included, the same
few milliseconds for every system). bpfilter runs the same iptables-legacy and
ip6tables-legacy binaries as the kernel's, with the preload shim in their environment
(`bpfilter env`: what a script does once, and the closest this machine has to
bpfilter.ko, which needs no shim), so its times are the commands' and the service's
compile and verification. Appends are also timed through `bpfilter exec`, which
starts a Python interpreter for every command (`append_exec`). A mix's family picks
the binaries (rules.FAMILY); clearing a system clears both families.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Optional

from rules import IPV4, IPV6, SET_MIXES, Ruleset, iptables_restore

EMPTY_TABLE = iptables_restore([])
# the commands of each family: restore a table, edit one
IPTABLES = {IPV4: ("iptables-legacy-restore", "iptables-legacy"),
            IPV6: ("ip6tables-legacy-restore", "ip6tables-legacy")}


class ApplyError(RuntimeError):
    """The system refused the ruleset: a result, not a failure of the bench."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


class System:
    name = ""

    def __init__(self, netns: str, env: dict) -> None:
        self.netns, self.env = netns, env

    def supports(self, mix: str) -> bool:
        return True

    def _timed(self, argv: list[str], stdin: Optional[str] = None) -> float:
        start = time.perf_counter()
        done = subprocess.run(["ip", "netns", "exec", self.netns, *argv], input=stdin,
                              text=True, capture_output=True, env=self.env)
        spent = time.perf_counter() - start
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ApplyError(f"exit {done.returncode}: {lines[0] if lines else 'no message'}",
                             spent)
        return spent

    def clear(self) -> None:
        raise NotImplementedError

    def apply(self, ruleset: Ruleset) -> float:
        raise NotImplementedError

    def append(self, ruleset: Ruleset) -> float:
        raise NotImplementedError


class Legacy(System):
    name = "legacy"

    def _iptables(self, command: str) -> list[str]:
        return [command]

    def clear(self) -> None:
        for restore, _ in IPTABLES.values():
            self._timed(self._iptables(restore), EMPTY_TABLE)

    def apply(self, ruleset: Ruleset) -> float:
        restore, _ = IPTABLES[ruleset.family]
        return self._timed(self._iptables(restore), ruleset.iptables_restore())

    def append(self, ruleset: Ruleset) -> float:
        _, command = IPTABLES[ruleset.family]
        return self._timed([*self._iptables(command), *ruleset.extra.iptables().split()])


class Bpfilter(Legacy):
    """The same iptables-legacy binaries, their socket options sent to bpfilter."""
    name = "bpfilter"

    def _exec(self, command: str) -> list[str]:
        return [sys.executable, "-m", "bpfilter", "exec", "--socket", self.env["BPFILTER_SOCKET"],
                "--bpffs", self.env["BPFILTER_BPFFS"], "--", command]

    def clear(self) -> None:
        """Also starts the service (the first time, as `bpfilter env` does), and puts
        the shim in the environment of every later command."""
        from bpfilter.execute import environment
        self.env = dict(self.env, **environment(self.env["BPFILTER_SOCKET"],
                                                self.env["BPFILTER_BPFFS"]))
        super().clear()

    def append_exec(self, ruleset: Ruleset) -> float:
        _, command = IPTABLES[ruleset.family]
        return self._timed([*self._exec(command), *ruleset.extra.iptables().split()])


class Nft(System):
    name = "nft"

    def clear(self) -> None:
        self._timed(["nft", "flush", "ruleset"])

    def apply(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", "-f", "-"], ruleset.nft_plain())

    def append(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", *ruleset.nft_append().split()])


class NftSets(Nft):
    name = "nftset"

    def supports(self, mix: str) -> bool:
        return mix in SET_MIXES

    def apply(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", "-f", "-"], ruleset.nft_sets())

    def append(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", *ruleset.nft_sets_append().split()])


SYSTEMS = {cls.name: cls for cls in (Legacy, Nft, NftSets, Bpfilter)}


def environment(private_dir: str) -> dict:
    """What every command runs with: bpfilter's socket and bpffs private to this run,
    and an xtables lock of our own, so that nobody else's iptables (tests running
    beside us) makes ours wait."""
    return dict(os.environ, BPFILTER_SOCKET=os.path.join(private_dir, "bpfilter.sock"),
                BPFILTER_BPFFS=os.path.join(private_dir, "bpffs"),
                XTABLES_LOCKFILE=os.path.join(private_dir, "xtables.lock"))
