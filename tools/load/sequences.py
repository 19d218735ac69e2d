"""Random sequences of valid iptables / ip6tables commands, run in pairs of network
namespaces at once: in one by the kernel's own iptables-legacy, in the other through
`bpfilter exec` against one bpfilter service; every step's exit status and output
(the listing commands' too) and, at the end, `iptables-legacy-save -c` must be the same.

A sequence edits the filter table as people and tools do: -A/-I/-D (by number and by
spec)/-R/-N/-X/-F/-Z/-P/-E, with the matches bpfilter implements (tests/rulegen.py's
rules: addresses, interfaces, protocols and ports, icmp, multiport, iprange, length,
ttl/hl, comment, mark, pkttype, mac, owner, limit), some with -c counters; -S, -L and
-C read it back; UDP datagrams to the loopback (the ICMP errors they cause included:
the loopback's are not rate limited) make the counters move, the same on both sides.

    python3 tools/load/sequences.py --pairs 8 --commands 200 [--seed N] [--family 4|6]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "umh"), os.path.join(ROOT, "tests")]
# the service and `bpfilter exec` it starts run this tree's code too, not an installed one
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.join(ROOT, "umh"), *filter(None, [os.environ.get("PYTHONPATH")])])

from bpfilter.model import Family  # noqa: E402

TOOL = {Family.IPV4: "iptables-legacy", Family.IPV6: "ip6tables-legacy"}
LOOPBACK = {Family.IPV4: "127.0.0.1", Family.IPV6: "::1"}
BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
# Jumps go to later user chains only, so chains nest at most this deep: within the 7
# levels bpfilter takes (BPF call frames; deeper is its own refusal, EOPNOTSUPP).
MAX_USER_CHAINS = 6


@dataclass
class _Table:
    """What the sequence believes the table holds: each chain's rule specs, the user
    chains in the order jumps may go (to later ones only: no loops)."""
    rules: dict = field(default_factory=lambda: {c: [] for c in BUILTIN})
    order: list = field(default_factory=list)
    made: int = 0

    def referenced(self, chain: str) -> bool:
        return any(re.search(rf" -[jg] {chain}( |$)", r) for rs in self.rules.values() for r in rs)


def _spec(rng: random.Random, family: Family, table: _Table, chain: str) -> str:
    from rulegen import DIALECTS, _Hints, _rule
    later = table.order[table.order.index(chain) + 1:] if chain in table.order else table.order
    spec = _rule(rng, DIALECTS[family], chain, None, later, _Hints(), more=True, extras=True)
    return spec.split(" ", 2)[2] if spec.count(" ") >= 2 else ""


def commands(seed: int, family: Family, n: int) -> "list[str]":
    """n command lines (shell), each an iptables command or a burst of datagrams."""
    rng = random.Random(seed)
    t = _Table()
    out = []
    tool = TOOL[family]
    while len(out) < n:
        chains = list(t.rules)
        chain = rng.choice(chains)
        rules = t.rules[chain]
        kind = rng.choices(["A", "I", "D#", "Dspec", "R", "N", "X", "F", "Z", "P", "E", "S",
                            "L", "C", "send"],
                           [30, 8, 5, 4, 5, 6, 3, 2, 4, 4, 3, 3, 3, 3, 6])[0]
        counters = f"-c {rng.randrange(100)} {rng.randrange(10000)} " if rng.random() < 0.2 else ""
        if kind == "A":
            spec = _spec(rng, family, t, chain)
            rules.append(spec)
            out.append(f"{tool} -A {chain} {counters}{spec}")
        elif kind == "I":
            spec = _spec(rng, family, t, chain)
            at = rng.randint(1, len(rules) + 1)
            rules.insert(at - 1, spec)
            out.append(f"{tool} -I {chain} {at} {counters}{spec}")
        elif kind == "D#" and rules:
            at = rng.randint(1, len(rules))
            rules.pop(at - 1)
            out.append(f"{tool} -D {chain} {at}")
        elif kind == "Dspec" and rules:
            spec = rng.choice(rules)
            rules.remove(spec)
            out.append(f"{tool} -D {chain} {spec}")
        elif kind == "R" and rules:
            at = rng.randint(1, len(rules))
            rules[at - 1] = _spec(rng, family, t, chain)
            out.append(f"{tool} -R {chain} {at} {counters}{rules[at - 1]}")
        elif kind == "N" and len(t.order) < MAX_USER_CHAINS:
            name = f"c{t.made}"
            t.made += 1
            t.rules[name] = []
            t.order.append(name)
            out.append(f"{tool} -N {name}")
        elif kind == "X" and t.order:
            name = rng.choice(t.order)
            if not t.rules[name] and not t.referenced(name):
                del t.rules[name]
                t.order.remove(name)
            out.append(f"{tool} -X {name}")   # of a chain still used: refused, both sides
        elif kind == "F":
            everything = rng.random() < 0.3
            for c in (list(t.rules) if everything else [chain]):
                t.rules[c].clear()
            out.append(f"{tool} -F" if everything else f"{tool} -F {chain}")
        elif kind == "Z":
            out.append(f"{tool} -Z {chain}" if rng.random() < 0.6 else f"{tool} -Z")
        elif kind == "P":
            out.append(f"{tool} -P {rng.choice(BUILTIN)} {rng.choice(['ACCEPT', 'DROP'])}")
        elif kind == "E" and t.order:
            old, new = rng.choice(t.order), f"c{t.made}"
            t.made += 1
            t.rules[new] = t.rules.pop(old)
            t.order[t.order.index(old)] = new
            for c, rs in t.rules.items():
                t.rules[c] = [re.sub(rf" -([jg]) {old}( |$)", rf" -\1 {new}\2", r) for r in rs]
            out.append(f"{tool} -E {old} {new}")
        elif kind == "S":
            out.append(f"{tool} -S" + (f" {chain}" if rng.random() < 0.5 else ""))
        elif kind == "L":
            out.append(f"{tool} -L -n -v -x" + (f" {chain}" if rng.random() < 0.5 else ""))
        elif kind == "C" and rules:
            spec = rng.choice(rules) if rng.random() < 0.7 else _spec(rng, family, t, chain)
            out.append(f"{tool} -C {chain} {spec}")
        elif kind == "send":
            port = rng.choice([9, 22, 53, 80, 443, 7777])
            out.append(f"bash -c 'for i in {' '.join('x' * rng.randint(1, 4))}; do "
                       f"echo -n $i >/dev/udp/{LOOPBACK[family]}/{port}; done'")
    # the namespace's packets: its -F and -P above may have dropped them, both sides
    return out


def script(steps: "list[str]", family: Family, outdir: str) -> str:
    """The shell script of a sequence: each step's status and output in outdir, and at
    the end the table as iptables-legacy-save -c writes it."""
    lines = [f"cd {outdir}"]
    for i, step in enumerate(steps):
        lines.append(f"{step} >{i}.out 2>{i}.err; echo $? >{i}.rc")
    lines.append(f"{TOOL[family].replace('-legacy', '-legacy-save')} -c >save 2>&1")
    return "\n".join(lines) + "\n"


def _strip_save(text: str) -> str:
    return "".join(line for line in text.splitlines(True)
                   if not line.startswith(("# Generated", "# Completed")))


def results(outdir: str, n: int) -> dict:
    def read(name: str) -> str:
        with open(os.path.join(outdir, name)) as f:
            return f.read()
    return {"steps": [(int(read(f"{i}.rc")), read(f"{i}.out"), read(f"{i}.err"))
                      for i in range(n)], "save": _strip_save(read("save"))}


def differences(steps: "list[str]", kernel: dict, ours: dict) -> "list[str]":
    """What differs: exit statuses and standard outputs step by step (stderr only says
    why, the service's words where the kernel has its log), then the saved table."""
    out = []
    for i, (step, k, b) in enumerate(zip(steps, kernel["steps"], ours["steps"])):
        if (k[0], k[1]) != (b[0], b[1]):
            out.append(f"step {i} `{step}`: kernel {k[0]} {k[1]!r} {k[2]!r}, "
                       f"bpfilter {b[0]} {b[1]!r} {b[2]!r}")
    if kernel["save"] != ours["save"]:
        out.append(f"save -c differs:\n--- kernel\n{kernel['save']}--- bpfilter\n{ours['save']}")
    return out


class Runner:
    """Runs sequences in namespace pairs against one service (`svc`: tests'
    test_service.Service, a private socket and bpffs)."""

    def __init__(self, svc, workdir: str, timeout: float = 900):
        self.svc, self.workdir, self.timeout = svc, workdir, timeout

    def run(self, ns: str, steps: "list[str]", family: Family, side: str) -> dict:
        outdir = os.path.join(self.workdir, f"{side}-{ns}")
        os.makedirs(outdir)
        path = outdir + ".sh"
        with open(path, "w") as f:
            f.write(script(steps, family, outdir))
        argv = ["ip", "netns", "exec", ns, "sh", path]
        if side == "bpfilter":
            argv[4:4] = [sys.executable, "-m", "bpfilter", "exec", "--"]
        done = subprocess.run(argv, env=self.svc.env, capture_output=True, text=True,
                              timeout=self.timeout)
        if done.returncode:
            raise RuntimeError(f"{side} {ns}: {done.stderr}")
        return results(outdir, len(steps))

    def pair(self, kns: str, bns: str, steps: "list[str]", family: Family) -> dict:
        """The differences, and how many steps the kernel took (status 0)."""
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            k = pool.submit(self.run, kns, steps, family, "kernel")
            b = pool.submit(self.run, bns, steps, family, "bpfilter")
            kernel = k.result()
            return {"diffs": differences(steps, kernel, b.result()),
                    "ok": sum(rc == 0 for rc, _, _ in kernel["steps"]), "save": kernel["save"]}

    def many(self, pairs: "list[tuple[str, str]]", sequences: "list[list[str]]",
             families: "list[Family]") -> "dict[int, dict]":
        """Every pair at once; what came of each pair's sequence (Runner.pair), by pair."""
        with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
            futures = [pool.submit(self.pair, k, b, s, f)
                       for (k, b), s, f in zip(pairs, sequences, families)]
            return {i: f.result() for i, f in enumerate(futures)}


def namespaces_made(n: int) -> "list[str]":
    from bpfilter_lab import namespaces
    names = [f"bpft-seq-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    for name in names:
        namespaces.add(name)
    return names


def namespaces_deleted(names: "list[str]") -> None:
    from bpfilter_lab import namespaces
    for name in names:
        namespaces.delete(name)


def main() -> int:
    from test_service import Service
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--commands", type=int, default=200)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--family", choices=("4", "6", "both"), default="both")
    args = p.parse_args()
    families = {"4": [Family.IPV4], "6": [Family.IPV6],
                "both": [Family.IPV4, Family.IPV6]}[args.family]
    svc = Service()
    names = namespaces_made(2 * args.pairs)
    try:
        svc.start()
        fams = [families[i % len(families)] for i in range(args.pairs)]
        seqs = [commands(args.seed + i, f, args.commands) for i, f in enumerate(fams)]
        started = time.monotonic()
        diffs = Runner(svc, svc.dir).many(list(zip(names[::2], names[1::2])), seqs, fams)
        seconds = time.monotonic() - started
    finally:
        namespaces_deleted(names)
        svc.close()
    bad = {i: r["diffs"] for i, r in diffs.items() if r["diffs"]}
    ok = sum(r["ok"] for r in diffs.values())
    print(f"seed {args.seed}: {args.pairs} pairs x {args.commands} commands in {seconds:.1f} s, "
          f"{ok} taken by the kernel; {len(bad)} pairs differ")
    for i, d in bad.items():
        print(f"pair {i} (seed {args.seed + i}, {fams[i].name}):\n  " + "\n  ".join(d[:10]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
