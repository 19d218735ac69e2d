"""The tuple space classifier's decisions and building blocks. Its verdicts and
counters are proved against the kernel in test_differential.py and, case by case,
in test_verdicts.py (each case both walked and classified)."""
import random

from bpfilter.abi import codec
from bpfilter.abi.decode import table_from_raw
from bpfilter.compiler import classifier
from bpfilter.compiler.classifier import Run, TupleSpace, port_blocks, segments
from bpfilter.scratch import replace_blob


def chain_rules(rules: str):
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + rules + "\nCOMMIT\n")
    return table_from_raw(codec.parse_replace(replace_blob(text))).chains["INPUT"].rules


def covered(blocks):
    return {p for value, mask in blocks for p in range(65536) if p & mask == value}


def test_port_blocks_cover_exactly_the_range():
    rng = random.Random(7)
    ranges = [(0, 65535), (22, 22), (1024, 65535), (0, 1023), (1000, 1100), (65535, 65535)]
    ranges += [tuple(sorted((rng.randrange(65536), rng.randrange(65536)))) for _ in range(20)]
    for lo, hi in ranges:
        blocks = port_blocks(lo, hi)
        assert covered(blocks) == set(range(lo, hi + 1)), (lo, hi)
        assert len(blocks) <= 2 * 16


def test_a_blocklist_is_one_run_with_one_lookup_per_prefix_length():
    rules = chain_rules("\n".join(f"-A INPUT -s 10.1.{i // 256}.{i % 256} -j DROP"
                                  for i in range(300)))
    space = TupleSpace()
    [run] = segments(rules, space)
    assert isinstance(run, Run) and len(run.rules) == 300
    assert len(run.tuples) == 1 and len(run.ip_tuples) == 1
    assert len(space.entries) == 2 * 300


def test_short_runs_and_varied_ranges_stay_code():
    few = chain_rules("\n".join(f"-A INPUT -s 10.0.0.{i} -j DROP"
                                for i in range(classifier.MIN_RUN - 1)))
    assert not any(isinstance(s, Run) for s in segments(few, TupleSpace()))
    # ranges on one field are cheap (at most 17 masks); across fields they multiply
    rng = random.Random(3)
    varied = chain_rules("\n".join(
        f"-A INPUT -s 10.{i}.0.0/{rng.randint(8, 32)} -d 10.{i}.0.0/{rng.randint(8, 32)} "
        f"-p tcp --sport {lo}:{lo + rng.randrange(1, 999)} --dport {lo}:{lo + rng.randrange(1, 5000)} "
        "-j DROP" for i, lo in enumerate(rng.randrange(60000) for _ in range(64))))
    assert not any(isinstance(s, Run) for s in segments(varied, TupleSpace()))
    one_field = chain_rules("\n".join(
        f"-A INPUT -p tcp --dport {lo}:{lo + rng.randrange(1, 5000)} -j DROP"
        for lo in (rng.randrange(60000) for _ in range(80))))
    [run] = segments(one_field, TupleSpace())
    assert len(run.tuples) + len(run.ip_tuples) <= 17


def test_a_rule_the_classifier_cannot_take_ends_the_run_in_order():
    lines = [f"-A INPUT -s 10.0.1.{i} -j DROP" for i in range(20)]
    lines += ["-A INPUT ! -s 10.9.9.9 -p tcp --syn -j ACCEPT"]
    lines += [f"-A INPUT -p udp --dport {1000 + i} -j ACCEPT" for i in range(20)]
    segs = segments(chain_rules("\n".join(lines)), TupleSpace())
    assert [type(s).__name__ for s in segs] == ["Run", "Rule", "Run"]
    assert [r.entry for s in segs for r in (s.rules if isinstance(s, Run) else [s])] == \
        list(range(41))


def test_runs_never_share_tuple_ids():
    lines = [f"-A INPUT -s 10.0.1.{i} -j DROP" for i in range(20)]
    lines += ["-A INPUT -i lo -j ACCEPT"]
    lines += [f"-A INPUT -s 10.0.2.{i} -j ACCEPT" for i in range(20)]
    first, _, second = segments(chain_rules("\n".join(lines)), TupleSpace())
    ids = [t for run in (first, second) for t, _ in run.tuples + run.ip_tuples]
    assert len(ids) == len(set(ids)) == 4


def test_the_first_rule_wins_a_shared_key():
    rules = chain_rules("\n".join(["-A INPUT -s 10.0.0.1 -j ACCEPT"] * 2 +
                                  [f"-A INPUT -s 10.0.0.{i} -j DROP" for i in range(2, 20)]))
    space = TupleSpace()
    segments(rules, space)
    entries = {entry for entry, _ in space.entries.values()}
    assert 0 in entries and 1 not in entries


def test_rules_that_can_never_match_put_no_key():
    """(packet & mask) == addr never holds when addr has bits outside the mask."""
    from dataclasses import replace
    rules = chain_rules("\n".join(f"-A INPUT -s 10.0.0.{i} -j DROP" for i in range(20)))
    odd = replace(rules[1], ip=replace(rules[1].ip, src=replace(rules[1].ip.src,
                                                                 mask=b"\xff\xff\xff\x00")))
    assert list(classifier.rule_keys(odd)) == []


def test_comments_do_not_keep_rules_from_a_run():
    rules = chain_rules("\n".join(f'-A INPUT -s 10.0.1.{i} -p tcp --dport {i} -m comment '
                                  f'--comment "host {i}" -j DROP' for i in range(20)))
    [run] = segments(rules, TupleSpace())
    assert isinstance(run, Run) and len(run.rules) == 20
    other = chain_rules("\n".join(f"-A INPUT -s 10.0.1.{i} -m ttl --ttl-eq 1 -j DROP"
                                  for i in range(20)))
    assert not any(isinstance(s, Run) for s in segments(other, TupleSpace()))
