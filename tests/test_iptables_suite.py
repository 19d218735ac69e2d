"""iptables' own extension tests (.t files) against the kernel and through bpfilter,
every line of every file, per family (tests/iptables_suite.py says how each case is
judged). Nothing is skipped: a line bpfilter refuses is "unsupported" only when the
kernel takes it and bpfilter's refusal is EOPNOTSUPP naming the chain, the rule and the
extension; the refusals, by extension, must be exactly UNSUPPORTED below. Supporting
an extension, or a new option of one, therefore means editing that list.
"""
import pytest
import test_service
from families import FAMILIES, FAMILY_IDS
from iptables_suite import (External, Side, Line, families_of, failures, parse, run_suite,
                            suite_files, summary, t_disagreements, unsupported_summary)

from bpfilter.model import Family

pytestmark = pytest.mark.kernel
svc, nets = test_service.svc, test_service.nets     # a private service

_COMMON = """
    match cgroup: needs bpfilter.ko (kernel module mode)
    match cluster: needs bpfilter.ko (kernel module mode)
    match connlabel: needs bpfilter.ko (kernel module mode)
    match connlimit: needs bpfilter.ko (kernel module mode)
    match rpfilter: needs bpfilter.ko (kernel module mode)
    match socket: needs bpfilter.ko (kernel module mode)
    table nat
    target AUDIT: needs bpfilter.ko (kernel module mode)
    target CHECKSUM: needs bpfilter.ko (kernel module mode)
    target CLASSIFY: needs bpfilter.ko (kernel module mode)
    target CONNMARK: needs bpfilter.ko (kernel module mode) to write the connection's or the packet's mark
    target CONNSECMARK: needs bpfilter.ko (kernel module mode)
    target CT: needs bpfilter.ko (kernel module mode)
    target DSCP: needs bpfilter.ko (kernel module mode)
    target HMARK: needs bpfilter.ko (kernel module mode)
    target IDLETIMER: needs bpfilter.ko (kernel module mode)
    target MARK: needs bpfilter.ko (kernel module mode) to write the packet's mark
    target NFLOG: needs bpfilter.ko (kernel module mode)
    target NFQUEUE: revision N is refused
    target SYNPROXY: needs bpfilter.ko (kernel module mode)
    target TCPMSS: needs bpfilter.ko (kernel module mode)
    target TCPOPTSTRIP: needs bpfilter.ko (kernel module mode)
    target TEE: needs bpfilter.ko (kernel module mode)
    target TOS: needs bpfilter.ko (kernel module mode)
    target TPROXY: needs bpfilter.ko (kernel module mode)
    target TRACE: needs bpfilter.ko (kernel module mode)
"""
# What the kernel takes and bpfilter (`bpfilter serve`, no bpfilter.ko) refuses, per
# family: "<match|target> NAME: the reason's first clause", or "table NAME".
UNSUPPORTED = {
    Family.IPV4: _COMMON + """
    match osf: needs bpfilter.ko (kernel module mode)
    target ECN: needs bpfilter.ko (kernel module mode)
    target TTL: needs bpfilter.ko (kernel module mode)
    """,
    Family.IPV6: _COMMON + """
    match addrtype: needs bpfilter.ko (kernel module mode) for the kernel's address type lookup, which a netfilter BPF program cannot make
    target DNPT: needs bpfilter.ko (kernel module mode)
    target HL: needs bpfilter.ko (kernel module mode)
    target SNPT: needs bpfilter.ko (kernel module mode)
    """,
}

# Lines where the kernel, with Debian's iptables 1.8.9, does not do what the .t file
# (from iptables' git of 2026) expects; bpfilter does what the kernel does there.
T_DISAGREEMENTS = {
    # `! --sport :` and the like: 1.8.9 saves the inverted full range as nothing (tcp
    # 10, 16; udp 10, 16); reversed ranges (4:3) that newer iptables refuses, 1.8.9
    # passes on (udp 14, 20 and the next lines)
    "libxt_tcp.t": {10, 16}, "libxt_udp.t": {10, 14, 16, 20},
    "libxt_length.t": {12}, "libxt_dccp.t": {13, 18},
    "libxt_conntrack.t": {17, 26, 27, 33, 39, 45, 51},
    "libxt_esp.t": {8, 13}, "libxt_ipcomp.t": {5, 10}, "libipt_ah.t": {15, 19},
    "ip6/libip6t_ah.t": {17, 21}, "ip6/libip6t_frag.t": {3, 8}, "ip6/libip6t_rt.t": {7, 11},
    "ip6/libip6t_mh.t": {8}, "libipt_icmp.t": {13},
    # ICMPv6 type names newer than 1.8.9
    "ip6/libip6t_icmp6.t": {7, 8, 9, 10},
    # option spellings 1.8.9 does not parse (--protocol=tcp, -ptcp), `! -i +` saved as nothing
    "libipt_standard.t": {19, 20}, "iptables.t": {8},
    # what this kernel has not: IPVS (not built), LED and SECMARK targets (no LED
    # trigger, no SELinux), NFQUEUE --queue-balance : (EINVAL), its saved upper bound
    "libxt_ipvs.t": set(range(2, 18)), "libipt_ipvs.t": {2, 3, 4}, "ip6/libip6t_ipvs.t": {2, 3, 4},
    "libxt_LED.t": {3, 4}, "libxt_SECMARK.t": {3}, "libxt_NFQUEUE.t": {12, 14},
}


def _lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip()}


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_iptables_own_tests(svc, family, capsys):
    files = suite_files()
    kernel = Side("kernel", dict(svc.env), via_bpfilter=False)
    ours = Side("bpfilter", dict(svc.env), via_bpfilter=True)
    results = run_suite(files, (family,), kernel, ours, svc.dir)
    with capsys.disabled():
        print(f"\n{summary(results)}")
    # every file of the family ran, and every line of each in every chain it names
    assert sorted(r.file for r in results) == sorted(f for f in files if family in families_of(f))
    for r in results:
        assert r.cases, f"{r.file}: no test line judged"
    assert failures(results) == []
    assert unsupported_summary(results).get(family.name, set()) == _lines(UNSUPPORTED[family])
    expected = {(f, line) for f, lines in T_DISAGREEMENTS.items() for line in lines
                if families_of(f)[0] == family}
    assert {(f, line) for f, line, _, _ in t_disagreements(results)} == expected


def test_the_t_format():
    """What the runner reads of a .t file: chains, tables, "=", results scoped to a
    backend (legacy keeps its own, or takes the alternative or the inverse of nft's),
    and external commands where they stand."""
    items = parse(""":INPUT,FORWARD
# a comment
-p tcp;=;OK
-p udp --dport 1;-p udp -m udp --dport 1;OK
@nfacct add test
*raw
:PREROUTING
-j CT --zone 1;=;OK;LEGACY;NOMATCH
-j CT;;FAIL;NFT
-j CT --zone 2;=;NOMATCH;NFT
-j CT --zone 3;=;OK;NFT;OK
""")
    assert items == [
        Line(3, "filter", ("INPUT", "FORWARD"), "-p tcp", "-p tcp", "OK"),
        Line(4, "filter", ("INPUT", "FORWARD"), "-p udp --dport 1", "-p udp -m udp --dport 1",
                 "OK"),
        External(5, "nfacct add test"),
        Line(8, "raw", ("PREROUTING",), "-j CT --zone 1", "-j CT --zone 1", "OK"),
        Line(9, "raw", ("PREROUTING",), "-j CT", "", "OK"),
        Line(10, "raw", ("PREROUTING",), "-j CT --zone 2", "-j CT --zone 2", "OK"),
        Line(11, "raw", ("PREROUTING",), "-j CT --zone 3", "-j CT --zone 3", "OK"),
    ]
    with pytest.raises(ValueError):
        parse("-p tcp;=;OK\n")      # no chain yet
