"""One fuzzing process (run.py starts it): atheris, libFuzzer's coverage-guided engine
for Python, over one target of targets.py, bpfilter's modules instrumented.

The callback never lets an exception through: each unexpected one is a finding, kept
once per place (its type and the innermost frame of bpfilter's) with the first input
that raised it and its traceback, and the run goes on. It stops itself after --runs
inputs, writing --stats: inputs, time, outcome counts, findings, and the memory: the
RSS at the end of the warm-up (a tenth of the run) and at the end, and the bytes still
allocated at the end (after a full collection) of those allocated since tracemalloc
started, at --trace-from (a fraction of the run, after the warm-up): what the run
keeps of its later inputs. Tracing costs four times the time of an input: a long run
traces its last part only.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
import traceback
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "umh"), os.path.join(ROOT, "tests")]

import atheris  # noqa: E402

with atheris.instrument_imports(include=["bpfilter"]):
    import targets  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory() -> dict:
    gc.collect()
    return {"traced": tracemalloc.get_traced_memory()[0], "rss": rss()}


def place(err: BaseException) -> str:
    """Where the exception comes from: its type and bpfilter's innermost frame."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/bpfilter/" in f.filename]
    where = frames[-1] if frames else traceback.extract_tb(err.__traceback__)[-1]
    first = str(err).split(":")[0][:60] if isinstance(err, targets.Finding) else ""
    return f"{type(err).__name__} {os.path.basename(where.filename)}:{where.lineno} {first}".strip()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, choices=sorted(targets.TARGETS))
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--findings", required=True)
    p.add_argument("--seeds", required=True)
    p.add_argument("--trace-from", type=float, default=0.5)
    p.add_argument("--idle-every", type=int, default=1000)
    args, libfuzzer = p.parse_known_args()
    target = targets.TARGETS[args.target]()
    seeds = {}
    for name in sorted(os.listdir(args.seeds)):
        with open(os.path.join(args.seeds, name), "rb") as f:
            seeds[name] = f.read()
    target.open(seeds)
    os.makedirs(args.findings, exist_ok=True)
    warm_up = max(1, args.runs // 10)
    trace_from = max(warm_up, int(args.runs * args.trace_from))
    state = {"n": 0, "outcomes": {}, "findings": {}, "started": time.monotonic()}

    def finish() -> None:
        state["end"] = memory()
        seconds = time.monotonic() - state["started"]
        stats = {"target": args.target, "runs": state["n"], "seconds": round(seconds, 1),
                 "inputs_per_s": round(state["n"] / seconds), "outcomes": state["outcomes"],
                 "findings": state["findings"], "warm": state["warm"], "end": state["end"],
                 "traced_inputs": state["n"] - trace_from}
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=1)
        target.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def one(data: bytes) -> None:
        state["n"] += 1
        try:
            outcome = target.one(data) or "ok"
        except Exception as err:  # a finding: every failure must be a BpfilterError
            outcome = "finding"
            key = place(err)
            if key not in state["findings"]:
                name = hashlib.sha1(key.encode()).hexdigest()[:12]
                with open(os.path.join(args.findings, name), "wb") as f:
                    f.write(data)
                with open(os.path.join(args.findings, name + ".txt"), "w") as f:
                    f.write(f"{key}\n\n{''.join(traceback.format_exception(err))}")
                print(f"FINDING {name}: {key}", file=sys.stderr, flush=True)
                state["findings"][key] = {"file": name, "count": 0}
            state["findings"][key]["count"] += 1
        state["outcomes"][outcome] = state["outcomes"].get(outcome, 0) + 1
        if state["n"] % args.idle_every == 0:
            target.idle()
        if state["n"] == warm_up:
            state["warm"] = memory()
        if state["n"] == trace_from:
            gc.collect()
            tracemalloc.start()
        if state["n"] >= args.runs:
            finish()

    atheris.Setup([sys.argv[0], *libfuzzer], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
