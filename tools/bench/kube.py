#!/usr/bin/env python3
"""The kube-proxy benchmark: kube-proxy's rules for 0, 1,000 and 10,000 Services
(kubeproxy.py) in one guest of the VM harness (tools/vm), loaded by ip_tables, by
nftables (kube-proxy's nftables mode: a verdict map) and by bpfilter.ko, one after the
other (tools/vm/scenarios/bench-kube.sh):

    python3 tools/bench/kube.py [--sizes 0,1000,10000] [--seconds 5] [--out DIR]

For each system and size: the time to apply the ruleset, the time to change one
Service as kube-proxy does (iptables-restore --noflush; one nft -f), and new TCP
connections per second to the last Service's ClusterIP, DNATed to its endpoints,
relative to the same system with 0 Services (then: the same connections straight to
an endpoint, through the same node and its filter table, no NAT) and with 1 Service
(the same NAT, one Service to look through). The guest runs under TCG (no KVM here):
times are the guest's, many times slower than the host's, and only their ratios
compare. Output: a table on stdout, results.json and table.txt in DIR (default
results/kube-<date>).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools" / "vm"))
import harness  # noqa: E402
import kubeproxy  # noqa: E402

SYSTEMS = ("iptables", "nftables", "bpfilter")


def _inputs(directory: Path, sizes: list[int], seconds: int) -> dict[str, str]:
    """The guest's /etc/bpfilter-vm/kube/ files, written into `directory`."""
    files = {"sizes": " ".join(map(str, sizes)) + "\n", "seconds": f"{seconds}\n"}
    for n in sizes:
        files[f"{n}.rules"] = kubeproxy.iptables(n)
        files[f"{n}.change.rules"] = kubeproxy.iptables_change(n)
        files[f"{n}.nft"] = kubeproxy.nft(n)
        files[f"{n}.change.nft"] = kubeproxy.nft_change(n)
        # with no Service, the baseline: the same connections to an endpoint itself
        files[f"{n}.vip"] = (f"{kubeproxy.Service(n - 1, n).ip} {kubeproxy.SERVICE_PORT}" if n
                             else f"{kubeproxy.ENDPOINTS[0]} {kubeproxy.TARGET_PORT}") + "\n"
    for name, text in files.items():
        (directory / name).write_text(text)
    return {f"/etc/bpfilter-vm/kube/{name}": str(directory / name) for name in files}


def parse(output: str) -> dict:
    """{system: {size: {...}}} from the scenario's result and refused lines."""
    results: dict = {system: {} for system in SYSTEMS}
    for system, n, apply, change, made, ms in re.findall(
            r"^result (\S+) (\d+) (\d+) (\d+) (\d+) (\d+)$", output, re.M):
        results[system][int(n)] = {"apply_s": int(apply) / 100, "change_s": int(change) / 100,
                                    "conn_per_s": int(made) * 1000 / max(int(ms), 1)}
    for system, n, what in re.findall(r"^refused (\S+) (\d+) (.*)$", output, re.M):
        results[system][int(n)] = {"refused": what}
    return results


def table(results: dict, sizes: list[int]) -> str:
    lines = [f"{'system':<10} {'Services':>8} {'apply s':>8} {'change s':>9} {'conn/s':>8} "
             f"{'vs 0':>6} {'vs 1':>6}"]
    for system in SYSTEMS:
        base = results[system].get(0, {}).get("conn_per_s")
        one = results[system].get(1, {}).get("conn_per_s")
        for n in sizes:
            r = results[system].get(n)
            if r is None:
                lines.append(f"{system:<10} {n:>8} (no result)")
            elif "refused" in r:
                lines.append(f"{system:<10} {n:>8} refused: {r['refused']}")
            else:
                ratio = f"{r['conn_per_s'] / base:.2f}" if base else "-"
                ratio1 = f"{r['conn_per_s'] / one:.2f}" if one else "-"
                lines.append(f"{system:<10} {n:>8} {r['apply_s']:>8.2f} {r['change_s']:>9.2f} "
                             f"{r['conn_per_s']:>8.0f} {ratio:>6} {ratio1:>6}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1,1000,10000")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" /
                                             f"kube-{datetime.date.today().isoformat()}"))
    parser.add_argument("--timeout", type=int, default=5400)
    # a node's memory, not the VM tests' 1 GiB: the kernel's tables and nftables' fit
    # in less, bpfilter's service reserves some 28 bytes a byte of replace (50 MB at
    # 10,000 Services: kube-proxy's comments take 256 bytes a rule)
    parser.add_argument("--memory", type=int, default=4096, help="the guest's MiB")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    subprocess.run(["bash", str(ROOT / "tools/build-helper.sh"), "--helper-only"], check=True)
    module = harness.build_module(ROOT)
    kver = harness.kernel_release()
    with tempfile.TemporaryDirectory(prefix="bpfilter-kube.") as tmp:
        extra = {**harness.system_libraries(), **_inputs(Path(tmp), sizes, args.seconds),
                 f"/lib/modules/{kver}/extra/bpfilter.ko": str(module)}
        script = (ROOT / "tools/vm/scenarios/bench-kube.sh").read_text()
        result = harness.run_scenario(script, extra, timeout=args.timeout, memory_mb=args.memory,
                                      console_to=sys.stderr if os.environ.get("VERBOSE") else None)
    results = parse(result.output)
    text = table(results, sizes)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "table.txt").write_text(text + "\n")
    Path(args.out, "results.json").write_text(json.dumps(
        {"sizes": sizes, "seconds": args.seconds, "guest_seconds": result.seconds,
         "results": results, "output": result.output}, indent=1))
    return 0 if result.status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
