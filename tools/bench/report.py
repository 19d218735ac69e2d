"""The results as a person reads them: text tables, CSV, JSON and one PNG."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional

FLOW_NAMES = ("match", "miss")
RULE_SYSTEMS = ("legacy", "nft", "nftset", "bpfilter")
LABELS = {"none": "no rules", "legacy": "iptables-legacy", "nft": "nftables",
          "nftset": "nftables sets", "bpfilter": "bpfilter"}
COLORS = {"legacy": "tab:red", "nft": "tab:green", "nftset": "tab:olive",
          "bpfilter": "tab:blue"}
MIX_STYLES = {"blocklist": "-", "ports": "--", "classbench": ":"}
CSV_FIELDS = ("mix", "n", "system", "rate_match_pps", "rate_miss_pps", "rel_match", "rel_miss",
              "apply_s", "append_s", "ns_per_pkt_match", "ns_per_pkt_miss", "test_run_repeat",
              "xlated_insns", "jited_bytes", "map_bytes", "error")


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pair(a: Optional[float], b: Optional[float], fmt: str) -> str:
    return f"{_num(a, fmt)} / {_num(b, fmt)}"


def _rel(sysres: dict, flow: str) -> Optional[float]:
    return sysres.get("rel", {}).get(flow)


def tables(results: dict) -> str:
    runs = results["runs"]
    out = []
    w = results["config"]
    out.append(f"Packet rate at the receiver relative to no rules, median of {w['reps']} x "
               f"{w['window_s']:g} s (64-byte frames: UDP payload {w['udp_payload']}); "
               f"'match last / no match'")
    head = f"{'mix':<11}{'N':>7}  {'no rules kpps':>15}" + "".join(
        f"  {LABELS[s]:>17}" for s in RULE_SYSTEMS)
    out += [head, "-" * len(head)]
    for run in runs:
        base = run["systems"]["none"]["rate"]
        line = f"{run['mix']:<11}{run['n']:>7}  " + \
            f"{_pair(base.get('match', 0) / 1e3, base.get('miss', 0) / 1e3, '.0f'):>15}"
        for s in RULE_SYSTEMS:
            r = run["systems"].get(s, {})
            cell = "n/a" if r.get("unsupported") else "refused" if r.get("error") else \
                _pair(_rel(r, "match"), _rel(r, "miss"), ".3g")
            line += f"  {cell:>17}"
        out.append(line)

    out.append("")
    out.append("Time to apply N rules / to append one more, seconds (whole command, wall clock)")
    head = f"{'mix':<11}{'N':>7}" + "".join(f"  {LABELS[s]:>17}" for s in RULE_SYSTEMS)
    out += [head, "-" * len(head)]
    for run in runs:
        line = f"{run['mix']:<11}{run['n']:>7}"
        for s in RULE_SYSTEMS:
            r = run["systems"].get(s, {})
            cell = "n/a" if r.get("unsupported") else \
                f"{_num(r.get('apply_s'), '.3g')} / {_num(r.get('append_s'), '.3g')}"
            if r.get("error"):
                cell = f"refused {_num(r.get('apply_s'), '.3g')}"
            line += f"  {cell:>17}"
        out.append(line)

    out.append("")
    out.append("bpfilter: INPUT program (BPF_PROG_TEST_RUN ns/packet, match last / no match), "
               "its size, its maps; a replay of the load (seconds per stage)")
    head = (f"{'mix':<11}{'N':>7}  {'ns/packet':>17} {'insns':>8} {'jited B':>9} "
            f"{'maps B':>10}  {'parse':>6} {'decode':>6} {'compile':>7} {'assemble':>8} "
            f"{'verify':>7}")
    out += [head, "-" * len(head)]
    for run in runs:
        b = run.get("bpfilter") or {}
        ns = b.get("ns_per_packet", {})
        fp = b.get("footprint", {})
        stages = (b.get("replay") or {}).get("stages_s", {})
        line = (f"{run['mix']:<11}{run['n']:>7}  {_pair(ns.get('match'), ns.get('miss'), '.0f'):>17} "
                f"{_num(fp.get('xlated_insns'), 'd'):>8} {_num(fp.get('jited_bytes'), 'd'):>9} "
                f"{_num(fp.get('map_bytes'), 'd'):>10}  "
                + " ".join(f"{_num(stages.get(k), '.2f'):>{w}}" for k, w in
                           (("parse", 6), ("decode", 6), ("compile", 7), ("assemble", 8),
                            ("verify", 7))))
        out.append(line)

    errors = [(run["mix"], run["n"], s, r["error"]) for run in runs
              for s, r in run["systems"].items() if r.get("error")]
    errors += [(run["mix"], run["n"], "bpfilter replay", run["bpfilter"]["replay"]["error"])
               for run in runs if (run.get("bpfilter") or {}).get("replay", {}).get("error")]
    if errors:
        out.append("")
        out.append("Refusals and failures:")
        out += [f"  {mix} N={n} {who}: {why}" for mix, n, who, why in errors]
    return "\n".join(out) + "\n"


def csv_rows(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        b = run.get("bpfilter") or {}
        for s, r in run["systems"].items():
            row = {"mix": run["mix"], "n": run["n"], "system": s,
                   "rate_match_pps": r.get("rate", {}).get("match"),
                   "rate_miss_pps": r.get("rate", {}).get("miss"),
                   "rel_match": _rel(r, "match"), "rel_miss": _rel(r, "miss"),
                   "apply_s": r.get("apply_s"), "append_s": r.get("append_s"),
                   "error": r.get("error") or ("unsupported" if r.get("unsupported") else None)}
            if s == "bpfilter":
                fp = b.get("footprint", {})
                row.update(ns_per_pkt_match=b.get("ns_per_packet", {}).get("match"),
                           ns_per_pkt_miss=b.get("ns_per_packet", {}).get("miss"),
                           test_run_repeat=b.get("repeat"),
                           xlated_insns=fp.get("xlated_insns"),
                           jited_bytes=fp.get("jited_bytes"), map_bytes=fp.get("map_bytes"))
            rows.append(row)
    return rows


def write(results: dict, out_dir: str) -> dict:
    paths = {name: os.path.join(out_dir, name) for name in
             ("results.json", "results.csv", "table.txt", "bench.png")}
    with open(paths["results.json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for row in csv_rows(results):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    with open(paths["table.txt"], "w") as f:
        f.write(tables(results))
    plot(results, paths["bench.png"])
    return paths


def _series(results: dict, mix: str, pick) -> tuple[list, list]:
    xs, ys = [], []
    for run in results["runs"]:
        if run["mix"] == mix:
            y = pick(run)
            if y is not None and y > 0 and math.isfinite(y):
                xs.append(run["n"])
                ys.append(y)
    return xs, ys


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(dict.fromkeys(run["mix"] for run in results["runs"]))
    sizes = sorted({run["n"] for run in results["runs"]})
    fig, axes = plt.subplots(2, max(len(mixes), 3), figsize=(6 * max(len(mixes), 3), 10.5),
                             squeeze=False)
    cfg = results["config"]
    fig.suptitle(f"bpfilter baseline: packet rate vs rule count ({cfg['host']['kernel']}, "
                 f"{cfg['host']['cpus']} CPUs; 64-byte frames; solid = matching rule last, "
                 f"dashed = no rule matches)", fontsize=12)

    def logx(ax):
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{n:,}" for n in sizes])
        ax.set_xlabel("rules (N)")
        ax.grid(True, which="major", alpha=0.3)

    for col, mix in enumerate(mixes):
        ax = axes[0][col]
        for s in RULE_SYSTEMS:
            for flow, style in (("match", "-"), ("miss", "--")):
                xs, ys = _series(results, mix, lambda run: _rel(run["systems"].get(s, {}), flow))
                if xs:
                    ax.plot(xs, ys, style, marker="o", ms=4, color=COLORS[s],
                            label=LABELS[s] if flow == "match" else None)
            refused = [run["n"] for run in results["runs"]
                       if run["mix"] == mix and run["systems"].get(s, {}).get("error")]
            for n in refused:
                ax.annotate(f"{LABELS[s]}\nrefused", (n, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(0, -4), textcoords="offset points", ha="center", va="top",
                            fontsize=8, color=COLORS[s])
                ax.plot([n], [0.0], "x", color=COLORS[s], ms=9, mew=2,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        ax.axhline(1.0, color="black", lw=1, alpha=0.5)
        ax.set_yscale("log")
        ax.set_ylim(top=1.5)
        ax.set_title(f"{mix}: packets received / no-rules rate")
        ax.set_ylabel("rate relative to no rules (log)")
        logx(ax)
        ax.legend(fontsize=9, loc="lower left")

    ax = axes[1][0]
    for mix in mixes:
        for flow, style in (("match", "-"), ("miss", "--")):
            xs, ys = _series(results, mix, lambda run: (run.get("bpfilter") or {})
                             .get("ns_per_packet", {}).get(flow))
            if xs:
                ax.plot(xs, ys, style, marker="o", ms=4, label=f"{mix}" if flow == "match" else None,
                        color={"blocklist": "tab:blue", "ports": "tab:purple",
                               "classbench": "tab:cyan"}.get(mix))
    ax.set_yscale("log")
    ax.set_title("bpfilter INPUT program: BPF_PROG_TEST_RUN ns/packet")
    ax.set_ylabel("ns per packet (log)")
    logx(ax)
    ax.legend(fontsize=9)

    for ax, key, title in ((axes[1][1], "apply_s", "time to apply N rules"),
                           (axes[1][2], "append_s", "time to append one rule to N")):
        for s in RULE_SYSTEMS:
            for mix in mixes:
                xs, ys = _series(results, mix, lambda run: None if run["systems"].get(s, {})
                                 .get("error") else run["systems"].get(s, {}).get(key))
                if xs:
                    ax.plot(xs, ys, MIX_STYLES.get(mix, "-"), marker="o", ms=4, color=COLORS[s],
                            label=f"{LABELS[s]}, {mix}")
        ax.set_yscale("log")
        ax.set_title(f"{title} (solid blocklist, dashed ports, dotted classbench)")
        ax.set_ylabel("seconds, whole command (log)")
        logx(ax)
        ax.legend(fontsize=7, ncol=2)
    for ax in axes[1][3:]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
