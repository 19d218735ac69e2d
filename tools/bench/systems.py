"""The filters under test, each driven in its receiver namespace as a person drives it.

Times are wall-clock times of the whole command (`ip netns exec` included, the same
few milliseconds for every system), so bpfilter's include starting `bpfilter exec`'s
Python and the service's compile and verification.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Optional

from rules import SET_MIXES, Ruleset, iptables_restore

EMPTY_TABLE = iptables_restore([])


class ApplyError(RuntimeError):
    """The system refused the ruleset: a result, not a failure of the bench."""


class System:
    name = ""
    label = ""
    color = ""

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
            raise ApplyError(f"{argv[0]} exited {done.returncode} after {spent:.1f} s: "
                             f"{lines[0] if lines else 'no message'}")
        return spent

    def clear(self) -> None:
        raise NotImplementedError

    def apply(self, ruleset: Ruleset) -> float:
        raise NotImplementedError

    def append(self, ruleset: Ruleset) -> float:
        raise NotImplementedError


class Baseline(System):
    name, label, color = "none", "no rules", "black"

    def clear(self) -> None:
        pass

    def apply(self, ruleset: Ruleset) -> float:
        return 0.0

    def append(self, ruleset: Ruleset) -> float:
        return 0.0


class Legacy(System):
    name, label, color = "legacy", "iptables-legacy", "tab:red"
    prefix: list[str] = []

    def clear(self) -> None:
        self._timed([*self.prefix, "iptables-legacy-restore"], EMPTY_TABLE)

    def apply(self, ruleset: Ruleset) -> float:
        return self._timed([*self.prefix, "iptables-legacy-restore"], ruleset.iptables_restore())

    def append(self, ruleset: Ruleset) -> float:
        return self._timed([*self.prefix, "iptables-legacy", *ruleset.extra.iptables().split()])


class Bpfilter(Legacy):
    """The same iptables-legacy binaries, their socket options sent to bpfilter."""
    name, label, color = "bpfilter", "bpfilter", "tab:blue"
    prefix = [sys.executable, "-m", "bpfilter", "exec", "--"]


class Nft(System):
    name, label, color = "nft", "nftables", "tab:green"

    def clear(self) -> None:
        self._timed(["nft", "flush", "ruleset"])

    def apply(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", "-f", "-"], ruleset.nft_plain())

    def append(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", *ruleset.nft_append().split()])


class NftSets(Nft):
    name, label, color = "nftset", "nftables sets", "tab:olive"

    def supports(self, mix: str) -> bool:
        return mix in SET_MIXES

    def apply(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", "-f", "-"], ruleset.nft_sets())

    def append(self, ruleset: Ruleset) -> float:
        return self._timed(["nft", *ruleset.nft_sets_append().split()])


SYSTEMS = {cls.name: cls for cls in (Baseline, Legacy, Nft, NftSets, Bpfilter)}


def environment(private_dir: str) -> dict:
    """What every command runs with: bpfilter's socket and bpffs private to this run,
    and an xtables lock of our own, so that nobody else's iptables (tests running
    beside us) makes ours wait."""
    return dict(os.environ, BPFILTER_SOCKET=os.path.join(private_dir, "bpfilter.sock"),
                BPFILTER_BPFFS=os.path.join(private_dir, "bpffs"),
                XTABLES_LOCKFILE=os.path.join(private_dir, "xtables.lock"))
