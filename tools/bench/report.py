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
MIX_STYLES = {"blocklist": "-", "ports": "--", "classbench": ":", "blocklist6": "-.",
              "ports6": (0, (5, 1, 1, 1, 1, 1))}
LOAD_STAGES = ("parse", "decode", "compile", "assemble", "verify")
CSV_FIELDS = ("mix", "n", "system", "rate_match_pps", "rate_miss_pps", "rel_match", "rel_miss",
              "wall_rate_match_pps", "wall_rate_miss_pps", "wall_rel_match", "wall_rel_miss",
              "apply_s", "append_s", "append_exec_s", "ns_per_pkt_match", "ns_per_pkt_miss",
              "test_run_repeat", "xlated_insns", "jited_bytes", "map_bytes", *(f"load_{k}_s" for k in LOAD_STAGES),
              "error")


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
    out.append(f"Packets delivered past INPUT per CPU-second of the sending core, relative to "
               f"no rules; median of {w['reps']} x {w['window_s']:g} s; the smallest UDP frames "
               f"(64 bytes on the wire for IPv4, 66 for IPv6); 'match last / no match'")
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
                f"refused {_num(r.get('apply_s'), '.3g')}" if r.get("error") else \
                f"{_num(r.get('apply_s'), '.3g')} / {_num(r.get('append_s'), '.3g')}"
            line += f"  {cell:>17}"
        out.append(line)

    out.append("")
    out.append("bpfilter: INPUT program (BPF_PROG_TEST_RUN ns/packet, match last / no match), "
               "its size, its maps; the load replayed in-process (seconds per stage); "
               "appending through `bpfilter exec` (seconds)")
    head = (f"{'mix':<11}{'N':>7}  {'ns/packet':>17} {'insns':>8} {'jited B':>9} "
            f"{'maps B':>10}  {'parse':>6} {'decode':>6} {'compile':>7} {'assemble':>8} "
            f"{'verify':>7} {'other':>6}  {'exec append':>11}")
    out += [head, "-" * len(head)]
    for run in runs:
        b = run.get("bpfilter") or {}
        ns = b.get("ns_per_packet", {})
        fp = b.get("footprint", {})
        replay = b.get("replay") or {}
        stages = dict(replay.get("stages_s", {}))
        if stages:
            stages["other"] = replay["total_s"] - sum(stages.values())
        line = (f"{run['mix']:<11}{run['n']:>7}  {_pair(ns.get('match'), ns.get('miss'), '.0f'):>17} "
                f"{_num(fp.get('xlated_insns'), 'd'):>8} {_num(fp.get('jited_bytes'), 'd'):>9} "
                f"{_num(fp.get('map_bytes'), 'd'):>10}  "
                + " ".join(f"{_num(stages.get(k), '.2f'):>{w}}" for k, w in
                           (("parse", 6), ("decode", 6), ("compile", 7), ("assemble", 8),
                            ("verify", 7), ("other", 6)))
                + f"  {_num(run['systems'].get('bpfilter', {}).get('append_exec_s'), '.3g'):>11}")
        out.append(line)

    found = targets(results)
    for family, (issue, _) in TARGETS.items():
        mine = [t for t in found if t["family"] == family]
        if not mine:
            continue
        out.append("")
        out.append(f"Targets ({issue}, IPv{family}), bpfilter; a rate is relative to its own "
                   "with an empty INPUT chain (N = 0), 'match last / no match'")
        for t in mine:
            out.append(f"  {t['target']:<46} {t['mix']:<11} {t['measured']:>17}  "
                       f"{'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'}")

    errors = [(run["mix"], run["n"], f"{s}{what}", r[key]) for run in runs
              for s, r in run["systems"].items()
              for key, what in (("error", ""), ("append_error", " append")) if r.get(key)]
    errors += [(run["mix"], run["n"], "bpfilter replay", run["bpfilter"]["replay"]["error"])
               for run in runs if (run.get("bpfilter") or {}).get("replay", {}).get("error")]
    if errors:
        out.append("")
        out.append("Refusals and failures:")
        out += [f"  {mix} N={n} {who}: {why}" for mix, n, who, why in errors]
    return "\n".join(out) + "\n"


# (what, N, the rates' floor relative to N = 0)
RATE_TARGETS = (("packet rate at 10k rules >= 0.90 of 0 rules", 10000, 0.90),
                ("packet rate at 100k rules >= 0.80 of 0 rules", 100000, 0.80))
APPLY_TARGET = ("apply 100k rules <= 5 s", 100000, 5.0)
APPEND_TARGET = ("append one rule to 10k rules <= 0.2 s", 10000, 0.2)
# The targets of each family's mixes: the rates, and for IPv4 (issue 5) the times of
# applying and appending, with the figure each is read from; IPv6's are issue 12's
TARGETS = {4: ("issue 5", ((APPLY_TARGET, "apply_s"), (APPEND_TARGET, "append_s"))),
           6: ("issue 12", ())}


def _family(results: dict, mix: str) -> int:
    return next((run.get("family", 4) for run in results["runs"] if run["mix"] == mix), 4)


def targets(results: dict) -> list[dict]:
    """Each target per mix: what was measured and whether it is met (None: a size
    the run did not have)."""
    runs = {(run["mix"], run["n"]): run["systems"].get("bpfilter", {})
            for run in results["runs"]}
    mixes = list(dict.fromkeys(run["mix"] for run in results["runs"]))
    out = []
    for mix in mixes:
        family = _family(results, mix)
        empty = runs.get((mix, 0), {})
        for what, n, floor in RATE_TARGETS:
            rec = runs.get((mix, n), {})
            ratios = [(_rel(rec, f) / _rel(empty, f)) if _rel(rec, f) and _rel(empty, f)
                      else None for f in FLOW_NAMES]
            known = None not in ratios
            out.append({"target": what, "mix": mix, "family": family, "n": n, "value": ratios,
                        "measured": _pair(*ratios, ".3f"),
                        "met": min(ratios) >= floor if known else None})
        for (what, n, limit), key in TARGETS[family][1]:
            rec = runs.get((mix, n), {})
            value = None if rec.get("error") else rec.get(key)
            out.append({"target": what, "mix": mix, "family": family, "n": n, "value": value,
                        "measured": "refused" if rec.get("error") else f"{_num(value, '.3f')} s",
                        "met": False if rec.get("error") else
                        value <= limit if value is not None else None})
    return out


def csv_rows(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        b = run.get("bpfilter") or {}
        for s, r in run["systems"].items():
            row = {"mix": run["mix"], "n": run["n"], "system": s,
                   "rate_match_pps": r.get("rate", {}).get("match"),
                   "rate_miss_pps": r.get("rate", {}).get("miss"),
                   "rel_match": _rel(r, "match"), "rel_miss": _rel(r, "miss"),
                   "wall_rate_match_pps": r.get("rate_wall", {}).get("match"),
                   "wall_rate_miss_pps": r.get("rate_wall", {}).get("miss"),
                   "wall_rel_match": r.get("rel_wall", {}).get("match"),
                   "wall_rel_miss": r.get("rel_wall", {}).get("miss"),
                   "apply_s": r.get("apply_s"), "append_s": r.get("append_s"),
                   "append_exec_s": r.get("append_exec_s"),
                   "error": r.get("error") or ("unsupported" if r.get("unsupported") else None)}
            if s == "bpfilter":
                fp = b.get("footprint", {})
                row.update(ns_per_pkt_match=b.get("ns_per_packet", {}).get("match"),
                           ns_per_pkt_miss=b.get("ns_per_packet", {}).get("miss"),
                           test_run_repeat=b.get("repeat"),
                           xlated_insns=fp.get("xlated_insns"),
                           jited_bytes=fp.get("jited_bytes"), map_bytes=fp.get("map_bytes"),
                           **{f"load_{k}_s": (b.get("replay") or {}).get("stages_s", {}).get(k)
                              for k in LOAD_STAGES})
            rows.append(row)
    return rows


def write(results: dict, out_dir: str) -> dict:
    paths = {name: os.path.join(out_dir, name) for name in
             ("results.json", "results.csv", "table.txt", "bench.png")}
    with open(paths["results.json"], "w") as f:
        json.dump(dict(results, targets=targets(results)), f, indent=1)
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
        if run["mix"] == mix and run["n"]:   # N = 0 has no place on a log axis
            y = pick(run)
            if y is not None and y > 0 and math.isfinite(y):
                xs.append(run["n"])
                ys.append(y)
    return xs, ys


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    mixes = list(dict.fromkeys(run["mix"] for run in results["runs"]))
    sizes = sorted({run["n"] for run in results["runs"] if run["n"]})
    cols = max(len(mixes), 3)
    fig, axes = plt.subplots(2, cols, figsize=(6 * cols, 10.5), squeeze=False)
    cfg = results["config"]
    fig.suptitle(f"Packet filters vs rule count, {cfg['host']['kernel']}, {cfg['host']['cpus']} CPUs, "
                 f"the smallest UDP frames (IPv4 64 bytes, IPv6 66).  Solid: the matching rule "
                 f"is last; dashed: no rule matches (policy ACCEPT).", fontsize=12)
    plain = FuncFormatter(lambda v, _: f"{v:g}")

    def axes_setup(ax, ylabel, yticks):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_major_locator(FixedLocator(yticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("rules in INPUT (N)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)

    decades = [m * 10.0 ** e for e in range(-4, 7) for m in (1, 2, 5)]
    rels = [_rel(run["systems"].get(s, {}), f) for run in results["runs"]
            for s in RULE_SYSTEMS for f in FLOW_NAMES]
    low = min([r for r in rels if r] or [0.5])
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
            if refused:
                ax.plot(refused, [low / 1.6] * len(refused), "X", color=COLORS[s], ms=10,
                        label=f"{LABELS[s]} refused the ruleset")
        ax.axhline(1.0, color="black", lw=1, alpha=0.5)
        empty = next((_rel(run["systems"].get("bpfilter", {}), "match") for run in results["runs"]
                      if run["mix"] == mix and run["n"] == 0), None)
        if empty:
            ax.axhline(empty, color=COLORS["bpfilter"], lw=1, ls=":",
                       label="bpfilter, empty INPUT chain")
        ax.set_ylim(low / 2.2, 1.4)
        ax.set_title(f"{mix}: delivered packet rate relative to no rules")
        axes_setup(ax, "delivered per CPU-second, relative to no rules",
                   [t for t in decades if t <= 1])
        ax.legend(fontsize=9, loc="best")

    ax = axes[1][0]
    mix_colors = dict(zip(mixes, ("tab:blue", "tab:purple", "tab:cyan", "tab:gray", "tab:brown",
                                  "tab:pink")))
    for mix in mixes:
        for flow, style in (("match", "-"), ("miss", "--")):
            xs, ys = _series(results, mix, lambda run: (run.get("bpfilter") or {})
                             .get("ns_per_packet", {}).get(flow))
            if xs:
                ax.plot(xs, ys, style, marker="o", ms=4, color=mix_colors[mix],
                        label=mix if flow == "match" else None)
    ax.set_title("bpfilter's INPUT program: BPF_PROG_TEST_RUN time per packet")
    axes_setup(ax, "ns per packet", decades)
    if ax.get_lines():
        ax.legend(fontsize=9, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no ruleset loaded", transform=ax.transAxes, ha="center")

    for ax, key, title in ((axes[1][1], "apply_s", "Time to apply the N rules"),
                           (axes[1][2], "append_s", "Time to append one rule to the N")):
        for s in RULE_SYSTEMS:
            for mix in mixes:
                xs, ys = _series(results, mix, lambda run: None if run["systems"].get(s, {})
                                 .get("error") else run["systems"].get(s, {}).get(key))
                if xs:
                    ax.plot(xs, ys, linestyle=MIX_STYLES.get(mix, "-"), marker="o", ms=4,
                            color=COLORS[s])
                refused = [(run["n"], run["systems"][s]["apply_s"]) for run in results["runs"]
                           if run["mix"] == mix and key == "apply_s"
                           and run["systems"].get(s, {}).get("error")
                           and run["systems"][s].get("apply_s")]
                if refused:
                    ax.plot(*zip(*refused), "X", color=COLORS[s], ms=10)
        ax.set_title(f"{title} (whole command)")
        axes_setup(ax, "seconds", decades)
        handles = [Line2D([], [], color=COLORS[s], lw=2, label=LABELS[s]) for s in RULE_SYSTEMS]
        handles += [Line2D([], [], color="gray", ls=MIX_STYLES.get(m, "-"), label=m) for m in mixes]
        if key == "apply_s" and any(r.get("error") for run in results["runs"]
                                    for r in run["systems"].values()):
            handles.append(Line2D([], [], color="gray", marker="X", ls="", ms=9,
                                  label="refused after"))
        ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=2)
    for ax in [*axes[0][len(mixes):], *axes[1][3:]]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
