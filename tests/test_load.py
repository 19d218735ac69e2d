"""Short versions of tools/load: random valid iptables / ip6tables command sequences
run at once in many namespaces through one service, each compared with the kernel's
iptables-legacy running the same in a namespace of its own; and replaces in a row
with the service's memory and objects flat."""
from __future__ import annotations

import os
import sys

import pytest
from test_service import nets, svc  # noqa: F401  (fixtures)

from bpfilter.model import Family

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools", "load"))
import load  # noqa: E402
import sequences  # noqa: E402

pytestmark = pytest.mark.kernel


def test_command_sequences_from_many_namespaces_match_the_kernel(svc, nets):  # noqa: F811
    """6 namespaces, both families, 40 seeded random commands each at once: every exit
    status and output, and the final save -c (counters moved by datagrams, set by -c,
    zeroed by -Z), are the kernel's."""
    pairs = 6
    names = nets(2 * pairs)
    fams = [(Family.IPV4, Family.IPV6)[i % 2] for i in range(pairs)]
    seqs = [sequences.commands(20261206 + i, f, 40) for i, f in enumerate(fams)]
    out = sequences.Runner(svc, svc.dir).many(list(zip(names[::2], names[1::2])), seqs, fams)
    diffs = {i: r["diffs"] for i, r in out.items() if r["diffs"]}
    assert not diffs, diffs
    # the sequences are mostly valid and got somewhere: rules, chains and counters
    assert sum(r["ok"] for r in out.values()) > 0.8 * pairs * 40
    saved = "".join(r["save"] for r in out.values())
    assert saved.count(" -A ") > 20 and ":c" in saved
    assert any(line.startswith("[") and not line.startswith("[0:0]")
               for line in saved.splitlines()), "no counter moved"


def test_replaces_in_a_row_keep_the_service_flat(svc, nets):  # noqa: F811
    """900 replaces in a row, no pause between them: after a warm-up of 300 the
    service holds the same descriptors and pins, and its RSS grows by less than 1 MiB
    (a leak of 2 KB a replace would outgrow it)."""
    (ns,) = nets(1)
    result = load.replaces(svc, ns, 900, samples=9)
    assert not load.flat(result, rss_growth=1 << 20, warm_up=1 / 3), result["samples"]
