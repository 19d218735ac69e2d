"""A replace takes over from the table in place what did not change: its entries'
parse, their decoding and GET_ENTRIES' bytes. Whatever the
edit, the result must be what the same blob gives without a table in place. (The
service end to end, verdicts and counters against the kernel: test_service.py.)"""
import pytest

from bpfilter.abi import codec
from bpfilter.abi.decode import table_from_raw
from bpfilter.bpf.btf import Btf
from bpfilter.compiler import facts
from bpfilter.compiler.codegen import compile_table
from bpfilter.scratch import replace_blob

pytestmark = pytest.mark.kernel

HEAD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:web - [0:0]\n"
BLOCKLIST = [f"-A INPUT -s 198.18.{16 + i // 256}.{i % 256}/32 -j {'ACCEPT' if i % 7 else 'DROP'}"
             for i in range(300)]
BASE = [
    "-A INPUT -i lo -j ACCEPT",
    *BLOCKLIST[:150],
    "-A INPUT -p tcp -m tcp --dport 80 -j web",
    *BLOCKLIST[150:],
    *[f"-A INPUT -p udp -m udp --dport {1000 + i} -j DROP" for i in range(40)],
    "-A FORWARD -p tcp -j web",
    "-A web -s 198.18.9.0/24 -j DROP",
    "-A web -p tcp -m tcp --sport 1024:65535 -j ACCEPT",
]

# The edits iptables makes, each a new table as the kernel's iptables writes it.
EDITS = {
    "append": BASE + ["-A INPUT -s 198.18.99.1/32 -j DROP"],
    "insert first": [BASE[0].replace("-i lo", "-s 198.18.16.5/32")] + BASE,
    "delete": BASE[:3] + BASE[4:],
    "replace in a run": BASE[:200] + ["-A INPUT -s 198.18.99.2/32 -j DROP"] + BASE[201:],
    "a rule that splits a run": BASE[:100] + ["-A INPUT -p tcp --syn -j ACCEPT"] + BASE[100:],
    "a user chain grows": BASE + ["-A web -p tcp -m tcp --dport 443 -j ACCEPT"],
    # web starts further on, so every jump to it changes; and its rules become
    # reachable from OUTPUT too: their hook masks change
    "another hook jumps": BASE + ["-A OUTPUT -p tcp -j web"],
    "policy": BASE + ["-P FORWARD ACCEPT"],
}


def _text(rules: list[str]) -> str:
    policies = [r for r in rules if r.startswith("-P ")]
    head = HEAD
    for p in policies:
        chain, verdict = p.split()[1:]
        head = head.replace(f":{chain} DROP", f":{chain} {verdict}")
    return head + "".join(r + "\n" for r in rules if not r.startswith("-P ")) + "COMMIT\n"


@pytest.fixture(scope="module")
def before():
    blob = replace_blob(_text(BASE))
    raw = codec.parse_replace(blob)
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


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_replace_taking_over_the_table_in_place_gives_the_same_table(edit, before, offsets):
    old_raw, old_table = before
    blob = replace_blob(_text(EDITS[edit]))
    alone = codec.parse_replace(blob)
    raw = codec.parse_replace(blob, previous=old_raw)
    assert _fields(raw) == _fields(alone)
    # most entries were taken over, each from one with the same rule bytes
    assert len(raw.same_as) >= len(raw.entries) - 80
    for index, old in raw.same_as.items():
        assert raw.entries[index].target is old_raw.entries[old].target
        assert codec._rule_bytes(raw.entries[index].raw) == codec._rule_bytes(old_raw.entries[old].raw)

    table = table_from_raw(raw, previous=(old_raw, old_table))
    assert table == table_from_raw(alone)
    old_ips = {id(r.ip) for c in old_table.chains.values() for r in c.rules}
    assert sum(id(r.ip) in old_ips for r in table.chains["INPUT"].rules) >= 300

    compiled = compile_table(table, offsets)
    fresh = compile_table(table_from_raw(alone), offsets)
    assert compiled.tuple_space.entries == fresh.tuple_space.entries
    assert _code(compiled) == _code(fresh)

    old_entries = codec.kernel_entries(old_raw)
    assert codec.kernel_entries(raw, (old_raw, old_entries)) == codec.kernel_entries(alone)


def test_an_entry_reached_from_other_hooks_is_decoded_again(before):
    """Extensions' checks see the hooks an entry is reachable from: the same bytes
    reached from other hooks are not the same entry to decode."""
    old_raw, old_table = before
    raw = codec.parse_replace(replace_blob(_text(EDITS["another hook jumps"])), previous=old_raw)
    table = table_from_raw(raw, previous=(old_raw, old_table))
    web_old, web = old_table.chains["web"].rules, table.chains["web"].rules
    assert [r.ip is o.ip for r, o in zip(web, web_old)] == [False, False]
    assert table.chains["INPUT"].rules[1].ip is old_table.chains["INPUT"].rules[1].ip
