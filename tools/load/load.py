"""Load on one bpfilter service (a private one: its own socket and bpffs).

    python3 tools/load/load.py many [--namespaces 50] [--commands 20] [--seed N]
        namespaces x commands iptables commands at once (sequences.py's random valid
        sequences, both families), each namespace paired with one where the kernel's
        own iptables-legacy runs the same: every exit status and output, and the final
        save -c (counters included: the sequences send datagrams), must be the same.
    python3 tools/load/load.py replaces [--count 10000]
        that many IPT_SO_SET_REPLACE in a row from one namespace, two rulesets in turn,
        each answered 0; the service's memory and objects sampled as they go: after the
        warm-up (a tenth) its RSS stays within a bound and its file descriptors and
        pinned objects do not change.

Both print their figures: time, the service's RSS before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "umh"), os.path.join(ROOT, "tests")]

import sequences  # noqa: E402
from bpfilter.model import Family  # noqa: E402

# the service's growth allowed after its warm-up, over a whole run: a leak of even
# a few hundred bytes per replace outgrows it over 10,000
RSS_GROWTH = 8 << 20
NUM_COUNTERS_AT = 84   # struct ipt_replace's num_counters


def service_figures(svc) -> dict:
    """The service's RSS, its BPF descriptors by kind, the files pinned in its bpffs, and
    the host's BPF objects (every process's: other users of BPF count too)."""
    pid = svc.pid
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = link.split(":", 1)[1] if link.startswith("anon_inode:") else ""
        # the others come and go with the requests: their sockets, the namespaces
        # they name, the files read to answer them
        if kind.startswith(("bpf", "[bpf")):
            kinds[kind] = kinds.get(kind, 0) + 1
    pins = sum(len(files) for _, _, files in os.walk(svc.bpffs))
    host = {}
    for what in ("prog", "map", "link"):
        done = subprocess.run(["bpftool", what, "show", "-j"], capture_output=True, text=True)
        host[what] = len(json.loads(done.stdout or "[]"))
    return {"rss": rss, "fds": kinds, "pins": pins, "host_bpf": host}


RULESETS = {
    "a": "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:u - [0:0]\n"
         + "".join(f"-A INPUT -s 10.{i}.0.0/16 -p tcp -m tcp --dport {i + 1} -j u\n" for i in range(20))
         + "-A u -m limit --limit 5/sec -j ACCEPT\n-A OUTPUT -p udp -m multiport --dports 53,123 -j ACCEPT\n"
         "COMMIT\n",
    "b": "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
         + "".join(f"-A INPUT -s 192.168.{i}.0/24 -j ACCEPT\n" for i in range(30))
         + "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\nCOMMIT\n",
}


def replaces(svc, ns: str, count: int, samples: int = 40) -> dict:
    from bpfilter import proto
    from bpfilter.abi import codec
    from bpfilter.abi import xtables as X
    from bpfilter_lab.backends import service_request
    from bpfilter_lab.scratch import replace_blob

    netns_path = f"/run/netns/{ns}"
    blobs = [bytearray(replace_blob(RULESETS[k])) for k in sorted(RULESETS)]
    sizes = [codec.parse_replace(bytes(b)).num_entries for b in blobs]
    status, info = service_request(svc.socket, netns_path, proto.Op.GETSOCKOPT, X.IPT_SO_GET_INFO,
                                   codec.getinfo_request("filter"))
    assert status == 0, info
    entries = codec.parse_getinfo(info)["num_entries"]
    figures = [{"replaces": 0, **service_figures(svc)}]
    started = time.monotonic()
    # even: the two rulesets alternate, and each holds its own number of maps
    every = max(2, count // samples // 2 * 2)
    for i in range(count):
        blob = blobs[i % 2]
        struct.pack_into("<I", blob, NUM_COUNTERS_AT, entries)
        status, reply = service_request(svc.socket, netns_path, proto.Op.SETSOCKOPT,
                                        X.IPT_SO_SET_REPLACE, bytes(blob))
        if status:
            raise RuntimeError(f"replace {i}: {status} {reply.decode(errors='replace')}")
        if len(reply) != entries * X.SIZEOF_XT_COUNTERS:
            raise RuntimeError(f"replace {i}: {len(reply)} bytes of old counters for {entries}")
        entries = sizes[i % 2]
        if (i + 1) % every == 0:
            figures.append({"replaces": i + 1, "seconds": round(time.monotonic() - started, 1),
                            **service_figures(svc)})
    return {"count": count, "seconds": round(time.monotonic() - started, 1), "samples": figures}


def flat(result: dict, rss_growth: int = RSS_GROWTH, warm_up: float = 0.1) -> "list[str]":
    """What grew after the warm-up (the samples past that fraction of the run: the
    allocator's arenas of the service's request threads fill over a few hundred)."""
    samples = result["samples"]
    warm = next(s for s in samples if s["replaces"] >= result["count"] * warm_up)
    grew = []
    for s in samples[samples.index(warm):]:
        if s["fds"] != warm["fds"] or s["pins"] != warm["pins"]:
            grew.append(f"after {s['replaces']}: fds {s['fds']} pins {s['pins']}, "
                        f"at warm-up fds {warm['fds']} pins {warm['pins']}")
    if samples[-1]["rss"] - warm["rss"] > rss_growth:
        grew.append(f"RSS {warm['rss'] >> 20} MiB after {warm['replaces']} replaces, "
                    f"{samples[-1]['rss'] >> 20} MiB after {samples[-1]['replaces']}")
    return grew


def many(svc, namespaces: int, commands: int, seed: int) -> dict:
    names = sequences.namespaces_made(2 * namespaces)
    try:
        fams = [(Family.IPV4, Family.IPV6)[i % 2] for i in range(namespaces)]
        seqs = [sequences.commands(seed + i, f, commands) for i, f in enumerate(fams)]
        before = service_figures(svc)
        started = time.monotonic()
        out = sequences.Runner(svc, svc.dir).many(list(zip(names[::2], names[1::2])), seqs, fams)
        seconds = time.monotonic() - started
        after = service_figures(svc)
    finally:
        sequences.namespaces_deleted(names)
    return {"namespaces": namespaces, "commands": namespaces * commands,
            "seconds": round(seconds, 1), "taken": sum(r["ok"] for r in out.values()),
            "before": before, "after": after,
            "diffs": {i: r["diffs"] for i, r in out.items() if r["diffs"]}}


def main() -> int:
    from test_service import Service
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("many")
    m.add_argument("--namespaces", type=int, default=50)
    m.add_argument("--commands", type=int, default=20)
    m.add_argument("--seed", type=int, default=int(time.time()))
    r = sub.add_parser("replaces")
    r.add_argument("--count", type=int, default=10000)
    args = p.parse_args()
    svc = Service()
    try:
        svc.start()
        if args.what == "many":
            result = many(svc, args.namespaces, args.commands, args.seed)
            failed = bool(result["diffs"])
        else:
            (ns,) = sequences.namespaces_made(1)
            try:
                result = replaces(svc, ns, args.count)
            finally:
                sequences.namespaces_deleted([ns])
            result["grew"] = flat(result)
            failed = bool(result["grew"])
    finally:
        svc.close()
    print(json.dumps(result, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
