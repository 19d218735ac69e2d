"""The machinery of the verdict tests (test_verdicts.py for IPv4, test_verdicts6.py for
IPv6, and the tests of single extensions): a case is an iptables-restore ruleset,
packets sent at a hook with the verdict the kernel's ip(6)t_do_table() gives them, and
the counters of the entries that count afterwards (every other entry must stay at
zero). The blob is the one ip(6)tables-legacy-restore really produces; the programs run
with BPF_PROG_TEST_RUN, where the kernel sets state->in = NULL and state->out = "lo" at
every hook, so interface tests use -o only. Cases whose packets all go through OUTPUT
are replayed against the kernel's own legacy tables (a raw socket in a netns routing
everything out of lo), which proves the expectations themselves.
"""
from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass, field

import pytest

from bpfilter import listing
from bpfilter.abi import codec, families, sockopt
from bpfilter.abi.xtables import SIZEOF_IPT_REPLACE, SIZEOF_XT_ENTRY_HEADER, ipt_replace
from bpfilter.compiler import classifier, multifield
from bpfilter.decode import table_from_blob
from bpfilter.loader import load_filter_table
from bpfilter.errors import BpfilterError
from bpfilter.model import Family, Hook
from bpfilter.netns import entered
from bpfilter_lab import namespaces
from bpfilter_lab.backends import entry_counters
from bpfilter_lab.scratch import RESTORE, replace_blob

IN, FWD, OUT = Hook.LOCAL_IN, Hook.FORWARD, Hook.LOCAL_OUT
DROP, ACCEPT = 0, 1
BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
COMMAND = {Family.IPV4: "iptables-legacy", Family.IPV6: "ip6tables-legacy"}


@dataclass
class Case:
    name: str
    rules: str                      # chain declarations (":X -", ":INPUT DROP") and -A lines
    steps: list                     # (hook, packet, expected verdict)
    counters: dict = field(default_factory=dict)   # "CHAIN n" | "CHAIN policy" | "X return"
    # Bytes no iptables writes, put in the blob: (rule "CHAIN n", its match number
    # from 0 or None for the entry's ip part, offset in that match's payload or in
    # the ip part, the bytes).
    crafted: tuple = ()
    family: Family = Family.IPV4


def case(name, rules, steps, counters, crafted=(), family=Family.IPV4):
    if isinstance(steps, tuple):
        steps = [steps]
    return pytest.param(Case(name, rules, steps, counters, crafted, family), id=name)


def output_only(cases: list) -> list:
    """The cases the kernel can replay: every packet at OUTPUT."""
    return [p for p in cases if all(hook == OUT for hook, _, _ in p.values[0].steps)]


def ruleset(rules: str) -> str:
    """The iptables-restore text: built-in chains ACCEPT unless declared."""
    lines = [line.strip() for line in rules.splitlines() if line.strip()]
    decls = {m.group(1): m.group(2) for line in lines
             if (m := re.fullmatch(r":(\S+)\s+(\S+)", line))}
    head = [f":{c} {decls.get(c, 'ACCEPT')} [0:0]" for c in BUILTIN]
    head += [f":{c} {p} [0:0]" for c, p in decls.items() if c not in BUILTIN]
    body = [line for line in lines if not line.startswith(":")]
    return "\n".join(["*filter", *head, *body, "COMMIT", ""])


def entry_index(rules: str) -> dict[str, int]:
    """Entry index of every rule, policy and user-chain RETURN, as libiptc lays them out:
    INPUT, FORWARD, OUTPUT (rules, then policy), then user chains sorted by name (ERROR
    head, rules, RETURN), then the final ERROR entry."""
    text = ruleset(rules)
    user = sorted({m.group(1) for m in re.finditer(r"^:(\S+) - ", text, re.M)})
    rules_of = {c: len(re.findall(rf"^-A {re.escape(c)} ", text, re.M)) for c in [*BUILTIN, *user]}
    index, n = {}, 0
    for chain in BUILTIN:
        for pos in range(1, rules_of[chain] + 1):
            index[f"{chain} {pos}"] = n
            n += 1
        index[f"{chain} policy"] = n
        n += 1
    for chain in user:
        n += 1                                  # ERROR head naming the chain
        for pos in range(1, rules_of[chain] + 1):
            index[f"{chain} {pos}"] = n
            n += 1
        index[f"{chain} return"] = n
        n += 1
    index["<end>"] = n                          # the final ERROR entry
    return index


def expected_counters(c: Case) -> list[tuple[int, int]]:
    index = entry_index(c.rules)
    unknown = set(c.counters) - set(index)
    assert not unknown, f"case {c.name!r} names entries that do not exist: {unknown}"
    counters = [(0, 0)] * (index["<end>"] + 1)
    for key, value in c.counters.items():
        counters[index[key]] = value
    return counters


def named(c: Case, counters) -> dict[str, tuple[int, int]]:
    """Counters keyed like the cases, non-zero ones only, for readable failures."""
    names = {i: k for k, i in entry_index(c.rules).items()}
    return {names.get(i, f"entry {i}"): tuple(v) for i, v in enumerate(counters) if any(v)}


_blobs: dict[tuple, bytes] = {}


def blob_of(rules: str, crafted: tuple = (), family: Family = Family.IPV4) -> bytes:
    text = ruleset(rules)
    if (text, family) not in _blobs:
        _blobs[text, family] = replace_blob(text, family=family)
    made = _blobs[text, family]
    blob = bytearray(made)
    entries = codec.parse_replace(made, family=family).entries
    for rule, match, offset, data in crafted:
        entry = entries[entry_index(rules)[rule]]
        at = SIZEOF_IPT_REPLACE + entry.offset + offset
        if match is not None:
            at += families.of(family).entry_size + \
                sum(m.size for m in entry.matches[:match]) + SIZEOF_XT_ENTRY_HEADER
        blob[at:at + len(data)] = data
    return bytes(blob)


def verdict_name(v: int) -> str:
    return {DROP: "DROP", ACCEPT: "ACCEPT"}.get(v, str(v))


def run_case(c: Case, how: str, monkeypatch) -> None:
    """The case three ways: walked rule by rule, with every rule the tuple space can
    take classified (runs from one rule on), and with every such rule in multifield's
    merged tuples instead; none must change a thing."""
    if how != "walked":
        monkeypatch.setattr(classifier, "MIN_RUN", 1)
        monkeypatch.setattr(classifier, "RULES_PER_TUPLE", 0)
    if how == "multifield":
        monkeypatch.setattr(classifier, "MAX_TUPLES", 0)
        monkeypatch.setattr(multifield, "RULES_PER_LOOKUP", 0)
    table = load_filter_table(blob_of(c.rules, c.crafted, c.family), attach=False,
                              family=c.family)
    try:
        got = [verdict_name(table.test_run(hook, p.build(1, 0))) for hook, p, _ in c.steps]
        counters = table.counters()
    finally:
        table.close()
    assert got == [verdict_name(v) for _, _, v in c.steps]
    assert named(c, counters) == named(c, expected_counters(c))
    assert counters == expected_counters(c)


@pytest.fixture(scope="module")
def kernel_netns():
    """A netns whose legacy iptables and ip6tables see our packets at OUTPUT with out =
    lo, like the test runs: everything routes out of lo. What lo loops back is dropped
    in raw PREROUTING so that it never reaches the filter table's INPUT. (IPv6 turns a
    unicast route through lo into an unreachable one, whose ICMPv6 errors would cross
    OUTPUT too: its route says every address is local.)"""
    with namespaces.scratch("bpfl-verdicts") as name:
        with namespaces.netlink(name) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.route("add", dst="0.0.0.0/0", oif=lo)
            ipr.route("add", dst="::/0", oif=lo, family=socket.AF_INET6, type="local")
        for family in Family:
            subprocess.run(["ip", "netns", "exec", name, COMMAND[family], "-t", "raw", "-A",
                            "PREROUTING", "-j", "DROP"], check=True, capture_output=True)
        yield name


def kernel_load(netns: str, c: Case) -> None:
    """The case's ruleset into the kernel's iptables: through iptables-legacy-restore,
    or as the crafted blob itself."""
    done = subprocess.run(["ip", "netns", "exec", netns, RESTORE[c.family]],
                          input=ruleset(c.rules), text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    if c.crafted:
        blob = bytearray(blob_of(c.rules, c.crafted, c.family))
        with entered(netns):
            header = ipt_replace.parse(bytes(blob[:SIZEOF_IPT_REPLACE]))
            header.num_counters = codec.parse_getinfo(
                sockopt.get_info("filter", c.family))["num_entries"]
            blob[:SIZEOF_IPT_REPLACE] = ipt_replace.build(header)
            sockopt.set_replace(bytes(blob), family=c.family)


def kernel_run(netns: str, c: Case) -> tuple[list[str], list[tuple[int, int]]]:
    kernel_load(netns, c)
    return kernel_send(netns, [p for _, p, _ in c.steps], c.family)


def kernel_send(netns: str, packets: list, family: Family = Family.IPV4
                ) -> tuple[list[str], list[tuple[int, int]]]:
    """Each packet out of the kernel's OUTPUT (a raw socket writing the whole IP header):
    the verdicts, then every counter."""
    verdicts = []
    domain = socket.AF_INET if family == Family.IPV4 else socket.AF_INET6
    with entered(netns):
        s = socket.socket(domain, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            for p in packets:
                try:
                    s.sendto(p.build(1, 0), (p.dst, 0))
                    verdicts.append("ACCEPT")
                except PermissionError:       # NF_DROP at LOCAL_OUT is EPERM
                    verdicts.append("DROP")
        finally:
            s.close()
        size = codec.parse_getinfo(sockopt.get_info("filter", family))["size"]
        entries = codec.parse_get_entries(sockopt.get_entries("filter", size, family))["entries"]
    return verdicts, entry_counters(entries, family)


def kernel_agrees(netns: str, c: Case) -> None:
    verdicts, counters = kernel_run(netns, c)
    assert verdicts == [verdict_name(v) for _, _, v in c.steps]
    assert named(c, counters) == named(c, expected_counters(c))
    assert counters == expected_counters(c)


def payload_agrees(netns: str, c: Case, packets: list) -> bool:
    """A case whose crafted payload the kernel may refuse: bpfilter refuses it with the
    kernel's errno, or takes it as the kernel does and gives, for each of the packets
    out of OUTPUT, the kernel's verdict, and its counters. Whether it was taken."""
    try:
        kernel_load(netns, c)
        kernel_errno = 0
    except BpfilterError as err:
        kernel_errno = err.errno
    try:
        table = load_filter_table(blob_of(c.rules, c.crafted, c.family), attach=False,
                                  family=c.family)
    except BpfilterError as err:
        assert err.errno == kernel_errno, (c.name, str(err))
        return False
    assert kernel_errno == 0, c.name
    try:
        ours = [verdict_name(table.test_run(OUT, p.build(1, 0))) for p in packets]
        counters = table.counters()
    finally:
        table.close()
    assert (ours, counters) == kernel_send(netns, packets, c.family), c.name
    return True


def kernel_listing(netns: str, family: Family = Family.IPV4) -> dict[str, list[str]]:
    """What `iptables-legacy -L -n` prints after each rule's addresses, per chain. The
    columns before the source keep their places; an address longer than its column
    (IPv6's often are) pushes the rest to the right, and a `!` takes the place of the
    space before an address: the two addresses are the two words from there on."""
    text = subprocess.run(["ip", "netns", "exec", netns, COMMAND[family], "-L", "-n"],
                          check=True, capture_output=True, text=True).stdout
    chains: dict[str, list[str]] = {}
    for block in text.strip().split("\n\n"):
        head, columns, *rules = block.splitlines()
        at = columns.index("source") - 1
        chains[head.split()[1]] = [(line[at:].split(None, 2) + [""])[2].strip()
                                   for line in rules]
    return chains


def listing_agrees(netns: str, c: Case) -> None:
    """bpfilter's description of each rule's matches is what iptables prints."""
    kernel_load(netns, c)
    _, table = table_from_blob(blob_of(c.rules, c.crafted, c.family), c.family)
    ours = {chain.name: [listing.options(rule, table.family) for rule in chain.rules]
            for chain in table.chains.values()}
    assert ours == kernel_listing(netns, c.family)


# ten S chains and ten T chains, each ten of one shape: S<i> jumps (or, S9, goes) to
# T<i> for tcp port 1000 + i from 10.1.2.3, then accepts (S9: never reached after the
# goto); T<i> drops what goes to 192.168.7.<i>
def templated(source: str, destinations: str) -> str:
    """Twenty chains of two shapes (compiler/templates.py), S0 to S9 jumping to T0 to
    T9 (S9 going), each with constants of its own; T{i} drops destinations.format(i)."""
    return "\n".join(
        [":OUTPUT DROP"] + [f":S{i} -\n:T{i} -" for i in range(10)]
        + [f"-A OUTPUT -p tcp --dport {1000 + i} -j S{i}" for i in range(10)]
        + [f"-A S{i} -s {source} -p tcp -m tcp --dport {1000 + i} -{'g' if i == 9 else 'j'} "
           f"T{i}\n-A S{i} -m statistic --mode random --probability 1 -j ACCEPT"
           for i in range(10)]
        + [f"-A T{i} -d {destinations.format(i)} -j DROP" for i in range(10)])


TEMPLATED = templated("10.1.2.3", "192.168.7.{}")
TEMPLATED6 = templated("2001:db8:1::3", "2001:db8:7::{}")


def templated_case(make_case, tcp, rules: str, destinations: str, stranger: str, size: int):
    """The templates' case for a family: `rules` templated()'s for the source `tcp`
    sends from by default, `stranger` a source no S chain takes, `size` a packet's."""
    return make_case(
        "chains of one shape share a template: each instance's own constants and counters",
        rules,
        [(OUT, tcp(dport=1003), ACCEPT), (OUT, tcp(dport=1005, dst=destinations.format(5)), DROP),
         (OUT, tcp(dport=1007, src=stranger), ACCEPT), (OUT, tcp(dport=1009), DROP)],
        {counted: (1, size) for counted in (
            "OUTPUT 4", "S3 1", "T3 return", "S3 2", "OUTPUT 6", "S5 1", "T5 1", "OUTPUT 8",
            "S7 2", "OUTPUT policy", "OUTPUT 10", "S9 1", "T9 return")})
