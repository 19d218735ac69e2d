#!/usr/bin/env python3
"""Fuzz one target of targets.py (decoder, proto, klog) with atheris.

    python3 tools/fuzz/run.py --target decoder --runs 1000000 [--workdir DIR] [--seed N]
                              [--kernel-sample K] [--jobs 1]

Seeds the corpus (seeds.py) on the first run, runs child.py for --runs inputs (the
corpus grows in WORKDIR/TARGET/corpus, findings in WORKDIR/TARGET/findings, libFuzzer's
log in WORKDIR/TARGET/fuzz.log), then, for the decoder, replays up to K inputs of the
corpus (those that gave the fuzzer new coverage: the most varied) to the kernel's own
IPT_SO_SET_REPLACE / IP6T_SO_SET_REPLACE in a scratch network namespace and compares
its errno with the decoder's. Prints the figures as JSON; exits 1 on any finding, any
disagreement with the kernel, or memory that grew after the warm-up.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "umh"), os.path.join(ROOT, "tests")]

# What the inputs traced may leave allocated: the decoder's bounded caches of names
# (codec._name, ipv4.interface: 1024 entries each) still take the fuzzer's new names.
TRACED_GROWTH = 1 << 20


def seeds_dir(workdir: str, target: str) -> str:
    import seeds
    path = os.path.join(workdir, target, "seeds")
    if not os.path.isdir(path) or not os.listdir(path):
        seeds.write(target, path)
    return path


def fuzz(target: str, runs: int, workdir: str, seed: int, trace_from: float = 0.5) -> dict:
    import targets
    base = os.path.join(workdir, target)
    corpus, findings = os.path.join(base, "corpus"), os.path.join(base, "findings")
    os.makedirs(corpus, exist_ok=True)
    stats_file = os.path.join(base, "stats.json")
    if os.path.exists(stats_file):
        os.unlink(stats_file)
    seeds = seeds_dir(workdir, target)
    argv = [sys.executable, os.path.join(HERE, "child.py"), "--target", target,
            "--runs", str(runs), "--trace-from", str(trace_from), "--stats", stats_file, "--findings", findings, "--seeds", seeds,
            corpus, seeds, f"-seed={seed}", f"-max_len={targets.TARGETS[target].max_len}",
            f"-artifact_prefix={findings}/", "-timeout=20", "-rss_limit_mb=4096",
            "-print_final_stats=1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "umh"), os.path.join(ROOT, "tests"), HERE]))
    with open(os.path.join(base, "fuzz.log"), "w") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    with open(os.path.join(base, "fuzz.log")) as f:
        text = f.read()
    if not os.path.exists(stats_file):
        raise SystemExit(f"the fuzzer stopped before its {runs} runs (status "
                         f"{done.returncode}):\n{text[-4000:]}")
    with open(stats_file) as f:
        stats = json.load(f)
    figures = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
    if figures:
        cov, ft, corp = map(int, figures[-1])
        stats["coverage"] = {"edges": cov, "features": ft, "corpus": corp}
    stats["corpus_dir"] = corpus
    return stats


def kernel_compare(paths: "list[str]") -> dict:
    """The decoder's answer and the kernel's to the same blobs, in a scratch network
    namespace: the decoder refuses with the kernel's errno, or accepts what the kernel
    accepts (EOPNOTSUPP, bpfilter's own refusal, only of what the kernel accepts).

    The kernel also compares num_counters with the table in place (EAGAIN), which the
    decoder leaves to the service: each blob is given the kernel's current count first."""
    import struct

    import targets
    from bpfilter.abi import sockopt
    from bpfilter.abi import xtables as X
    from bpfilter.errors import BpfilterError
    from bpfilter.netns import entered
    from bpfilter_lab import namespaces

    from seeds import NUM_COUNTERS_AT

    compared, agreed, disagreements, outcomes = 0, 0, [], {}
    with namespaces.scratch("bpft-fuzzk") as ns, entered(ns):
        for path in paths:
            with open(path, "rb") as f:
                data = f.read()
            if not data:
                continue
            flags, family, blob, optlen = targets.decoder_split(data)
            if optlen is None or len(blob) < X.SIZEOF_IPT_REPLACE:
                continue   # a caller's optlen beyond its memory: nothing to compare
            try:
                count = X.ipt_getinfo.parse(sockopt.get_info(X.cstr(blob[:X.XT_TABLE_MAXNAMELEN - 1]),
                                                             family)).num_entries
                blob = bytearray(blob)
                struct.pack_into("<I", blob, NUM_COUNTERS_AT, count)
                blob = bytes(blob)
            except (BpfilterError, UnicodeDecodeError):
                pass       # no such table: the kernel says so before counting
            try:
                ours = targets.decode_outcome(blob, family, len(blob))
                ours = None if ours[0] == "ok" else ours[1]
            except Exception as err:   # the fuzzing run counts it as a finding too
                ours = f"{type(err).__name__}: {err}"
            try:
                sockopt.set_replace(blob, len(blob), family)
                theirs = None
            except BpfilterError as err:
                theirs = err.errno
            compared += 1
            key = f"{errno.errorcode.get(theirs, 'accepted')}"
            outcomes[key] = outcomes.get(key, 0) + 1
            if ours == theirs or (ours == errno.EOPNOTSUPP and theirs is None):
                agreed += 1
            else:
                disagreements.append({"input": path, "family": family.name,
                                      "bpfilter": ours if isinstance(ours, str)
                                      else errno.errorcode.get(ours, "accepted"),
                                      "kernel": errno.errorcode.get(theirs, "accepted")})
    return {"compared": compared, "agreed": agreed, "kernel_outcomes": outcomes,
            "disagreements": disagreements}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, choices=("decoder", "proto", "klog"))
    p.add_argument("--runs", type=int, default=100000)
    p.add_argument("--workdir", default="/var/tmp/bpfilter-fuzz")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trace-from", type=float, default=0.9,
                   help="the fraction of the run after which tracemalloc traces allocations")
    p.add_argument("--kernel-sample", type=int, default=2000,
                   help="decoder: how many corpus inputs to compare with the kernel")
    args = p.parse_args()
    stats = fuzz(args.target, args.runs, args.workdir, args.seed, args.trace_from)
    failed = bool(stats["findings"])
    failed |= stats["end"]["traced"] > TRACED_GROWTH
    if args.target == "decoder" and args.kernel_sample:
        paths = sorted(os.path.join(stats["corpus_dir"], n) for n in os.listdir(stats["corpus_dir"]))
        random.Random(args.seed).shuffle(paths)
        stats["kernel"] = kernel_compare(paths[:args.kernel_sample])
        failed |= bool(stats["kernel"]["disagreements"])
    print(json.dumps(stats, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
