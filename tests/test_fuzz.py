"""Short coverage-guided fuzzing runs (tools/fuzz, atheris) of the blob decoder, the
request protocol through the Service and the LOG record formatter, and the
regressions of what the fuzzer found.

Each run: no input raises anything but a BpfilterError with a real errno (the
targets' oracle, tools/fuzz/targets.py), the inputs of its second half leave next to
nothing allocated, and, for the decoder, the inputs that gave it new coverage get the
kernel's own answer (IPT_SO_SET_REPLACE in a scratch namespace).
"""
from __future__ import annotations

import errno
import os
import struct
import sys

import pytest
from families import FAMILIES, FAMILY_IDS
from test_abi_codec import Scratch

from bpfilter.abi import families
from bpfilter.abi import xtables as X
from bpfilter.decode import table_from_blob
from bpfilter.errors import BpfilterError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools", "fuzz"))
import run  # noqa: E402
from seeds import NUM_COUNTERS_AT  # noqa: E402

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


# ---------------------------------------------------------------- findings

def ours_and_the_kernels(family, rules: str, mutate) -> "tuple[BpfilterError | None, int | None]":
    """The filter table iptables-legacy-restore writes for `rules`, changed by
    mutate(blob, parsed): the decoder's refusal (or None) and the kernel's errno (or
    None) for it, num_counters set to the kernel's count of the table in place."""
    ns = Scratch(family)
    try:
        blob = bytearray(ns.restore(rules)["filter"])
        mutate(blob, ns.parse(bytes(blob)))
        struct.pack_into("<I", blob, NUM_COUNTERS_AT, ns.parse(ns.kernel()[0]).num_entries)
        blob = bytes(blob)
        try:
            table_from_blob(blob, family, optlen=len(blob))
            ours = None
        except BpfilterError as err:
            ours = err
        try:
            ns.set_replace(blob)
            theirs = None
        except BpfilterError as err:
            theirs = err.errno
        return ours, theirs
    finally:
        ns.delete()


def _at(raw: X.RawTable, index: int, within: int) -> int:
    return X.SIZEOF_IPT_REPLACE + raw.entries[index].offset + within


DEAD_RULE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
-A INPUT -p tcp -j DROP
COMMIT
"""
_VERDICT_AT, _VERDICT = X.xt_standard_target_packed.field("verdict")


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_dead_rule_jumping_to_no_entry_is_accepted_as_by_the_kernel(family):
    """A rule no hook reaches (behind INPUT's unconditional ACCEPT) whose verdict is an
    offset inside itself: translate_table() walks reachable entries only, so the kernel
    accepts it, and so does bpfilter (dead code, compiled into nothing); it refused it
    with a KeyError (EIO, an internal error)."""
    def mutate(blob, raw):
        dead = raw.entries[1]
        _VERDICT.pack_into(blob, _at(raw, 1, dead.target_offset + _VERDICT_AT), dead.offset + 8)
    ours, theirs = ours_and_the_kernels(family, DEAD_RULE, mutate)
    assert theirs is None
    assert ours is None, ours


LIMITED = "*filter\n-A INPUT -m limit --limit 5/sec -j ACCEPT\nCOMMIT\n"
MATCH_REVISION_AT = X.XT_EXTENSION_MAXNAMELEN + 2   # after match_size and the name


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_a_revision_of_limit_linux_lacks_is_eprototype(family):
    """xt_limit registers for every family (NFPROTO_UNSPEC): xt_find_match() answers
    EPROTOTYPE for a revision it lacks, as for comment, mark or conntrack; bpfilter
    answered ENOENT."""
    def mutate(blob, raw):
        blob[_at(raw, 0, families.of(family).entry_size + MATCH_REVISION_AT)] = 255
    ours, theirs = ours_and_the_kernels(family, LIMITED, mutate)
    assert theirs == errno.EPROTOTYPE
    assert ours is not None and ours.errno == errno.EPROTOTYPE, ours


NFLOG = "*filter\n-A OUTPUT -j NFLOG --nflog-group 3\nCOMMIT\n"
TARGET_NAME_AT = 2   # after target_size


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_a_refusal_of_bpfilters_comes_after_the_kernels_checks(family):
    """Without bpfilter.ko, NFLOG is bpfilter's own refusal (EOPNOTSUPP): it must come
    after every check of the kernel's, here a later entry's target that does not exist
    (the final ERROR entry's renamed ERHOR: ENOENT)."""
    def rename_last_target(blob, raw):
        last = raw.entries[-1]
        blob[_at(raw, last.index, last.target_offset + TARGET_NAME_AT + 2)] = ord("H")
    ours, theirs = ours_and_the_kernels(family, NFLOG, rename_last_target)
    assert theirs == errno.ENOENT
    assert ours is not None and ours.errno == errno.ENOENT, ours
    ours, theirs = ours_and_the_kernels(family, NFLOG, lambda blob, raw: None)
    assert theirs is None
    assert ours.errno == errno.EOPNOTSUPP and "target 'NFLOG'" in str(ours) \
        and "needs bpfilter.ko" in str(ours), ours


SYNPROXY = "*filter\n-A INPUT -p tcp -j SYNPROXY --mss 1460\nCOMMIT\n"
IPT_IP_PROTO_AT = 80     # struct ipt_ip's proto, after the addresses and interfaces


def test_synproxy_on_a_rule_not_for_tcp_is_einval_as_in_the_kernel():
    """SYNPROXY's checkentry wants -p tcp (EINVAL): without the module, bpfilter's
    generic protocol check says it too, rather than its own refusal (EOPNOTSUPP)."""
    def udp(blob, raw):
        struct.pack_into("<H", blob, _at(raw, 0, IPT_IP_PROTO_AT), 17)
    ours, theirs = ours_and_the_kernels(FAMILIES[0], SYNPROXY, udp)
    assert theirs == errno.EINVAL
    assert ours is not None and ours.errno == errno.EINVAL and "SYNPROXY" in str(ours), ours
