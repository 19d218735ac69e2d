"""Short coverage-guided fuzzing runs (tools/fuzz, atheris) of the blob decoder, the
request protocol through the Service and the LOG record formatter, and the
regressions of what the fuzzer found.

Each run: no input raises anything but a BpfilterError with a real errno (the
targets' oracle, tools/fuzz/targets.py), the inputs of its second half leave next to
nothing allocated, and, for the decoder, the inputs that gave it new coverage get the
kernel's own answer (IPT_SO_SET_REPLACE in a scratch namespace).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools", "fuzz"))
import run  # noqa: E402

# A few thousand inputs each: about a minute for the three.
RUNS = {"decoder": 3000, "proto": 2000, "klog": 3000}
# What each target must have reached (its outcomes' names), or the run proved little.
REACHED = {"decoder": {"ok", "EINVAL", "ENOTSUP"}, "proto": {"ok", "EINVAL", "header"},
           "klog": {"line", "unreproducible"}}
RSS_GROWTH = 32 << 20   # libFuzzer's corpus and its coverage tables grow too


@pytest.mark.parametrize("target", sorted(RUNS))
def test_short_fuzz_run(tmp_path, target):
    stats = run.fuzz(target, RUNS[target], str(tmp_path), seed=20261206, trace_from=0.5)
    assert stats["runs"] == RUNS[target]
    assert not stats["findings"], stats["findings"]
    assert REACHED[target] <= stats["outcomes"].keys(), stats["outcomes"]
    assert stats["end"]["traced"] < run.TRACED_GROWTH, stats["end"]
    assert stats["end"]["rss"] - stats["warm"]["rss"] < RSS_GROWTH, (stats["warm"], stats["end"])
    if target == "decoder":
        corpus = sorted(os.path.join(stats["corpus_dir"], n) for n in os.listdir(stats["corpus_dir"]))
        kernel = run.kernel_compare(corpus[:200])
        assert not kernel["disagreements"], kernel
        assert kernel["compared"] >= 20 and len(kernel["kernel_outcomes"]) >= 3, kernel
