#!/usr/bin/env python3
"""Real clients' command sequences, timed: Debian's own ufw (bpfilter_lab/ufw.py's
COMMANDS: enable with IPv6, allow, deny, limit, reload) on the kernel's
iptables-legacy and through `bpfilter exec`, side by side in one run, each in
namespaces of its own made and removed here; with bpfilter, how many replaces the
service made and how long they took (its log).

    python3 tools/bench/clients.py [--repeat 3]

Each command's wall time is its median over the repeats (a fresh pair of namespaces
and ufw configuration each time). Needs root and ufw; the private bpfilter service
(socket, bpffs) is removed on exit.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "umh")]

from bpfilter_lab import namespaces  # noqa: E402
from bpfilter_lab.ufw import COMMANDS, Host  # noqa: E402
from run import PRIVATE_ROOT, _flush_bpfilter  # noqa: E402
from systems import environment  # noqa: E402

REPLACED = re.compile(r"(ip6?tables) table \w+ replaced in ([0-9.]+) s")


def _replaces(log: str, start: int) -> tuple[dict, int]:
    """{family's tool: (count, seconds)} of the replaces logged past `start`, and the
    log's end."""
    if not os.path.exists(log):
        return {}, start
    with open(log) as f:
        f.seek(start)
        text, end = f.read(), f.tell()
    found: dict = {}
    for tool, seconds in REPLACED.findall(text):
        count, total = found.get(tool, (0, 0.0))
        found[tool] = (count + 1, total + float(seconds))
    return found, end


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    private = os.path.join(PRIVATE_ROOT, f"bpbench-{os.getpid()}")
    os.makedirs(private, mode=0o700)
    env = environment(private)
    log = os.path.join(private, "bpfilter.log")
    times: dict = {(system, c): [] for system in ("kernel", "bpfilter") for c in COMMANDS}
    replaces: dict = {}
    at = 0
    try:
        for turn in range(args.repeat):
            for system in ("kernel", "bpfilter"):
                server, peer = (f"bpc{os.getpid()}-{turn}-{system[0]}{side}" for side in "sp")
                namespaces.add(server)
                namespaces.add(peer)
                host = Host(env, server, peer, system == "bpfilter")
                try:
                    for command in COMMANDS:
                        started = time.perf_counter()
                        host.run(command)
                        times[system, command].append(time.perf_counter() - started)
                        if system == "bpfilter":
                            made, at = _replaces(log, at)
                            for tool, (count, seconds) in made.items():
                                key = (command, tool)
                                replaces[key] = [a + b for a, b in
                                                 zip(replaces.get(key, (0, 0.0)), (count, seconds))]
                finally:
                    host.close()
                    namespaces.delete(server)
                    namespaces.delete(peer)
    finally:
        _flush_bpfilter(private)
        shutil.rmtree(private, ignore_errors=True)
    print(f"ufw, median of {args.repeat} (s)      kernel  bpfilter   ratio   "
          "bpfilter's replaces: count, mean s (per run)")
    for command in COMMANDS:
        kernel = statistics.median(times["kernel", command])
        ours = statistics.median(times["bpfilter", command])
        made = ", ".join(f"{tool} {count / args.repeat:.0f} x {seconds / count:.3f}"
                         for (c, tool), (count, seconds) in sorted(replaces.items())
                         if c == command)
        print(f"  {command:26s} {kernel:8.2f} {ours:9.2f} {ours / kernel:7.1f}x   {made}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
