"""A replace takes over from the table in place what did not change: its entries'
parse, their decoding, GET_ENTRIES' bytes, and its classified runs with their map
entries. Whatever the edit, the result must be what the same blob gives without a
table in place: the same table and code, or for taken-over runs the same verdicts
and counters. (The service end to end, verdicts and counters against the kernel:
test_service.py.)"""
from contextlib import closing
from dataclasses import replace

import pytest

from bpfilter.abi import codec
from bpfilter.decode import table_from_raw
from bpfilter.bpf import syscall as bpf
from bpfilter.bpf.btf import Btf
from bpfilter.compiler import classifier
from bpfilter.packet import facts
from bpfilter.compiler.codegen import compile_table
from bpfilter.loader import load_ruleset
from bpfilter.model import Family, Hook
from bpfilter_lab.packets import HopByHop, Packet
from bpfilter_lab.scratch import replace_blob

pytestmark = pytest.mark.kernel

IPV4, IPV6 = Family.IPV4, Family.IPV6
HEAD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:web - [0:0]\n"
BLOCKLIST_SIZE = 600   # split in two runs, each long enough to be taken over


def _listed(i: int, family: Family) -> str:
    if family is IPV4:
        return f"198.18.{16 + i // 256}.{i % 256}"
    return f"2001:db8:{16 + i // 256:x}::{i % 256:x}"


def _other(net: int, host: int, family: Family) -> str:
    """An address outside the blocklist."""
    return f"198.18.{net}.{host}" if family is IPV4 else f"2001:db8:{net:x}::{host:x}"


HOST = {IPV4: 32, IPV6: 128}
NET = {IPV4: 24, IPV6: 48}


def base(family: Family) -> list[str]:
    blocklist = [f"-A INPUT -s {_listed(i, family)}/{HOST[family]} -j {'ACCEPT' if i % 7 else 'DROP'}"
                 for i in range(BLOCKLIST_SIZE)]
    return [
        "-A INPUT -i lo -j ACCEPT",
        *blocklist[:300],
        # (a jump the classifier leaves to code: it ends the run, the next one starts)
        "-A INPUT -p tcp -m tcp --dport 80 --tcp-flags SYN,ACK SYN -j web",
        *blocklist[300:],
        *[f"-A INPUT -p udp -m udp --dport {1000 + i} -j DROP" for i in range(40)],
        "-A FORWARD -p tcp -j web",
        f"-A web -s {_other(9, 0, family)}/{NET[family]} -j DROP",
        "-A web -p tcp -m tcp --sport 1024:65535 -j ACCEPT",
    ]


def edits(family: Family) -> dict[str, list[str]]:
    """The edits iptables makes, each a new table as the kernel's iptables writes it."""
    base_ = base(family)
    host = HOST[family]
    return {
        "append": base_ + [f"-A INPUT -s {_other(99, 1, family)}/{host} -j DROP"],
        "insert first": [base_[0].replace("-i lo", f"-s {_listed(5, family)}/{host}")] + base_,
        "delete": base_[:3] + base_[4:],
        "delete the last": base_[:-3] + base_[-2:],
        "replace in a run": base_[:200] + [f"-A INPUT -s {_other(99, 2, family)}/{host} -j DROP"]
        + base_[201:],
        "a rule that splits a run": base_[:100] + ["-A INPUT -p tcp --syn -j ACCEPT"] + base_[100:],
        "a user chain grows": base_ + ["-A web -p tcp -m tcp --dport 443 -j ACCEPT"],
        # web starts further on, so every jump to it changes; and its rules become
        # reachable from OUTPUT too: their hook masks change
        "another hook jumps": base_ + ["-A OUTPUT -p tcp -j web"],
        "policy": base_ + ["-P FORWARD ACCEPT"],
    }


EDITS = sorted(edits(IPV4))


def _text(rules: list[str]) -> str:
    policies = [r for r in rules if r.startswith("-P ")]
    head = HEAD
    for p in policies:
        chain, verdict = p.split()[1:]
        head = head.replace(f":{chain} DROP", f":{chain} {verdict}")
    return head + "".join(r + "\n" for r in rules if not r.startswith("-P ")) + "COMMIT\n"


@pytest.fixture(scope="module", params=[IPV4, IPV6], ids=["ipv4", "ipv6"])
def family(request) -> Family:
    return request.param


def _blob(rules: list[str], family: Family) -> bytes:
    return replace_blob(_text(rules), family=family)


@pytest.fixture(scope="module")
def before(family):
    raw = codec.parse_replace(_blob(base(family), family), family=family)
    table = table_from_raw(raw)
    return raw, table


@pytest.fixture(scope="module")
def offsets():
    return facts.KernelOffsets.from_btf(Btf.vmlinux())


def _fields(raw):
    return [(e.index, e.offset, e.ip, e.nfcache, e.target_offset, e.next_offset, e.comefrom,
             e.pcnt, e.bcnt, e.matches, e.target, e.raw, e.hook_mask) for e in raw.entries]


def _code(compiled) -> dict:
    return {p.hook: p.asm.assemble(map_fd=lambda ref: 1, kfunc_id=lambda k: (1, 0))
            for p in compiled.programs}


@pytest.mark.parametrize("edit", EDITS)
def test_a_replace_taking_over_the_table_in_place_gives_the_same_table(edit, family, before,
                                                                       offsets):
    old_raw, old_table = before
    blob = _blob(edits(family)[edit], family)
    alone = codec.parse_replace(blob, family=family)
    raw = codec.parse_replace(blob, previous=old_raw, family=family)
    assert _fields(raw) == _fields(alone)
    # most entries were taken over, each from one with the same rule bytes
    assert len(raw.same_as) >= len(raw.entries) - 80
    for index, old in raw.same_as.items():
        assert raw.entries[index].target is old_raw.entries[old].target
        assert codec._rule_bytes(raw.entries[index].raw, raw.abi) == \
            codec._rule_bytes(old_raw.entries[old].raw, raw.abi)

    table = table_from_raw(raw, previous=(old_raw, old_table))
    assert table == table_from_raw(alone)
    old_ips = {id(r.ip) for c in old_table.chains.values() for r in c.rules}
    assert sum(id(r.ip) in old_ips for r in table.chains["INPUT"].rules) >= 300

    compiled = compile_table(table, offsets)
    fresh = compile_table(table_from_raw(alone), offsets)
    assert [run.keys for run in compiled.runs] == [run.keys for run in fresh.runs]
    assert _code(compiled) == _code(fresh)

    old_entries = codec.kernel_entries(old_raw)
    assert codec.kernel_entries(raw, (old_raw, old_entries)) == codec.kernel_entries(alone)


def test_an_entry_reached_from_other_hooks_is_decoded_again(family, before):
    """Extensions' checks see the hooks an entry is reachable from: the same bytes
    reached from other hooks are not the same entry to decode."""
    old_raw, old_table = before
    raw = codec.parse_replace(_blob(edits(family)["another hook jumps"], family),
                              previous=old_raw, family=family)
    table = table_from_raw(raw, previous=(old_raw, old_table))
    web_old, web = old_table.chains["web"].rules, table.chains["web"].rules
    assert [r.ip is o.ip for r, o in zip(web, web_old)] == [False, False]
    assert table.chains["INPUT"].rules[1].ip is old_table.chains["INPUT"].rules[1].ip


def packets(family: Family) -> list[Packet]:
    """Packets meeting both runs of the blocklist, the udp rules, web and every edit;
    IPv6's also with extension headers that cannot be walked."""
    sources = [*(_listed(i, family) for i in range(0, BLOCKLIST_SIZE, 23)),
               *(_listed(i, family) for i in (5, 299, 300, BLOCKLIST_SIZE - 1)),
               _other(99, 1, family), _other(99, 2, family), _other(9, 7, family),
               "10.1.2.3" if family is IPV4 else "2001:db9::3"]
    dst = _other(0, 1, family)
    kinds = [{"proto": "udp", "dport": 1007, "sport": 53}, {"proto": "tcp", "dport": 80, "sport": 999},
             {"proto": "tcp", "dport": 443, "sport": 2000}]
    if family is IPV6:
        kinds.append({"proto": "udp", "ext": (HopByHop(),), "truncate_ext": 1, "payload_len": 0})
    return [Packet(src, dst, **kind) for src in sources for kind in kinds]


def _verdicts(ruleset, family: Family) -> list[int]:
    return [bpf.nf_test_run(ruleset.hooks[hook].prog_fd, hook, packet.build(1, 1))[0]
            for hook in (Hook.LOCAL_IN, Hook.FORWARD, Hook.LOCAL_OUT) for packet in packets(family)]


@pytest.mark.parametrize("edit", EDITS)
def test_runs_taken_over_filter_as_a_fresh_load(edit, family, before):
    """The new ruleset takes over the runs the edit left whole, keys and records
    in the maps it shares with the one in place, and filters and counts as the
    same table loaded afresh, before and after the keys of the runs it dropped go."""
    old_raw, old_table = before
    blob = _blob(edits(family)[edit], family)
    raw = codec.parse_replace(blob, previous=old_raw, family=family)
    table = table_from_raw(raw, previous=(old_raw, old_table))
    with closing(load_ruleset(old_table)) as old, \
            closing(load_ruleset(table, previous=old)) as new, \
            closing(load_ruleset(table_from_raw(codec.parse_replace(blob, family=family)))) as fresh:
        taken = {r.serial for r in old.compiled.runs} & {r.serial for r in new.compiled.runs}
        assert taken and new.classifier is old.classifier
        expected = _verdicts(fresh, family)
        assert 0 in expected and 1 in expected
        assert _verdicts(new, family) == expected
        bpf.wait_for_programs()
        new.took_over(old)
        live = sum(len(run.keys) for run in new.compiled.runs)
        assert new.classifier.key_count == live == _map_keys(new.classifier.keys_fd, family)
        assert _verdicts(new, family) == _verdicts(fresh, family) == expected
        assert new.counters() == fresh.counters() and any(p for p, _ in fresh.counters())


def _map_keys(fd: int, family: Family) -> int:
    size = classifier.KEYS[family].size
    count, key = 0, bpf.map_next_key(fd, None, size)
    while key is not None:
        count, key = count + 1, bpf.map_next_key(fd, key, size)
    return count


def test_appends_keep_the_runs_of_a_chain_few(family, offsets):
    """Rules appended to a classified chain, each compile taking over from the
    last: runs are taken over or merged so that the chain holds O(log n) of them.
    A compile classifies again the rules after the last run of TAKEOVER_MIN rules or
    more, and beyond those each rule O(log n) times on average."""
    host = (lambda i: f"10.{i // 65536}.{i // 256 % 256}.{i % 256}/32") if family is IPV4 \
        else (lambda i: f"2001:db8:{i // 256:x}::{i % 256:x}/128")
    full = table_from_raw(codec.parse_replace(
        _blob([f"-A INPUT -s {host(i)} -j DROP" for i in range(2000)], family), family=family))

    def first(n: int):   # the table with INPUT's first n rules (the rules, the same objects)
        chains = {name: replace(chain, rules=chain.rules[:n] if name == "INPUT" else chain.rules)
                  for name, chain in full.chains.items()}
        return replace(full, chains=chains)

    compiled = compile_table(first(1000), offsets)
    merged, most = 0, 0
    for n in range(1001, 2001, 3):
        before = {r.serial for r in compiled.runs}
        compiled = compile_table(first(n), offsets, compiled)
        classified = sum(len(r.rules) for r in compiled.runs if r.serial not in before)
        merged += max(0, classified - classifier.TAKEOVER_MIN)
        most = max(most, len(compiled.runs))
        assert sum(len(r.rules) for r in compiled.runs) > n - classifier.MIN_RUN
    assert most <= 4, most
    assert 0 < merged < 2 * 1000, merged
