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
        [sys.executable, os.path.join(ROOT, "tools", "bench", "run.py"), "--sizes", "1,10",
         "--mixes", "ports", "--window", "0.2", "--reps", "1", "--repeat", "1000",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = bench.communicate(timeout=120)
    assert bench.returncode == 0, stderr[-3000:]
    assert "bpfilter" in stdout

    for name in ("results.json", "results.csv", "table.txt", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert [(r["mix"], r["n"]) for r in results["runs"]] == [("ports", 1), ("ports", 10)]
    for run in results["runs"]:
        for system in ("none", "legacy", "nft", "nftset", "bpfilter"):
            rec = run["systems"][system]
            assert not rec.get("error"), (system, rec)
            for flow in ("match", "miss"):
                assert rec["rate"][flow] > 0 and rec["rate_wall"][flow] > 0, (system, flow)
                assert rec["rel"][flow] > 0, (system, flow)
            if system != "none":
                assert rec["apply_s"] > 0 and rec["append_s"] > 0, (system, rec)
        b = run["bpfilter"]
        assert b["ns_per_packet"]["match"] > 0 and b["ns_per_packet"]["miss"] > 0
        assert b["footprint"]["xlated_insns"] > 0 and b["footprint"]["map_bytes"] > 0
        assert b["replay"]["error"] is None and b["replay"]["stages_s"]["verify"] > 0

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5
    assert all(float(r["rate_match_pps"]) > 0 for r in rows)

    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith(f"bpb{bench.pid}-")]
    assert not os.path.exists(f"/run/bpbench-{bench.pid}")
