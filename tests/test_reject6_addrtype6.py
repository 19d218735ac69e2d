"""ip6tables' REJECT and addrtype, the two IPv6 extensions only bpfilter.ko's kfuncs
can run: their payloads checked as ip6t_REJECT's and xt_addrtype's checkentry check
them (each bad blob also given to the kernel's ip6_tables, same errno), their
refusal without the module, their `ip6tables -L -n` text, and addrtype's
match_type6() as the rules compute it from the kfunc's answer.

What they do to real packets is proven in the VM, where the module is
(tests/test_kmod.py, tools/vm/scenarios/kmod6.sh).
"""
import errno
import os
import subprocess

import pytest

from bpfilter import ext, klog
from bpfilter.loader import load_filter_table
from bpfilter.abi import codec, sockopt
from bpfilter.abi.ipv6 import IP6T_F_PROTO, IP6T_INV_PROTO, SIZEOF_IP6T_ENTRY
from bpfilter.abi.xtables import SIZEOF_XT_ENTRY_HEADER, ipt_replace, xt_get_revision
from bpfilter.bpf import insn as I
from bpfilter.bpf import syscall as bpf
from bpfilter.bpf.asm import Assembler
from bpfilter.bpf.insn import (BPF_ALU64_IMM, BPF_EXIT_INSN, BPF_JMP_IMM, BPF_LD_MAP_FD,
                               BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W, FP,
                               R0, R1, R2, R6, R7, MapRef)
from bpfilter.decode import table_from_blob
from bpfilter.errors import BpfilterError
from bpfilter.ext.addrtype import _GROUPS6, KIND6, ROUTE6, Addrtype6Match
from bpfilter.ext.reject import REJECT6_WITH
from bpfilter.model import Family, Interface, Ip6Header, Prefix
from bpfilter.netns import entered
from bpfilter.packet import facts
from bpfilter.packet.primitives import MISMATCH, RuleOutcome
from bpfilter_lab.scratch import replace_blob
from bpfilter.service import get_answer
from bpfilter.abi import ipv6

pytestmark = pytest.mark.kernel

V6 = Family.IPV6
HEADER = ipt_replace.sizeof()            # ip6t_replace has ipt_replace's layout
IP_PROTO, IP_FLAGS, IP_INVFLAGS = 128, 131, 132    # in struct ip6t_ip6
TARGET_HEADER = 32                        # struct xt_entry_target, before its payload


def ruleset(*lines: str) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":X - [0:0]", *lines, "COMMIT", ""])


def crafted(line: str, patches=()) -> bytes:
    """The blob ip6tables-legacy-restore makes of `line` (the table's only rule), with
    `patches` applied to that rule: (where, offset, bytes), where is "ip" (its
    ip6t_ip6), "match" (its first match's header), "payload" (that match's data) or
    "target" (its target's data)."""
    blob = bytearray(replace_blob(ruleset(line), family=V6))
    raw = codec.parse_replace(bytes(blob), family=V6)
    entry = next(e for e in raw.entries if e.matches or e.target.name == "REJECT")
    start = HEADER + entry.offset
    at = {"ip": start, "match": start + SIZEOF_IP6T_ENTRY,
          "payload": start + SIZEOF_IP6T_ENTRY + SIZEOF_XT_ENTRY_HEADER,
          "target": start + entry.target_offset + TARGET_HEADER}
    for where, offset, value in patches:
        blob[at[where] + offset:at[where] + offset + len(value)] = value
    return bytes(blob)


def ours(blob: bytes) -> BpfilterError:
    with pytest.raises(BpfilterError) as info:
        table_from_blob(blob, V6)
    return info.value


def kernels(blob: bytes, netns_name: str) -> int:
    """The errno the kernel's own ip6tables gives `blob` in netns_name (0: taken)."""
    blob = bytearray(blob)
    subprocess.run(["ip", "netns", "exec", netns_name, "ip6tables-legacy", "-L", "-n"],
                   check=True, capture_output=True)          # the filter table, created
    with entered(netns_name):
        header = ipt_replace.parse(bytes(blob[:HEADER]))
        header.num_counters = codec.parse_getinfo(sockopt.get_info("filter", V6))["num_entries"]
        blob[:HEADER] = ipt_replace.build(header)
        try:
            sockopt.set_replace(bytes(blob), family=V6)
        except BpfilterError as err:
            return err.errno
    return 0


def listed(netns_name: str, chain: str = "INPUT") -> list[str]:
    """ip6tables -L -n's rule lines, from the destination column on cut off."""
    out = subprocess.run(["ip", "netns", "exec", netns_name, "ip6tables-legacy", "-L", chain,
                          "-n"], capture_output=True, text=True, check=True).stdout
    return [line.split("::/0", 2)[-1].strip() for line in out.splitlines()[2:]]


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


# ip parts to decode a lone extension with: `-p tcp` given, and no -p at all
_ANYWHERE, _NO_DEVICE = Prefix(bytes(16), bytes(16)), Interface(bytes(16), bytes(16))
TCP_RULE = Ip6Header(_ANYWHERE, _ANYWHERE, _NO_DEVICE, _NO_DEVICE, 6, False, True)
ANY_RULE = Ip6Header(_ANYWHERE, _ANYWHERE, _NO_DEVICE, _NO_DEVICE)


# ---------------------------------------------------------------- REJECT

# enum ip6t_reject_with
NO_ROUTE, ADM_PROHIBITED, NOT_NEIGHBOUR, ADDR_UNREACH, PORT_UNREACH, ECHOREPLY, TCP_RESET = range(7)

BAD_REJECTS = [
    # (what, rule, patches, message): reject_tg6_check()'s EINVALs
    ("echo-reply", "-A INPUT -j REJECT", [("target", 0, u32(ECHOREPLY))], "echo-reply"),
    ("tcp-reset with -p udp", "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
     [("ip", IP_PROTO, b"\x11")], "only valid with -p tcp"),
    ("tcp-reset with ! -p tcp", "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
     [("ip", IP_INVFLAGS, bytes([IP6T_INV_PROTO]))], "only valid with -p tcp"),
    # the protocol says tcp, but without IP6T_F_PROTO (-p not given) nothing looks at it
    ("tcp-reset with proto 6 but no IP6T_F_PROTO",
     "-A INPUT -p tcp -j REJECT --reject-with tcp-reset", [("ip", IP_FLAGS, b"\x00")],
     "only valid with -p tcp"),
]


@pytest.mark.parametrize("what, rule, patches, message", BAD_REJECTS,
                         ids=[b[0] for b in BAD_REJECTS])
def test_bad_reject_payloads_get_the_kernels_errno(fresh_netns, what, rule, patches, message):
    blob = crafted(rule, patches)
    err = ours(blob)
    assert err.errno == errno.EINVAL, err
    assert "chain INPUT rule 1" in str(err) and message in str(err), err
    assert kernels(blob, fresh_netns) == errno.EINVAL


def test_the_flag_alone_makes_tcp_reset_valid(fresh_netns):
    """Next to the last case: IP6T_F_PROTO set, proto 6, nothing inverted."""
    blob = crafted("-A INPUT -p tcp -j REJECT --reject-with tcp-reset")
    assert codec.parse_replace(blob, family=V6).entries[0].ip.flags & IP6T_F_PROTO
    assert kernels(blob, fresh_netns) == 0
    served(blob)


REJECT_WITH = ["icmp6-no-route", "icmp6-adm-prohibited", "icmp6-addr-unreachable",
               "icmp6-port-unreachable", "icmp6-policy-fail", "icmp6-reject-route", "tcp-reset"]


def served(blob: bytes) -> None:
    """Valid: without the module, loaded with the service's ring (which sends the
    answer, test_reject_served.py), and refused, saying so, without one."""
    with pytest.raises(BpfilterError) as info:
        load_filter_table(blob, attach=False, family=V6)
    assert info.value.errno == errno.EOPNOTSUPP, info.value
    assert "REJECT rules without bpfilter.ko need the service's ring" in str(info.value)
    ring = klog.LogRing.create()
    try:
        load_filter_table(blob, attach=False, family=V6,
                          environment=ring.maps(klog.ANSWER_REFS)).close()
    finally:
        ring.close()


@pytest.mark.parametrize("reject_with", REJECT_WITH)
def test_valid_reject_is_served_without_the_module(fresh_netns, reject_with):
    blob = replace_blob(ruleset("-A INPUT -p udp -j ACCEPT",
                                f"-A INPUT -p tcp -j REJECT --reject-with {reject_with}"),
                        family=V6)
    served(blob)
    assert kernels(blob, fresh_netns) == 0


def test_not_neighbour_passes_checkentry_and_is_served_too(fresh_netns):
    """IP6T_ICMP6_NOT_NEIGHBOUR (2), which ip6tables cannot spell: the kernel takes it
    (and sends nothing for it), so it is valid, and served as the others."""
    blob = crafted("-A INPUT -j REJECT", [("target", 0, u32(NOT_NEIGHBOUR))])
    assert kernels(blob, fresh_netns) == 0
    served(blob)


def test_reject_listed_as_ip6tables_lists_it(fresh_netns):
    lines = [f"-A INPUT -p tcp -j REJECT --reject-with {w}" for w in REJECT_WITH]
    text = ruleset(*lines, "-A INPUT -j REJECT")   # the default: icmp6-port-unreachable
    subprocess.run(["ip", "netns", "exec", fresh_netns, "ip6tables-legacy-restore"], input=text,
                   text=True, check=True)
    raw = codec.parse_replace(replace_blob(text, family=V6), family=V6)
    targets = [e.target for e in raw.entries if e.target.name == "REJECT"]
    ours_ = [ext.describe_target(ext.decode_target("REJECT", 0, t.data, TCP_RULE, V6, "x"), V6)
             for t in targets]
    assert ours_ == listed(fresh_netns) == [f"reject-with {w}" for w in REJECT_WITH] + \
        ["reject-with icmp6-port-unreachable"]


def test_not_neighbour_listed_as_ip6tables_lists_it(fresh_netns):
    """libip6t_REJECT has no name for it and prints its NULL as glibc does."""
    blob = crafted("-A INPUT -j REJECT", [("target", 0, u32(NOT_NEIGHBOUR))])
    assert kernels(blob, fresh_netns) == 0
    assert listed(fresh_netns) == ["reject-with (null)"]
    assert REJECT6_WITH[NOT_NEIGHBOUR] == "(null)"


def revision(kind: str, name: str, rev: int) -> int:
    """What IP6T_SO_GET_REVISION_MATCH / _TARGET answer."""
    optname = (ipv6.IP6T_SO_GET_REVISION_MATCH if kind == "match"
               else ipv6.IP6T_SO_GET_REVISION_TARGET)
    payload = xt_get_revision.build(dict(name=name.encode().ljust(29, b"\0"), revision=rev))
    return get_answer(ipv6.IPV6, optname, len(payload), payload, info=None, entries=None)[0]


def test_get_revision_answers_for_ipv6():
    assert revision("target", "REJECT", 0) == 0
    assert revision("target", "REJECT", 1) == -errno.EPROTONOSUPPORT
    assert revision("match", "addrtype", 1) == 0
    assert revision("match", "addrtype", 0) == -errno.EPROTONOSUPPORT
    for rev in (1, 2, 3):
        assert revision("match", "conntrack", rev) == 0
    assert revision("match", "state", 0) == 0


# ---------------------------------------------------------------- addrtype

# enum xt_addrtype_t
UNSPEC, UNICAST, LOCAL, BROADCAST, ANYCAST, MULTICAST, BLACKHOLE, UNREACHABLE, PROHIBIT, \
    THROW, NAT, XRESOLVE = (1 << n for n in range(12))
# xt_addrtype_info_v1: source (u16), dest (u16), flags (u32)
SOURCE, DEST, FLAGS = 0, 2, 4
LIMIT_IN, LIMIT_OUT = 0x4, 0x8

BAD_ADDRTYPES = [
    # (what, chain, patches, errno, message): addrtype_mt_checkentry_v1() for IPv6
    ("src BLACKHOLE", "INPUT", [("payload", SOURCE, b"\x40\x00")], errno.EINVAL,
     "ipv6 BLACKHOLE matching not supported"),
    ("dst BLACKHOLE with LOCAL", "INPUT", [("payload", DEST, b"\x44\x00")], errno.EINVAL,
     "ipv6 BLACKHOLE"),
    ("src PROHIBIT", "INPUT", [("payload", SOURCE, b"\x00\x01")], errno.EINVAL,
     "ipv6 PROHIBIT (THROW, NAT ..) matching not supported"),
    ("dst THROW", "INPUT", [("payload", DEST, b"\x00\x02")], errno.EINVAL, "ipv6 PROHIBIT"),
    ("dst XRESOLVE", "INPUT", [("payload", DEST, b"\x00\x08")], errno.EINVAL, "ipv6 PROHIBIT"),
    ("a bit past XRESOLVE", "INPUT", [("payload", SOURCE, b"\x00\x80")], errno.EINVAL,
     "ipv6 PROHIBIT"),
    ("src BROADCAST", "INPUT", [("payload", SOURCE, b"\x08\x00")], errno.EINVAL,
     "ipv6 does not support BROADCAST matching"),
    ("dst BROADCAST", "INPUT", [("payload", DEST, b"\x0a\x00")], errno.EINVAL,
     "ipv6 does not support BROADCAST"),
    # what IPv4 refuses too, first
    ("both devices", "FORWARD", [("payload", FLAGS, b"\x0c")], errno.EINVAL,
     "both incoming and outgoing interface limitation cannot be selected"),
    ("the output device at INPUT", "INPUT", [("payload", FLAGS, b"\x08")], errno.EINVAL,
     "output interface limitation not valid in PREROUTING and INPUT"),
    ("the input device at OUTPUT", "OUTPUT", [("payload", FLAGS, b"\x04")], errno.EINVAL,
     "input interface limitation not valid in POSTROUTING and OUTPUT"),
    # only revision 1 is registered for IPv6, per family
    ("revision 0", "INPUT", [("match", SIZEOF_XT_ENTRY_HEADER - 1, b"\x00")], errno.ENOENT,
     "match 'addrtype' has no revision 0 (Linux has 1)"),
    ("revision 2", "INPUT", [("match", SIZEOF_XT_ENTRY_HEADER - 1, b"\x02")], errno.ENOENT,
     "match 'addrtype' has no revision 2 (Linux has 1)"),
]


@pytest.mark.parametrize("what, chain, patches, err, message", BAD_ADDRTYPES,
                         ids=[b[0] for b in BAD_ADDRTYPES])
def test_bad_addrtype_payloads_get_the_kernels_errno(fresh_netns, what, chain, patches, err,
                                                     message):
    blob = crafted(f"-A {chain} -m addrtype --dst-type LOCAL", patches)
    mine = ours(blob)
    assert mine.errno == err, mine
    assert f"chain {chain} rule 1" in str(mine) and message in str(mine), mine
    assert kernels(blob, fresh_netns) == err


VALID_ADDRTYPES = [
    "--src-type UNSPEC", "--dst-type UNICAST,LOCAL", "! --dst-type ANYCAST",
    "--src-type MULTICAST --dst-type UNREACHABLE", "! --src-type LOCAL ! --dst-type LOCAL",
    "--dst-type UNSPEC,UNICAST,LOCAL,ANYCAST,MULTICAST,UNREACHABLE --limit-iface-in",
    "--src-type LOCAL --limit-iface-in",
]


def test_valid_addrtypes_are_refused_as_needing_the_module(fresh_netns):
    blob = replace_blob(ruleset(*(f"-A INPUT -m addrtype {a}" for a in VALID_ADDRTYPES)),
                        family=V6)
    assert kernels(blob, fresh_netns) == 0
    err = ours(blob)
    assert err.errno == errno.EOPNOTSUPP, err
    assert ("chain INPUT rule 1 (entry 0): match 'addrtype' needs bpfilter.ko (kernel module "
            "mode) for the kernel's address type lookup") in str(err), err


def test_addrtype_listed_as_ip6tables_lists_it(fresh_netns):
    rules = [f"-A INPUT -m addrtype {a}" for a in VALID_ADDRTYPES] + \
        ["-A FORWARD -m addrtype --dst-type LOCAL --limit-iface-out"]
    text = ruleset(*rules)
    subprocess.run(["ip", "netns", "exec", fresh_netns, "ip6tables-legacy-restore"], input=text,
                   text=True, check=True)
    raw = codec.parse_replace(replace_blob(text, family=V6), family=V6)
    described = [ext.describe_match(ext.decode_match("addrtype", 1, e.matches[0].data, ANY_RULE, V6,
                                                     "x"), V6)
                 for e in raw.entries if e.matches]
    assert described == listed(fresh_netns) + listed(fresh_netns, "FORWARD")


# ---- match_type6() from the kfunc's answer, every mask and answer, through TEST_RUN

def match_type6(mask: int, v: int) -> bool:
    """xt_addrtype.c's match_type6() for an address whose ipv6_addr_type() and
    match_lookup_rt6() bpfilter_addr_type6() summed up as v (its documented contract)."""
    kind = [(UNSPEC, UNSPEC), (UNICAST, UNICAST), (MULTICAST, MULTICAST)]
    for bit, has in kind:
        if mask & bit and not v & has:
            return False
    if mask & ROUTE6:
        return bool(mask & ROUTE6 & v)
    return True


def _bits(value: int) -> list[int]:
    return [1 << n for n in range(16) if value & (1 << n)]


def _subsets(bits: int) -> list[int]:
    out = [0]
    for bit in _bits(bits):
        out += [s | bit for s in out]
    return out


MASKS = [m for m in _subsets(KIND6 | ROUTE6) if m]   # every mask checkentry lets through
ANSWERS = _subsets(KIND6 | ROUTE6)                    # every answer the kfunc can give


def test_rules_compute_match_type6_as_the_kernel():
    """Addrtype6's branch-free code, for each mask checkentry takes and `!` or not, on
    every answer v: the verdict of addrtype_mt6() for --src-type (inverted by bit 0 of
    the flags) and --dst-type (by `!!` of bit 1). One program per answer writes every
    outcome into an array map, and the mismatch bit must be !(match_type6 ^ invert)."""
    cases = [(addr, mask, invert) for addr in ("src", "dst") for mask in MASKS
             for invert in (False, True)]
    results = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, 4 * len(cases), 1, "t_addrtype6")
    try:
        for v in ANSWERS:
            prog = _outcomes_program(cases, v, results)
            try:
                assert bpf.nf_test_run(prog, bpf.NF_INET_LOCAL_OUT, _IPV6)[0] == 1
            finally:
                os.close(prog)
            got = bpf.map_lookup(results, (0).to_bytes(4, "little"), 4 * len(cases))
            for i, (addr, mask, invert) in enumerate(cases):
                mismatch = int.from_bytes(got[4 * i:4 * i + 4], "little")
                expected = match_type6(mask, v) ^ invert
                assert mismatch == (not expected), (addr, hex(mask), invert, hex(v))
    finally:
        os.close(results)


# 40-byte IPv6 header, no next header, ::1 -> ::1
_IPV6 = bytes.fromhex("6000000000003b40") + bytes(15) + b"\1" + bytes(15) + b"\1"


def _outcomes_program(cases, v: int, results_fd: int) -> int:
    """A netfilter program that sets every addrtype6 answer to v, then for each case
    folds that match's test into a RuleOutcome and stores MISMATCH into the map."""
    results = MapRef("results")
    slots = facts.layout(frozenset(g for g, _ in _GROUPS6.values()))
    asm = Assembler()
    asm.emit(BPF_MOV64_REG(R6, FP), BPF_ALU64_IMM(I.BPF_ADD, R6, -(facts.extent(slots) + 8)))
    for _, slot in _GROUPS6.values():
        asm.emit(BPF_ST_MEM(BPF_W, R6, slot, v))
    # the results' only value
    asm.emit(BPF_ST_MEM(BPF_W, FP, -4, 0), BPF_LD_MAP_FD(R1, results),
             BPF_MOV64_REG(R2, FP), BPF_ALU64_IMM(I.BPF_ADD, R2, -4),
             I.BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem))
    done = asm.label("done")
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, 0, done), BPF_MOV64_REG(R7, R0))
    addrtype6 = ext._MATCHES.find("addrtype", 1, V6, "test")
    for i, (addr, mask, invert) in enumerate(cases):
        src, dst = (mask, 0) if addr == "src" else (0, mask)
        match = Addrtype6Match(src, dst, invert and addr == "src", invert and addr == "dst", 0)
        out = RuleOutcome(asm)
        addrtype6.emit(match, asm, out)
        asm.emit(BPF_STX_MEM(BPF_W, R7, MISMATCH, 4 * i))
    asm.place(done)
    asm.emit(BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    insns = asm.assemble(map_fd={results: results_fd}.__getitem__, slots=slots)
    return bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, insns, "t_addrtype6",
                         expected_attach_type=bpf.BPF_NETFILTER)

