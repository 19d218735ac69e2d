"""What bpfilter cannot translate refuses the whole table, loudly and precisely.

The error is a BpfilterError with the errno iptables will print (EOPNOTSUPP for
what bpfilter does not implement, EINVAL for what the kernel itself refuses) and
a message that names the chain, the rule's position in it and the extension. And
nothing stays loaded: no BPF program, map or link is left behind in this process.
"""
import errno
import os
import struct
import subprocess

import pytest

from bpfilter import loader
from bpfilter.abi import codec, sockopt
from bpfilter.abi.ipv4 import IPT_INV_PROTO, SIZEOF_IPT_ENTRY
from bpfilter.abi.xtables import SIZEOF_XT_ENTRY_HEADER, ipt_replace
from bpfilter.errors import BpfilterError
from bpfilter.loader import load_filter_table
from bpfilter.model import Family
from bpfilter.netns import entered
from bpfilter_lab.scratch import replace_blob

pytestmark = pytest.mark.kernel

HEADER = ipt_replace.sizeof()      # struct ipt_replace, before the entries
IP_PROTO, IP_INVFLAGS = 80, 83     # offsets in struct ipt_ip, at the start of each entry


def ruleset(*lines: str) -> str:
    """INPUT/FORWARD/OUTPUT ACCEPT, user chains X and Y, then the rules."""
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":X - [0:0]", ":Y - [0:0]",
                      *lines, "COMMIT", ""])


def bpf_fds() -> list[str]:
    """This process's BPF objects (programs, maps, links) by fd."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("anon_inode:bpf"):
            found.append(f"{fd} -> {target}")
    return sorted(found)


def refused(blob: bytes, netns_name: str) -> BpfilterError:
    """Load (and attach in netns_name) and return the refusal; no fds may be left."""
    before = bpf_fds()
    with pytest.raises(BpfilterError) as info:
        table = load_filter_table(blob, netns_name)
        table.close()   # not reached when refused; keeps a wrong acceptance from leaking
    assert bpf_fds() == before
    return info.value


# Each: a rule, where it sits, and what the message must name. The offending rule is
# the second of chain Y, reached from OUTPUT through X, so the position is not trivial.
UNSUPPORTED = [
    ("-m recent --name x --rcheck --hitcount 40 -j ACCEPT", "match 'recent' needs bpfilter.ko"),
    ("-j MARK --set-mark 1", "target 'MARK' needs bpfilter.ko"),
    ("-j CONNMARK --save-mark", "target 'CONNMARK' needs bpfilter.ko"),
    ("-p tcp -m connlimit --connlimit-above 2", "match 'connlimit' needs bpfilter.ko"),
    ("-m string --algo fsm --hex-string |00000161|", "match 'string' --algo fsm"),
    ("-m connlabel --label 1", "match 'connlabel' needs bpfilter.ko"),
    ("-j NFLOG --nflog-group 3", "target 'NFLOG'"),
    ("-j NFQUEUE --queue-num 3", "target 'NFQUEUE' revision 3 is refused: a netfilter BPF "
                                 "program's verdict is a drop or an accept, never a queue"),
    ("-j QUEUE", "QUEUE is refused: a netfilter BPF program's verdict"),
]


@pytest.mark.parametrize("rule, names", UNSUPPORTED, ids=[r for r, _ in UNSUPPORTED])
def test_unsupported_extension_refuses_the_table(fresh_netns, rule, names):
    blob = replace_blob(ruleset("-A OUTPUT -p udp -j ACCEPT", "-A OUTPUT -j X",
                                "-A X -j Y", "-A Y -p udp", f"-A Y {rule}", "-A Y -j DROP"))
    err = refused(blob, fresh_netns)
    assert err.errno == errno.EOPNOTSUPP, err
    assert "chain Y rule 2" in str(err)
    assert names in str(err)
    assert "whole table is refused" in str(err)


def test_unsupported_rule_in_a_chain_no_hook_reaches_still_refuses(fresh_netns):
    """The kernel checks every entry, reachable or not; so does bpfilter."""
    blob = replace_blob(ruleset("-A X -m connlabel --label 1"))
    err = refused(blob, fresh_netns)
    assert err.errno == errno.EOPNOTSUPP
    assert "chain X rule 1" in str(err) and "match 'connlabel'" in str(err)


def tcp_rule_blob(proto: int, invert_proto: bool) -> bytes:
    """`-A OUTPUT -p tcp --dport 80 -j DROP`, with the rule's protocol rewritten:
    what no iptables writes, a tcp match on a rule that is not (only) tcp."""
    blob = bytearray(replace_blob(ruleset("-A OUTPUT -p tcp --dport 80 -j DROP")))
    rule = codec.parse_replace(bytes(blob)).entries[2]     # INPUT, FORWARD policies first
    assert [m.name for m in rule.matches] == ["tcp"]
    at = HEADER + rule.offset
    blob[at + IP_PROTO:at + IP_PROTO + 2] = proto.to_bytes(2, "little")
    if invert_proto:
        blob[at + IP_INVFLAGS] |= IPT_INV_PROTO
    return bytes(blob)


@pytest.mark.parametrize("proto, invert, spelled", [
    (0, False, "-m tcp without -p"),
    (17, False, "-p udp -m tcp"),
    (6, True, "! -p tcp -m tcp"),
])
def test_tcp_match_without_tcp_protocol_is_invalid(fresh_netns, proto, invert, spelled):
    blob = tcp_rule_blob(proto, invert)
    err = refused(blob, fresh_netns)
    assert err.errno == errno.EINVAL, err
    assert "chain OUTPUT rule 1" in str(err) and "'tcp'" in str(err)


def kernel_refusal(blob: bytes, netns_name: str, family: Family = Family.IPV4) -> int:
    """The errno the kernel's own iptables (ip6tables) gives `blob` in netns_name
    (0: accepted). ip6t_replace's header is ipt_replace's."""
    blob = bytearray(blob)
    command = "iptables-legacy" if family is Family.IPV4 else "ip6tables-legacy"
    subprocess.run(["ip", "netns", "exec", netns_name, command, "-L", "-n"], check=True,
                   capture_output=True)                     # instantiate the filter table
    with entered(netns_name):
        live = codec.parse_getinfo(sockopt.get_info("filter", family))["num_entries"]
        header = ipt_replace.parse(bytes(blob[:HEADER]))
        header.num_counters = live
        blob[:HEADER] = ipt_replace.build(header)
        try:
            sockopt.set_replace(bytes(blob), family=family)
        except BpfilterError as err:
            return err.errno
    return 0


def test_the_kernel_also_refuses_a_tcp_match_without_tcp(fresh_netns):
    """The EINVAL above is the kernel's answer too (xt_check_match's protocol check)."""
    assert kernel_refusal(tcp_rule_blob(0, False), fresh_netns) == errno.EINVAL


def test_mac_reachable_from_output_is_invalid(fresh_netns):
    """xt_mac only runs in PREROUTING, INPUT and FORWARD: a rule reachable from OUTPUT
    (here OUTPUT's jump is turned from Y to X) is refused by the kernel with EINVAL."""
    blob = bytearray(replace_blob(ruleset("-A INPUT -j X", "-A OUTPUT -j Y",
                                          "-A X -m mac --mac-source 02:00:00:00:00:01")))
    raw = codec.parse_replace(bytes(blob))
    jump, x_first = raw.entries[3], raw.entries[6]
    assert jump.target.name == "" and raw.entries[5].target.errorname == "X"
    at = HEADER + jump.offset + jump.target_offset + SIZEOF_XT_ENTRY_HEADER
    blob[at:at + 4] = x_first.offset.to_bytes(4, "little")
    err = refused(bytes(blob), fresh_netns)
    assert err.errno == errno.EINVAL, err
    assert "chain X rule 1" in str(err) and "'mac'" in str(err) \
        and "only valid from PREROUTING/INPUT/FORWARD" in str(err)
    assert kernel_refusal(bytes(blob), fresh_netns) == errno.EINVAL
    # reachable from INPUT only, the same rule loads
    load_filter_table(replace_blob(ruleset("-A INPUT -j X", "-A OUTPUT -j Y",
                                           "-A X -m mac --mac-source 02:00:00:00:00:01")),
                      attach=False).close()


# ---------------------------------------------------------------- bad match payloads

REVISION = SIZEOF_XT_ENTRY_HEADER - 1    # the last byte of a match's or target's header

# What no iptables writes: the rule, then (where, offset, value) bytes to put in the
# blob: "ip" at the rule's entry, "match" at its first match's header, "payload" at
# that match's data, "target" at its target's header; the errno the kernel answers,
# and what the message must name.
BAD_PAYLOADS = [
    ("-p tcp -m multiport --dports 22,80", [("payload", 0, 3)], errno.EINVAL,
     "multiport: unknown flags 3"),
    ("-p tcp -m multiport --dports 22,80", [("payload", 1, 16)], errno.EINVAL,
     "multiport: 16 ports, more than 15"),
    # pflags start at payload byte 32: a range must end at a plain port, in the list,
    # not below its start
    ("-p tcp -m multiport --dports 100,200,300", [("payload", 34, 1)], errno.EINVAL,
     "multiport: the range at port 3 has no end among the ports"),
    ("-p tcp -m multiport --dports 100,200,300", [("payload", 32, 1), ("payload", 33, 1)],
     errno.EINVAL, "multiport: the range at port 1 ends where another range starts"),
    ("-p tcp -m multiport --dports 300,200", [("payload", 32, 1)], errno.EINVAL,
     "multiport: the range at port 1 is reversed (300:200)"),
    ("-p udp -m multiport --dports 53", [("ip", IP_PROTO, 1)], errno.EINVAL,
     "multiport is only valid with -p tcp, udp, udplite, sctp or dccp"),
    ("-p udp -m multiport --dports 53", [("ip", IP_PROTO, 0)], errno.EINVAL,
     "multiport is only valid"),
    ("-p udp -m multiport --dports 53", [("ip", IP_INVFLAGS, IPT_INV_PROTO)], errno.EINVAL,
     "multiport is only valid"),
    ("-p tcp -m multiport --dports 22", [("match", REVISION, 0)], errno.ENOENT,
     "match 'multiport' has no revision 0 (Linux has 1)"),
    ("-m iprange --src-range 10.0.0.1-10.0.0.2", [("match", REVISION, 0)], errno.ENOENT,
     "match 'iprange' has no revision 0"),
    ("-m length --length 10", [("match", REVISION, 1)], errno.ENOENT,
     "match 'length' has no revision 1"),
    ("-m ttl --ttl-eq 1", [("match", REVISION, 1)], errno.ENOENT,
     "match 'ttl' has no revision 1"),
    ("-p tcp --dport 22", [("match", REVISION, 1)], errno.ENOENT,
     "match 'tcp' has no revision 1"),
    ("-p udp --dport 22", [("match", REVISION, 1)], errno.ENOENT,
     "match 'udp' has no revision 1"),
    # comment, conntrack, mark and pkttype are registered for every family at once:
    # the kernel's lookup says so
    ("-m comment --comment x", [("match", REVISION, 1)], errno.EPROTOTYPE,
     "match 'comment' has no revision 1"),
    ("-m mark --mark 1", [("match", REVISION, 2)], errno.EPROTOTYPE,
     "match 'mark' has no revision 2 (Linux has 1)"),
    ("-m pkttype --pkt-type host", [("match", REVISION, 1)], errno.EPROTOTYPE,
     "match 'pkttype' has no revision 1"),
    ("-m conntrack --ctstate NEW", [("match", REVISION, 4)], errno.EPROTOTYPE,
     "match 'conntrack' has no revision 4 (Linux has 1, 2, 3)"),
    # addrtype: revisions 0 and 1, each registered per family
    ("-m addrtype --dst-type LOCAL", [("match", REVISION, 2)], errno.ENOENT,
     "match 'addrtype' has no revision 2 (Linux has 0, 1)"),
    # flags (payload byte 4): --limit-iface-in with -out; -in from OUTPUT
    ("-m addrtype --dst-type LOCAL", [("payload", 4, 0x0C)], errno.EINVAL,
     "addrtype: both incoming and outgoing interface limitation cannot be selected"),
    ("-m addrtype --dst-type LOCAL", [("payload", 4, 0x04)], errno.EINVAL,
     "addrtype: input interface limitation not valid in POSTROUTING and OUTPUT"),
    ("-m length --length 10 -j LOG", [("target", REVISION, 1)], errno.ENOENT,
     "target 'LOG' has no revision 1"),
]


def bad_payload_blob(rule: str, patches) -> bytes:
    """The blob of `-A OUTPUT <rule>` (-j DROP unless it says) with `patches` applied
    to that rule."""
    target = "" if " -j " in rule else " -j DROP"
    blob = bytearray(replace_blob(ruleset(f"-A OUTPUT {rule}{target}")))
    entry = codec.parse_replace(bytes(blob)).entries[2]     # INPUT, FORWARD policies first
    at = {"ip": HEADER + entry.offset, "match": HEADER + entry.offset + SIZEOF_IPT_ENTRY,
          "target": HEADER + entry.offset + entry.target_offset}
    at["payload"] = at["match"] + SIZEOF_XT_ENTRY_HEADER
    for where, offset, value in patches:
        blob[at[where] + offset] = value
    return bytes(blob)


@pytest.mark.parametrize("rule, patches, err, names", BAD_PAYLOADS,
                         ids=[f"{r} {p}" for r, p, _, _ in BAD_PAYLOADS])
def test_bad_payloads_get_the_kernels_errno(fresh_netns, rule, patches, err, names):
    blob = bad_payload_blob(rule, patches)
    assert kernel_refusal(blob, fresh_netns) == err
    ours = refused(blob, fresh_netns)
    assert ours.errno == err, ours
    assert "chain OUTPUT rule 1" in str(ours) and names in str(ours)


def nested_chains(depth: int) -> str:
    names = [f"C{i}" for i in range(1, depth + 1)]
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *[f":{n} - [0:0]" for n in names],
                      "-A OUTPUT -j C1", *[f"-A {a} -j {b}" for a, b in zip(names, names[1:])],
                      f"-A {names[-1]} -j DROP", "COMMIT", ""])


def test_user_chains_nested_deeper_than_bpf_call_frames_refuse(fresh_netns):
    # main program + 7 user chains = BPF's 8 call frames; the 8th chain has no frame
    err = refused(replace_blob(nested_chains(8)), fresh_netns)
    assert err.errno == errno.EOPNOTSUPP, err
    assert "chain OUTPUT" in str(err) and "nest 8 deep" in str(err) and "at most 7" in str(err)


def test_seven_nested_user_chains_load(fresh_netns):
    before = bpf_fds()
    table = load_filter_table(replace_blob(nested_chains(7)), fresh_netns)
    try:
        assert len(bpf_fds()) > len(before)
    finally:
        table.close()
    assert bpf_fds() == before


# ---------------------------------------------------------------- rollback

def test_a_kernel_refusal_midway_unloads_what_was_loaded(fresh_netns, monkeypatch):
    """The OUTPUT program fails to load after INPUT's and FORWARD's are in."""
    real, calls = loader.bpf.prog_load, []

    def prog_load(prog_type, insns, name, *args, **kw):
        calls.append(name)
        if name.startswith("filter_OUTPUT"):
            raise BpfilterError(errno.E2BIG, "refused for the test")
        return real(prog_type, insns, name, *args, **kw)

    monkeypatch.setattr(loader.bpf, "prog_load", prog_load)
    err = refused(replace_blob(ruleset("-A OUTPUT -p tcp -j DROP")), fresh_netns)
    assert err.errno == errno.E2BIG
    assert calls == ["filter_INPUT", "filter_FORWARD", "filter_OUTPUT"]


def test_an_attach_failure_detaches_and_unloads_everything(fresh_netns, monkeypatch):
    real, calls = loader.bpf.link_create_netfilter, []

    def link_create(prog_fd, pf, hooknum, priority, *args, **kw):
        calls.append(hooknum)
        if len(calls) == 3:
            raise BpfilterError(errno.EBUSY, "refused for the test")
        return real(prog_fd, pf, hooknum, priority, *args, **kw)

    monkeypatch.setattr(loader.bpf, "link_create_netfilter", link_create)
    err = refused(replace_blob(ruleset("-A OUTPUT -p tcp -j DROP")), fresh_netns)
    assert err.errno == errno.EBUSY
    assert len(calls) == 3


def limit_blob(avg_burst: "tuple[int, int] | None" = None) -> bytes:
    """OUTPUT -m limit --limit 1/day --limit-burst 1, its avg and burst then set to
    `avg_burst` in the payload."""
    blob = replace_blob(ruleset("-A OUTPUT -m limit --limit 1/day --limit-burst 1 -j ACCEPT"))
    given = struct.pack("<II", 864000000, 1)
    assert blob.count(given) == 1
    return blob.replace(given, struct.pack("<II", *avg_burst)) if avg_burst else blob


@pytest.mark.parametrize("avg, burst", [
    (864000000, 5),       # 1/day, burst 5: avg * burst wraps in u32
    (864000000, 2),       # 1/day, burst 2: user2credits(avg * burst) wraps
    (10000, 0),           # a zero burst
], ids=["avg times burst overflows", "credits overflow", "zero burst"])
def test_limit_overflow_and_zero_burst_are_out_of_range(fresh_netns, avg, burst):
    """limit_mt_check(): ERANGE, as the kernel answers the same blob."""
    blob = limit_blob((avg, burst))
    err = refused(blob, fresh_netns)
    assert err.errno == errno.ERANGE, err
    assert "chain OUTPUT rule 1" in str(err) and "limit" in str(err) and "overflows" in str(err)
    assert kernel_refusal(blob, fresh_netns) == errno.ERANGE


def test_limit_at_the_edge_of_overflow_loads(fresh_netns):
    """Next to the refused ones, 1/day with burst 1 loads, in bpfilter as in the kernel."""
    load_filter_table(limit_blob(), attach=False).close()
    subprocess.run(["ip", "netns", "exec", fresh_netns, "iptables-legacy-restore"],
                   input=ruleset("-A OUTPUT -m limit --limit 1/day --limit-burst 1 -j ACCEPT"),
                   text=True, check=True)
