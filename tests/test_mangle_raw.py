"""The mangle and raw tables without bpfilter.ko, and what their targets need of it.
Their chains filter with every match bpfilter compiles, at their own hooks; what only
the kernel can do (MARK, TOS, TTL, TCPMSS, CT, ... and the kernel's own matches) is
refused naming the module, after the checks the kernel makes first (a target outside
its table is EINVAL, as with ip_tables). With the module (tests/test_kmod.py,
test_kmod_mangle_and_raw_tables) they run with real traffic against ip_tables."""
from __future__ import annotations

import errno

import pytest

from bpfilter.abi import codec
from bpfilter.abi.xtables import SIZEOF_IPT_REPLACE, ipt_replace
from bpfilter.bpf.btf import Btf
from bpfilter.bpf.insn import Kfunc
from bpfilter.compiler import reroute, trace
from bpfilter.compiler.codegen import COUNTERS, compile_table
from bpfilter.decode import table_from_blob
from bpfilter.errors import BpfilterError
from bpfilter.ext.log import KernelLogTarget
from bpfilter.ext.xtmatch import XT_MATCH_KFUNC, XT_TARGET_KFUNC
from bpfilter.bpf import syscall as bpf
from bpfilter.loader import load_filter_table, load_twin
from bpfilter.model import Family, Hook
from bpfilter.packet import facts
from bpfilter_lab.packets import Packet
from bpfilter_lab.scratch import replace_blob

from test_refusals import kernel_refusal
from test_targets import ours

pytestmark = pytest.mark.kernel

DROP, ACCEPT = 0, 1
ADDRESSES = {Family.IPV4: ("10.1.2.3", "192.168.7.8"), Family.IPV6: ("2001:db8::1", "2001:db8::2")}
FAMILIES = pytest.mark.parametrize("family", list(Family), ids=lambda f: f.name.lower())
CHAINS = {"raw": ("PREROUTING", "OUTPUT"),
          "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}


def table(name: str, *rules: str) -> str:
    """A ruleset of table `name`: its built-in chains, then `rules` (user chains'
    declarations among them)."""
    return "\n".join([f"*{name}", *(f":{c} ACCEPT [0:0]" for c in CHAINS[name]), *rules,
                      "COMMIT", ""])


def udp(family: Family, dport: int) -> bytes:
    src, dst = ADDRESSES[family]
    return Packet(src, dst, "udp", sport=40000, dport=dport).build(1, 0)


@FAMILIES
@pytest.mark.parametrize("name", ["raw", "mangle"])
def test_their_chains_filter_at_their_hooks(family, name):
    """Each built-in chain's program gives its rules' verdicts and counts them."""
    rules = [f"-A {chain} -p udp -m udp --dport {9000 + i} -j DROP"
             for i, chain in enumerate(CHAINS[name])]
    loaded = load_filter_table(replace_blob(table(name, *rules), name, family), attach=False,
                               family=family)
    try:
        hooks = {h.chain_name: h for h in loaded.ruleset.hooks}
        assert sorted(hooks) == sorted(CHAINS[name])
        for i, chain in enumerate(CHAINS[name]):
            assert loaded.test_run(hooks[chain], udp(family, 9000 + i)) == DROP, chain
            assert loaded.test_run(hooks[chain], udp(family, 8999)) == ACCEPT, chain
        counted = [pkts for pkts, _ in loaded.ruleset.counters()]
        assert counted[:2 * len(rules):2] == [1] * len(rules), counted
    finally:
        loaded.close()


# a rule of each target and match the kernel runs, by table and family
KERNEL_RULES = [
    ("mangle", "-A FORWARD -p udp -j TOS --set-tos 0x10", "target 'TOS'", Family.IPV4),
    ("mangle", "-A FORWARD -j DSCP --set-dscp 0x0a", "target 'DSCP'", None),
    ("mangle", "-A FORWARD -j TTL --ttl-set 9", "target 'TTL'", Family.IPV4),
    ("mangle", "-A FORWARD -j HL --hl-dec 2", "target 'HL'", Family.IPV6),
    ("mangle", "-A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu",
     "target 'TCPMSS'", None),
    ("mangle", "-A POSTROUTING -p udp -j CHECKSUM --checksum-fill", "target 'CHECKSUM'", None),
    ("mangle", "-A POSTROUTING -j CLASSIFY --set-class 1:2", "target 'CLASSIFY'", None),
    ("raw", "-A PREROUTING -j CT --notrack", "target 'CT'", None),
    ("raw", "-A PREROUTING -j CT --zone 3", "target 'CT'", None),
    # (iptables writes -j NOTRACK as CT --notrack)
    ("raw", "-A OUTPUT -j NOTRACK", "target 'CT'", None),
    ("mangle", "-A FORWARD -p tcp -j ECN --ecn-tcp-remove", "target 'ECN'", Family.IPV4),
    ("mangle", "-A FORWARD -p tcp -j TCPOPTSTRIP --strip-options timestamp",
     "target 'TCPOPTSTRIP'", None),
    ("raw", "-A PREROUTING -p udp -j TRACE", "target 'TRACE'", None),
    ("mangle", "-A PREROUTING -p tcp -j TPROXY --on-port 7400 --tproxy-mark 1",
     "target 'TPROXY'", None),
    ("mangle", "-A PREROUTING -p tcp -m socket --transparent --restore-skmark",
     "match 'socket'", None),
    ("mangle", "-A INPUT -m connlabel --label 1", "match 'connlabel'", None),
]


@pytest.mark.parametrize("family, name, rule, what", [
    pytest.param(family, name, rule, what, id=f"{family.name.lower()}:{rule.split(' ', 2)[2]}")
    for name, rule, what, only in KERNEL_RULES for family in Family if only in (None, family)])
def test_what_the_kernel_runs_needs_the_module(family, name, rule, what):
    err = ours(replace_blob(table(name, rule), name, family), family=family)
    assert err.errno == errno.EOPNOTSUPP, err
    assert f"{what} needs bpfilter.ko (kernel module mode)" in str(err), err


@pytest.mark.parametrize("rule", ["-A FORWARD -j TOS --set-tos 0x10",
                                  "-A FORWARD -j DSCP --set-dscp 1",
                                  "-A FORWARD -j TTL --ttl-inc 1",
                                  "-A FORWARD -p udp -j CHECKSUM --checksum-fill"])
def test_a_mangle_target_elsewhere_is_invalid_as_in_the_kernel(fresh_netns, rule):
    """xt_check_target()'s table test, made before anything needs the module."""
    crafted = replace_blob(table("mangle", rule), "mangle")
    # the mangle rule's blob with the filter table's name and hooks: as a crafted
    # replace would send it (iptables refuses to write it)
    err = ours(_as_filter(crafted), family=Family.IPV4)
    assert err.errno == errno.EINVAL, err
    assert "is only valid in the mangle table, not filter" in str(err), err
    assert kernel_refusal(_as_filter(crafted), fresh_netns) == errno.EINVAL


def _as_filter(mangle_blob: bytes) -> bytes:
    """A mangle table's replace whose FORWARD rule is the filter table's: named filter,
    its hooks INPUT, FORWARD, OUTPUT (the mangle ones without PREROUTING and
    POSTROUTING, whose chains hold only their policies)."""
    header = ipt_replace.parse(mangle_blob[:SIZEOF_IPT_REPLACE])
    raw = codec.parse_replace(mangle_blob, family=Family.IPV4)
    header.name = b"filter".ljust(len(header.name), b"\0")
    header.valid_hooks = sum(1 << h.value for h in (Hook.LOCAL_IN, Hook.FORWARD, Hook.LOCAL_OUT))
    for h in (Hook.PRE_ROUTING, Hook.POST_ROUTING):
        header.hook_entry[h.value] = header.underflow[h.value] = 0
    assert raw.num_entries == 7   # five policies, the rule, the ERROR
    return ipt_replace.build(header) + mangle_blob[SIZEOF_IPT_REPLACE:]


@pytest.fixture
def with_the_modules_kfuncs(monkeypatch):
    """Compilation as with bpfilter.ko loaded (its kfuncs found): code, not a load."""
    real = Btf.module.__func__

    class Module:
        def kfunc_id(self, name):
            return 1

    monkeypatch.setattr(Btf, "module", classmethod(
        lambda cls, name: Module() if name == "bpfilter" else real(cls, name)))


def compiled(name: str, family: Family, *rules: str, traced: bool = False):
    _, model = table_from_blob(replace_blob(table(name, *rules), name, family), family)
    return compile_table(model, facts.KernelOffsets.from_btf(Btf.vmlinux()), traced=traced)


STALE = [
    ("mangle", ["-A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1000",
                "-A FORWARD -p tcp --tcp-option 2 -j ACCEPT"], "TCPMSS", "tcpopt"),
    ("mangle", ["-A FORWARD -p tcp -j TCPOPTSTRIP --strip-options sack-permitted",
                "-A FORWARD -p tcp --tcp-option 4 -j DROP"], "TCPOPTSTRIP", "tcpopt"),
    ("raw", ["-A PREROUTING -j NOTRACK",
             "-A PREROUTING -m conntrack --ctstate UNTRACKED -j ACCEPT"], "CT", "ct"),
]


@FAMILIES
@pytest.mark.parametrize("name, rules, target, facts_read", STALE, ids=[s[2] for s in STALE])
def test_a_target_that_changes_what_other_rules_read_once_is_refused(
        with_the_modules_kfuncs, family, name, rules, target, facts_read):
    """The prologue reads the tcp options and the conntrack entry once per packet; the
    kernel's matches read them as each rule meets the packet, after a target changed
    them."""
    with pytest.raises(BpfilterError) as info:
        compiled(name, family, *rules)
    assert info.value.errno == errno.EOPNOTSUPP
    assert f"target '{target}'" in str(info.value) and facts_read in str(info.value)


@FAMILIES
def test_ttl_after_ttl_compiles(with_the_modules_kfuncs, family):
    """TTL and HL keep the fact they change as they leave it (ext/hl.py): no refusal."""
    ttl = "-j TTL --ttl-dec 2" if family is Family.IPV4 else "-j HL --hl-dec 2"
    match = "-m ttl --ttl-eq 5" if family is Family.IPV4 else "-m hl --hl-eq 5"
    compiled("mangle", family, f"-A FORWARD {ttl}", f"-A FORWARD {match} -j DROP")


def _calls(asm, kfunc: Kfunc) -> int:
    return sum(1 for insn in asm.items if insn.imm == kfunc)


@FAMILIES
def test_only_mangle_output_is_routed_again(with_the_modules_kfuncs, family):
    """iptable_mangle's ipt_mangle_out(): OUTPUT's verdicts go through one call to
    bpfilter_reroute(), after one to bpfilter_route_snapshot(); no other hook, no
    other table, and no exit of OUTPUT's main program but that one."""
    # (a user chain called twice: a subprogram, whose verdicts main's exits pass on)
    table_ = compiled("mangle", family, ":LOCAL - [0:0]", "-A OUTPUT -p udp -j LOCAL",
                      "-A OUTPUT -p tcp -j LOCAL", "-A LOCAL -p udp -j MARK --set-mark 1",
                      "-A LOCAL -p udp -j ACCEPT", "-A OUTPUT -p tcp -j DROP",
                      "-A PREROUTING -j MARK --set-mark 2")
    for program in table_.programs:
        expected = 1 if program.hook is Hook.LOCAL_OUT else 0
        assert _calls(program.asm, reroute.SNAPSHOT_KFUNC) == expected, program.name
        assert _calls(program.asm, reroute.REROUTE_KFUNC) == expected, program.name
    out = next(p for p in table_.programs if p.hook is Hook.LOCAL_OUT).asm
    items = out.items
    snapshot = next(i for i, insn in enumerate(items) if insn.imm == reroute.SNAPSHOT_KFUNC)
    rerouted = next(i for i, insn in enumerate(items) if insn.imm == reroute.REROUTE_KFUNC)
    exits = [i for i, insn in enumerate(items) if insn.code == 0x95]   # BPF_JMP | BPF_EXIT
    # main's exits after the snapshot are the epilogue's one (subprograms follow it)
    assert [i for i in exits if snapshot < i < rerouted + 4] == [rerouted + 3], exits
    raw = compiled("raw", family, "-A OUTPUT -p udp -j DROP")
    assert not any(_calls(p.asm, reroute.REROUTE_KFUNC) for p in raw.programs)


@FAMILIES
def test_every_counted_entry_of_a_traced_table_is_traced(with_the_modules_kfuncs, family):
    """ipt_do_table() traces a packet at every rule it passes, after the rule's counter
    and before its target: in a traced table (its namespace's raw table has a TRACE
    rule), each count of an entry (rules, a classified run's, a chain's policy or
    RETURN) is followed by the trace call."""
    rules = [":CHK - [0:0]", "-A INPUT -p udp -j CHK", "-A CHK -p udp --dport 7 -j RETURN",
             *(f"-A INPUT -p udp --dport {port} -j ACCEPT" for port in range(7000, 7020)),
             "-A OUTPUT -j ACCEPT"]
    for program in compiled("mangle", family, *rules, traced=True).programs:
        items = program.asm.items
        counts = [i for i, insn in enumerate(items) if insn.imm == COUNTERS]
        traces = [i for i, insn in enumerate(items) if insn.imm == trace.TRACE_KFUNC]
        assert counts and len(traces) == len(counts), program.name
        assert all(c < t for c, t in zip(counts, traces)), program.name


@FAMILIES
def test_an_untraced_table_calls_nothing_of_the_modules_to_trace(with_the_modules_kfuncs,
                                                                   family):
    """Untraced (no TRACE rule in its raw table), a table's programs hold nothing of
    bpfilter.ko for tracing, so that `rmmod bpfilter` is not refused for it."""
    table_ = compiled("mangle", family, "-A INPUT -p udp -j ACCEPT")
    assert table_.trace_info is None
    assert not any(insn.imm == trace.TRACE_KFUNC for p in table_.programs for insn in p.asm.items)


@FAMILIES
def test_only_a_trace_rule_makes_its_namespace_trace(with_the_modules_kfuncs, family):
    raw_rules = ["-A PREROUTING -p udp --dport 7 -j TRACE", "-A OUTPUT -j ACCEPT"]
    for rules, traces in ((raw_rules, True), (raw_rules[1:], False)):
        _, model = table_from_blob(replace_blob(table("raw", *rules), "raw", family), family)
        assert trace.sets_trace(model) is traces, rules


@FAMILIES
def test_a_twin_goes_on_with_its_tables_counters_and_state(family):
    """When its namespace starts or stops tracing, a table is loaded again (its twin,
    loader.load_twin) and goes on as one table with it: counters, statistic's nth
    phase and limit's bucket are where the first left them."""
    rules = ["-A PREROUTING -p udp --dport 7 -m statistic --mode nth --every 3 --packet 0 -j DROP",
             "-A PREROUTING -p udp --dport 8 -m limit --limit 1/hour --limit-burst 2 -j DROP"]
    loaded = load_filter_table(replace_blob(table("mangle", *rules), "mangle", family),
                               attach=False, family=family)
    twin = None
    try:
        pre = loaded.ruleset.hooks[Hook.PRE_ROUTING].prog_fd
        run = lambda fd, port: bpf.nf_test_run(fd, Hook.PRE_ROUTING, udp(family, port))[0]
        assert [run(pre, 7) for _ in range(4)] == [DROP, ACCEPT, ACCEPT, DROP]
        assert [run(pre, 8) for _ in range(1)] == [DROP]
        twin = load_twin(loaded.ruleset, traced=False)
        again = twin.hooks[Hook.PRE_ROUTING].prog_fd
        assert again != pre and bpf.prog_info(again)["id"] != bpf.prog_info(pre)["id"]
        # the nth counter goes on from 4, the bucket has one credit left
        assert [run(again, 7) for _ in range(3)] == [ACCEPT, ACCEPT, DROP]
        assert [run(again, 8) for _ in range(2)] == [DROP, ACCEPT]
        assert [pkts for pkts, _ in twin.counters()][:2] == [3, 2]
        assert twin.counters() == loaded.ruleset.counters()
    finally:
        if twin is not None:
            twin.close()
        loaded.close()


@FAMILIES
def test_socket_restore_skmark_reads_the_mark_again(with_the_modules_kfuncs, family):
    """xt_socket's --restore-skmark writes the socket's mark into the packet's: after
    the match the mark fact is read again, so that a later -m mark sees it."""
    table_ = compiled("mangle", family, "-A PREROUTING -p tcp -m socket --restore-skmark",
                      "-A PREROUTING -m mark --mark 1 -j DROP")
    items = next(p for p in table_.programs if p.hook is Hook.PRE_ROUTING).asm.items
    call = next(i for i, insn in enumerate(items) if insn.imm == XT_MATCH_KFUNC)
    assert any(insn.off == facts.MARK for insn in items[call:call + 4]), items[call:call + 4]
    plain = compiled("mangle", family, "-A PREROUTING -p tcp -m socket --transparent",
                     "-A PREROUTING -m mark --mark 1 -j DROP")
    items = next(p for p in plain.programs if p.hook is Hook.PRE_ROUTING).asm.items
    call = next(i for i, insn in enumerate(items) if insn.imm == XT_MATCH_KFUNC)
    assert not any(insn.off == facts.MARK for insn in items[call:call + 4])


@FAMILIES
def test_log_is_the_kernels_own_with_the_module(with_the_modules_kfuncs, family):
    """With bpfilter.ko, LOG is xt_LOG run by the module (the kernel prints the line,
    --log-uid included); without it, the log ring's (ext/log.py)."""
    rules = ['-A INPUT -p udp -j LOG --log-prefix "in: " --log-uid']
    _, model = table_from_blob(replace_blob(table("mangle", *rules), "mangle", family), family)
    target = next(r.target for c in model.chains.values() for r in c.rules)
    assert isinstance(target, KernelLogTarget) and target.prefix == b"in: ", target
    table_ = compile_table(model, facts.KernelOffsets.from_btf(Btf.vmlinux()))
    program = next(p for p in table_.programs if p.hook is Hook.LOCAL_IN)
    assert _calls(program.asm, XT_TARGET_KFUNC) == 1
