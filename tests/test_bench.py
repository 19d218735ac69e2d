"""Smoke test of tools/bench: the whole pipeline on tiny rulesets and short windows.

It checks that the benchmark runs end to end and leaves nothing behind, not what it
measures: rates on a shared 2-core machine in 0.2 s windows say nothing.
"""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.kernel


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    bench = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tools", "bench", "run.py"), "--sizes", "0,10",
         "--mixes", "ports,ports6", "--window", "0.2", "--reps", "1", "--repeat", "1000",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = bench.communicate(timeout=120)
    assert bench.returncode == 0, stderr[-3000:]
    assert "bpfilter" in stdout

    for name in ("results.json", "results.csv", "table.txt", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert [(r["mix"], r["n"], r["family"]) for r in results["runs"]] == [
        ("ports", 0, 4), ("ports", 10, 4), ("ports6", 0, 6), ("ports6", 10, 6)]
    for run in results["runs"]:
        for system in ("none", "legacy", "nft", "nftset", "bpfilter"):
            rec = run["systems"][system]
            assert not rec.get("error"), (system, rec)
            for flow in ("match", "miss"):
                assert rec["rate"][flow] > 0 and rec["rate_wall"][flow] > 0, (system, flow)
                assert rec["rel"][flow] > 0, (system, flow)
            if system != "none":
                assert rec["apply_s"] > 0 and rec["append_s"] > 0, (system, rec)
        assert run["systems"]["bpfilter"]["append_exec_s"] > 0
        b = run["bpfilter"]
        assert b["ns_per_packet"]["match"] > 0 and b["ns_per_packet"]["miss"] > 0
        assert b["footprint"]["xlated_insns"] > 0 and b["footprint"]["map_bytes"] > 0
        assert b["replay"]["error"] is None and b["replay"]["stages_s"]["verify"] > 0

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5
    assert all(float(r["rate_match_pps"]) > 0 for r in rows)
    # the sizes the targets name were not in this run: said so, not guessed
    assert "Targets (issue 5, IPv4)" in stdout and "Targets (issue 12, IPv6)" in stdout
    assert "not measured" in stdout
    assert {t["met"] for t in results["targets"]} == {None}

    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith(f"bpb{bench.pid}-")]
    assert not os.path.exists(f"/run/bpbench-{bench.pid}")


def _run(mix, n, rel, apply_s=1.0, append_s=0.1, family=4):
    return {"mix": mix, "n": n, "family": family, "systems": {"bpfilter": {
        "rel": {"match": rel[0], "miss": rel[1]}, "apply_s": apply_s, "append_s": append_s}}}


def test_targets_are_computed_from_the_runs():
    """Rates relative to the same system's empty chain; each target met or not
    from the figures, per mix; a refused ruleset meets no target."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import report
    results = {"runs": [_run("ports", 0, (0.90, 0.95)),
                        _run("ports", 10000, (0.85, 0.86), append_s=0.15),
                        _run("ports", 100000, (0.70, 0.77), apply_s=5.5)]}
    found = {t["target"]: t for t in report.targets(results)}
    rate10k, rate100k = (found[what] for what, _, _ in report.RATE_TARGETS)
    assert rate10k["value"] == pytest.approx([0.85 / 0.90, 0.86 / 0.95]) and rate10k["met"]
    assert rate100k["value"] == pytest.approx([0.70 / 0.90, 0.77 / 0.95])
    assert rate100k["met"] is False   # 0.778 for the matching flow
    assert found[report.APPLY_TARGET[0]]["met"] is False
    assert found[report.APPEND_TARGET[0]]["met"] is True
    results["runs"][2]["systems"]["bpfilter"]["error"] = "refused"
    found = {t["target"]: t for t in report.targets(results)}
    assert found[report.APPLY_TARGET[0]]["met"] is False
    assert found[report.APPLY_TARGET[0]]["measured"] == "refused"


def test_ipv6_mixes_have_the_rate_targets():
    """IPv6 mixes (issue 12) are held to the rates at 10k and 100k rules only."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import report
    results = {"runs": [_run("blocklist6", 0, (0.90, 0.90), family=6),
                        _run("blocklist6", 10000, (0.85, 0.86), family=6),
                        _run("blocklist6", 100000, (0.70, 0.77), family=6)]}
    found = report.targets(results)
    assert [(t["target"], t["family"], t["met"]) for t in found] == [
        (report.RATE_TARGETS[0][0], 6, True), (report.RATE_TARGETS[1][0], 6, False)]


def test_kube_proxy_rulesets_load_as_kube_proxy_applies_them(tmp_path):
    """tools/bench/kubeproxy.py's rulesets, which kube.py measures: the kernel's
    iptables and nftables take them and their changes (iptables-restore --noflush,
    nft -f), and the change moves the first Service's endpoint in both."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import kubeproxy
    _, after = kubeproxy._moved(3)
    for n in (0, 3):
        name = f"bpfl-kube{n}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            run = lambda argv, text: subprocess.run(  # noqa: E731
                ["ip", "netns", "exec", name, *argv], input=text, text=True,
                capture_output=True, check=True)
            run(["iptables-legacy-restore"], kubeproxy.iptables(n))
            run(["iptables-legacy-restore", "--noflush"], kubeproxy.iptables_change(n))
            run(["nft", "-f", "-"], kubeproxy.nft(n))
            run(["nft", "-f", "-"], kubeproxy.nft_change(n))
            saved = run(["iptables-legacy-save", "-t", "nat"], "").stdout
            listed = run(["nft", "list", "table", "ip", "kube-proxy"], "").stdout
            assert sum(line.startswith("-A KUBE-SERVICES") and "-j KUBE-SVC-" in line
                       for line in saved.splitlines()) == n
            assert (f"--to-destination {after.endpoints[0]}:" in saved) == bool(n)
            assert (f"dnat to {after.endpoints[0]}:" in listed) == bool(n)
            assert saved.count(":KUBE-SEP-") == 2 * n
        finally:
            subprocess.run(["ip", "netns", "del", name], check=True)
