#!/usr/bin/env python3
"""The packet-filter benchmark: bpfilter against the kernel's iptables-legacy and
nftables, on the same rulesets, in network namespaces this command makes and removes.

    python3 tools/bench/run.py [--sizes 0,1,100,1000,10000,100000]
                               [--mixes blocklist,ports,classbench,blocklist6,ports6]
                               [--quick] [--out results/bench-<date>]

For each mix and size N it loads the same N-rule INPUT chain (rules.py; IPv4 mixes
through iptables-legacy, IPv6 ones through ip6tables-legacy) into every system, each
in its own receiver namespace, then measures
  - the packet rate of the smallest UDP frames of the mix's family (64 bytes on the
    wire for IPv4, 66 for IPv6) flooded from a sender namespace over veth,
    relative to a receiver without rules measured in between (netlab.py);
  - the time to apply the ruleset and to append one rule, whole commands;
  - for bpfilter, its INPUT program's BPF_PROG_TEST_RUN time per packet, its
    instructions and map bytes, and where the time of loading the ruleset goes.
Output: a table on stdout; results.json, results.csv, table.txt and bench.png in the
out directory. Needs root; all state (namespaces, the private bpfilter service and
its bpffs) is removed on exit, even a failed one, and a run that was killed outright
is cleaned up by the next.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import rules  # noqa: E402
from rules import FLOWS  # noqa: E402
from systems import SYSTEMS, ApplyError, environment  # noqa: E402

# N = 0, an empty INPUT chain, is each system's own baseline (the targets' "0-rule rate")
QUICK_SIZES = (0, 1, 100, 1000)
FULL_SIZES = (0, 1, 100, 1000, 10000, 100000)
APPENDS = 3
NS_PREFIX = "bpb"
PRIVATE_ROOT = "/run"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _flush_bpfilter(private: str) -> None:
    env = environment(private)
    subprocess.run([sys.executable, "-m", "bpfilter", "flush", "--socket", env["BPFILTER_SOCKET"],
                    "--bpffs", env["BPFILTER_BPFFS"]], capture_output=True)
    if os.path.ismount(env["BPFILTER_BPFFS"]):
        subprocess.run(["umount", env["BPFILTER_BPFFS"]], capture_output=True)


def sweep_stale() -> None:
    """What a run killed without its cleanup (SIGKILL, a crash of the machine's
    sessions) left: its namespaces and its bpfilter service."""
    from bpfilter_lab import namespaces
    pattern = re.compile(rf"^{NS_PREFIX}(\d+)-")
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else ():
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                namespaces.delete(name)
            except OSError:
                pass
    for name in os.listdir(PRIVATE_ROOT):
        m = re.match(r"^bpbench-(\d+)$", name)
        if m and not _alive(int(m.group(1))):
            private = os.path.join(PRIVATE_ROOT, name)
            _flush_bpfilter(private)
            shutil.rmtree(private, ignore_errors=True)


def _median(values: list[float]) -> "float | None":
    return statistics.median(values) if values else None


def measure_rates(lab, active: list[str], flows: dict, window: float, reps: int) -> dict:
    """Samples per system and flow. Each group starts with the no-rules receiver and
    the order of the others rotates, so drift and ordering effects spread evenly."""
    samples = {s: {f: [] for f in flows} for s in ["none", *active]}
    for rep in range(reps):
        for flow in flows:
            k = rep % len(active) if active else 0
            for s in ["none", *active[k:], *active[:k]]:
                samples[s][flow].append(lab.rate(s, flows[flow], window))
    return samples


def bench_one(lab, systems: dict, mix: str, n: int, args) -> dict:
    from bpfstats import FAMILY, footprint, input_program, ns_per_packet, replay_load, table_dir
    from bpfilter_lab.scratch import replace_blob

    ruleset = rules.generate(mix, n, args.seed)
    flows = ruleset.flows
    run = {"mix": mix, "n": n, "family": ruleset.family,
           "systems": {s: {} for s in ["none", *systems]}}
    active = []
    for name, system in systems.items():
        rec = run["systems"][name]
        if not system.supports(mix):
            rec["unsupported"] = True
            continue
        system.clear()
        try:
            rec["apply_s"] = system.apply(ruleset)
            active.append(name)
            log(f"{mix} N={n}: {name} applied in {rec['apply_s']:.2f} s")
        except ApplyError as err:
            rec["error"], rec["apply_s"] = str(err), err.seconds
            log(f"{mix} N={n}: {name} refused after {err.seconds:.2f} s: {err}")

    if "bpfilter" in active:
        pins = table_dir(args.env["BPFILTER_BPFFS"], lab.receiver("bpfilter"), ruleset.family)
        with input_program(pins) as prog:
            run["bpfilter"] = {
                "repeat": args.repeat,
                "ns_per_packet": {f: ns_per_packet(prog, flows[f], args.repeat) for f in flows},
                "footprint": footprint(pins, prog)}
        # a counter per entry: the N rules, 3 policies, the final ERROR entry. Anything
        # else means the commands did not reach bpfilter (the kernel took them).
        entries = run["bpfilter"]["footprint"]["maps"]["filter_ctrs"]["max_entries"]
        if entries != n + 4:
            raise RuntimeError(f"{mix} N={n}: bpfilter holds {entries} entries, not {n + 4}")
    elif "bpfilter" in systems:
        run["bpfilter"] = {}

    samples = measure_rates(lab, active, flows, args.window, args.reps)
    for name, by_flow in samples.items():
        run["systems"][name]["samples"] = by_flow
    for key, field in (("rate", "pps_cpu"), ("rate_wall", "pps")):
        base = {f: _median([x[field] for x in samples["none"][f]]) for f in flows}
        for name, by_flow in samples.items():
            rec = run["systems"][name]
            rec[key] = {f: _median([x[field] for x in v]) for f, v in by_flow.items()}
            rec[key.replace("rate", "rel")] = {f: rec[key][f] / base[f] if base[f] else None
                                               for f in flows}
    log(f"{mix} N={n}: rate vs no rules (match, miss): " + ", ".join(
        f"{s} {run['systems'][s]['rel']['match']:.3g} {run['systems'][s]['rel']['miss']:.3g}"
        for s in active))

    # Appends one after another, N+1, N+2, ... rules: the median of a few, since a
    # single command's time varies by tens of milliseconds here.
    for name in active:
        rec = run["systems"][name]
        try:
            rec["append_samples_s"] = [systems[name].append(ruleset) for _ in range(APPENDS)]
            rec["append_s"] = _median(rec["append_samples_s"])
            if name == "bpfilter":
                rec["append_exec_samples_s"] = [systems[name].append_exec(ruleset)
                                                for _ in range(APPENDS)]
                rec["append_exec_s"] = _median(rec["append_exec_samples_s"])
        except ApplyError as err:
            rec["append_error"], rec["append_s"] = str(err), err.seconds

    if "bpfilter" in systems:
        run["bpfilter"]["replay"] = replay_load(
            replace_blob(ruleset.iptables_restore(), family=FAMILY[ruleset.family]),
            ruleset.family)
        log(f"{mix} N={n}: bpfilter load replay: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in run["bpfilter"]["replay"]["stages_s"].items()))
    return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help=f"rule counts (default {','.join(map(str, FULL_SIZES))}; "
                                   f"with --quick {','.join(map(str, QUICK_SIZES))})")
    p.add_argument("--mixes", default=",".join(rules.MIXES),
                   help=f"rule mixes (default {','.join(rules.MIXES)})")
    p.add_argument("--quick", action="store_true",
                   help="N up to 1000, one 1 s window per system and flow")
    p.add_argument("--out", help="result directory (default results/bench-<date>)")
    p.add_argument("--window", type=float, help="seconds per rate sample (default 1)")
    p.add_argument("--reps", type=int, help="samples per system and flow, the median is kept "
                                            "(default 3, 1 with --quick)")
    p.add_argument("--repeat", type=int, default=100000,
                   help="BPF_PROG_TEST_RUN repetitions (default 100000)")
    p.add_argument("--seed", type=int, default=1, help="ruleset seed (default 1)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        list(QUICK_SIZES if args.quick else FULL_SIZES)
    args.mixes = args.mixes.split(",")
    for mix in args.mixes:
        if mix not in rules.MIXES:
            p.error(f"unknown mix {mix!r} (known: {', '.join(rules.MIXES)})")
    if args.window is None:
        args.window = 1.0
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if not args.out:
        args.out = os.path.join("results", "bench-" +
                                datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return args


def _ensure_tools() -> None:
    missing = [t for t in ("cc", "ip", "nft", "iptables-legacy-restore", "ip6tables-legacy-restore")
               if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)} (Debian: gcc iproute2 nftables iptables)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib for the plot")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--root-user-action=ignore", "matplotlib"], check=True)


def _bpfilter_source() -> dict:
    """Which bpfilter was measured: the one `import bpfilter` finds (PYTHONPATH can
    point at another checkout), and its revision when that is a git work tree."""
    import bpfilter
    where = os.path.dirname(os.path.abspath(bpfilter.__file__))
    git = ["git", "-C", where]
    rev = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True,
                           text=True)
    return {"path": where, "git_head": rev.stdout.strip() or None,
            "uncommitted_changes": bool(dirty.stdout.strip()) if rev.returncode == 0 else None}


def _host() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "irq_time_accounting": _irq_time_accounting(), "loadavg_at_start": os.getloadavg()}


def _irq_time_accounting() -> "bool | None":
    """With it the kernel charges softirq work to no task, and the per-CPU-second
    rate would miss the receive path (see netlab._runtime)."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return "CONFIG_IRQ_TIME_ACCOUNTING=y\n" in f.read()
    except OSError:
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: needs root (namespaces, iptables, BPF)")
    _ensure_tools()
    from netlab import PAYLOAD, Lab, build_flood
    import report

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)

    sweep_stale()
    os.makedirs(args.out, exist_ok=True)
    private = os.path.join(PRIVATE_ROOT, f"bpbench-{os.getpid()}")
    os.makedirs(private, mode=0o700)
    args.env = environment(private)
    started = time.monotonic()
    results = {"config": {"command": " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
                          "started": datetime.datetime.now().isoformat(timespec="seconds"),
                          "sizes": args.sizes, "mixes": args.mixes, "window_s": args.window,
                          "reps": args.reps, "repeat": args.repeat, "seed": args.seed,
                          "udp_payload": {f"ipv{k}": v for k, v in PAYLOAD.items()},
                          "frame_bytes_with_fcs": {"ipv4": 64, "ipv6": 66},
                          "flows": {f"ipv{family}": {f: vars(v) for f, v in flows.items()}
                                    for family, flows in FLOWS.items()},
                          "rate": "Ip InDelivers (Ip6InDelivers) of the receiver netns per "
                                  "second of CPU time the flood and ksoftirqd got on the "
                                  "sending core (rate_wall: per second of wall clock)",
                          "host": _host(), "bpfilter": _bpfilter_source()},
               "runs": []}
    try:
        flood = build_flood(os.path.join(HERE, "udpflood.c"), private)
        with Lab(f"{NS_PREFIX}{os.getpid()}", ["none", *SYSTEMS], flood) as lab:
            systems = {s: cls(lab.receiver(s), args.env) for s, cls in SYSTEMS.items()}
            systems["bpfilter"].clear()   # starts the private service
            for mix in args.mixes:
                for n in args.sizes:
                    results["runs"].append(bench_one(lab, systems, mix, n, args))
    finally:
        service_log = os.path.join(private, "bpfilter.log")
        if os.path.exists(service_log):
            shutil.copy(service_log, os.path.join(args.out, "bpfilter-service.log"))
        _flush_bpfilter(private)
        shutil.rmtree(private, ignore_errors=True)
        results["runtime_s"] = round(time.monotonic() - started, 1)
        results["config"]["host"]["loadavg_at_end"] = os.getloadavg()
        # What was measured before a failure is still worth keeping.
        paths = report.write(results, args.out) if results["runs"] else {}
    sys.stdout.write(report.tables(results))
    print(f"\nruntime {results['runtime_s']:.0f} s; results in {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
