"""The ipt_replace / ip6t_replace codec against the kernel's own legacy iptables
and ip6tables.

Blobs come from the real iptables-legacy-restore and ip6tables-legacy-restore, in
scratch network namespaces: as the kernel reads them back (sockopt.read_replace)
and as the binary itself passed them to setsockopt (captured with strace).  The
kernel's IPT_SO_GET_INFO/GET_ENTRIES replies (IP6T_SO_* for IPv6, the same
numbers) are the reference for what the service must answer. Each test runs for
both families, but those about what one family alone has (ip6t_entry's padding).
"""
import errno
import itertools
import os
import re
import socket
import struct
import subprocess

import pytest
from families import FAMILIES, FAMILY_IDS, tool

from bpfilter import netns
from bpfilter.abi import codec, families, sockopt
from bpfilter.abi import ipv4, ipv6
from bpfilter.abi import xtables as X
from bpfilter.errors import BpfilterError
from bpfilter_lab import namespaces
from bpfilter.model import Family

_serial = itertools.count()


class Scratch:
    """A throwaway netns with the kernel's legacy iptables and ip6tables in it; its
    methods act on one family's tables."""

    def __init__(self, family: Family = Family.IPV4):
        self.family, self.layout = family, families.of(family)
        self.name = f"bpft-{os.getpid()}-{next(_serial)}"
        namespaces.add(self.name)

    def delete(self):
        namespaces.delete(self.name)

    def sh(self, *argv, stdin=None):
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], input=stdin, text=True,
                              capture_output=True, check=True).stdout

    def restore(self, rules: str) -> "dict[str, bytes]":
        """Load rules with the family's legacy restore; returns the replace blobs
        the binary handed to setsockopt, by table name."""
        trace = subprocess.run(
            ["ip", "netns", "exec", self.name, "strace", "-f", "-qq", "-e", "trace=setsockopt",
             "-e", "signal=none", "-s", "4000000", "-xx", "-o", "/dev/stderr",
             tool(self.family, "-restore")],
            input=rules, text=True, capture_output=True)
        assert trace.returncode == 0, trace.stderr[-2000:]
        blobs = {}
        for m in re.finditer(r'IP6?T_SO_SET_REPLACE, "((?:\\x[0-9a-f]{2})*)"', trace.stderr):
            blob = bytes.fromhex(m.group(1).replace("\\x", ""))
            blobs[X.cstr(blob[:32])] = blob
        assert blobs, "strace saw no SET_REPLACE"
        return blobs

    def kernel(self, table="filter"):
        """(read_replace blob, GET_INFO reply, GET_ENTRIES entries) from the kernel."""
        with netns.entered(self.name):
            blob = sockopt.read_replace(table, self.family)
            info = sockopt.get_info(table, self.family)
            size = codec.parse_getinfo(info)["size"]
            entries = codec.parse_get_entries(sockopt.get_entries(table, size, self.family))
        return blob, info, entries["entries"]

    def set_replace(self, blob: bytes, optlen=None) -> None:
        with netns.entered(self.name):
            sockopt.set_replace(blob, optlen, self.family)

    def parse(self, blob: bytes, **kw) -> X.RawTable:
        return codec.parse_replace(blob, family=self.family, **kw)


@pytest.fixture
def scratch():
    """make(family): a Scratch, deleted at the end of the test."""
    made = []

    def make(family: Family = Family.IPV4):
        ns = Scratch(family)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()


def counters_of(entries: bytes, family: Family = Family.IPV4) -> "list[tuple[int, int]]":
    """Each entry's (pcnt, bcnt), read where the family's entry keeps them."""
    layout = families.of(family)
    out, off = [], 0
    while off < len(entries):
        out.append(X.XT_COUNTERS.unpack_from(entries, off + layout.counters_at))
        off += layout.next_offset_field.unpack_from(entries, off + layout.next_offset_at)[0]
    return out


MANY = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n" + "".join(
    f"-A {('INPUT', 'FORWARD', 'OUTPUT')[i % 3]} -s 10.{i // 250}.{i % 250}.0/24 -p tcp --dport {1000 + i} -j "
    f"{('ACCEPT', 'DROP', 'RETURN')[i % 3]}\n"
    for i in range(600)
) + "COMMIT\n"
MANY6 = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n" + "".join(
    f"-A {('INPUT', 'FORWARD', 'OUTPUT')[i % 3]} -s 2001:db8:{i:x}::/{48 + i % 80} -p tcp --dport "
    f"{1000 + i} -j {('ACCEPT', 'DROP', 'RETURN')[i % 3]}\n"
    for i in range(600)
) + "COMMIT\n"

RULESETS4 = {
    "empty": "*filter\nCOMMIT\n",
    "chains": """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:a - [0:0]
:b - [0:0]
:c - [0:0]
-A INPUT -i lo -j a
-A INPUT -j b
-A a -p udp -g c
-A a -s 127.0.0.1 -j RETURN
-A a -j b
-A b -p icmp -j ACCEPT
-A c -j DROP
-A FORWARD -j a
-A OUTPUT -o lo -j c
COMMIT
""",
    "protocols": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --sport 1:1023 --dport 22 --tcp-flags SYN,ACK SYN -j ACCEPT
-A INPUT -p tcp --tcp-option 2 -j DROP
-A INPUT -p udp --sport 53 --dport 1024:65535 -j ACCEPT
-A INPUT -p icmp --icmp-type echo-request -j ACCEPT
-A INPUT -p icmp --icmp-type 3/4 -j DROP
-A INPUT -p icmp -j ACCEPT
-A OUTPUT -p 47 -j ACCEPT
COMMIT
""",
    "negations": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT ! -s 10.0.0.0/8 ! -d 192.168.1.1 ! -i eth0 ! -p tcp -j DROP
-A INPUT -p tcp ! --sport 80 ! --dport 443 ! --syn -j DROP
-A INPUT -p udp ! --sport 53 ! --dport 1000:2000 -j DROP
-A INPUT -p icmp ! --icmp-type echo-reply -j DROP
-A FORWARD ! -o ppp+ ! -f -j DROP
-A FORWARD -f -j ACCEPT
COMMIT
""",
    "interfaces": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i eth+ -j ACCEPT
-A INPUT -i + -j ACCEPT
-A INPUT -i abcdefghijklmno -j ACCEPT
-A FORWARD -i veth+ -o br-1234567890+ -j ACCEPT
-A OUTPUT -o lo -j ACCEPT
COMMIT
""",
    "many": MANY,
    "extensions": """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:logdrop - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p udp -m multiport --dports 53,123,5000:5010 -m comment --comment "dns and ntp" -j ACCEPT
-A INPUT -p tcp -m multiport ! --sports 1:1023 -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -m state --state INVALID -j logdrop
-A INPUT -p icmp --icmp-type echo-request -m limit --limit 5/s --limit-burst 7 -j LOG --log-prefix "ping " --log-level 6
-A INPUT -p tcp -m tcp --dport 25 -j REJECT --reject-with tcp-reset
-A INPUT -m mark --mark 0x10/0xff -m length --length 100:200 -j ACCEPT
-A INPUT -m iprange --src-range 10.0.0.1-10.0.0.9 -m ttl --ttl-gt 3 -j ACCEPT
-A FORWARD -j REJECT --reject-with icmp-host-prohibited
-A logdrop -m limit --limit 1/min -j LOG
-A logdrop -j DROP
COMMIT
""",
    "nat_mangle_raw": """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.0.0.2:8080
-A POSTROUTING -o eth0 -j MASQUERADE
-A POSTROUTING -s 10.1.0.0/16 -j SNAT --to-source 1.2.3.4
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-mark 7
-A POSTROUTING -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp --dport 53 -j CT --notrack
COMMIT
""",
}
RULESETS6 = {
    "empty": "*filter\nCOMMIT\n",
    "chains": """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:a - [0:0]
:b - [0:0]
:c - [0:0]
-A INPUT -i lo -j a
-A INPUT -j b
-A a -p udp -g c
-A a -s ::1 -j RETURN
-A a -j b
-A b -p ipv6-icmp -j ACCEPT
-A c -j DROP
-A FORWARD -j a
-A OUTPUT -o lo -j c
COMMIT
""",
    "protocols": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --sport 1:1023 --dport 22 --tcp-flags SYN,ACK SYN -j ACCEPT
-A INPUT -p tcp --tcp-option 2 -j DROP
-A INPUT -p udp --sport 53 --dport 1024:65535 -j ACCEPT
-A INPUT -p ipv6-icmp --icmpv6-type echo-request -j ACCEPT
-A INPUT -p icmpv6 --icmpv6-type 1/4 -j DROP
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -p all -j ACCEPT
-A OUTPUT -p 47 -j ACCEPT
-A OUTPUT -p ipv6-frag -j DROP
COMMIT
""",
    "negations": """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT ! -s 2001:db8::/32 ! -d fe80::1 ! -i eth0 ! -p tcp -j DROP
-A INPUT -p tcp ! --sport 80 ! --dport 443 ! --syn -j DROP
-A INPUT -p udp ! --sport 53 ! --dport 1000:2000 -j DROP
-A INPUT -p ipv6-icmp ! --icmpv6-type echo-reply -j DROP
-A FORWARD ! -o ppp+ -j DROP
-A FORWARD -s 2001:db8::/ffff:ffff:0:ffff:: -j ACCEPT
COMMIT
""",
    "interfaces": RULESETS4["interfaces"],
    "many": MANY6,
    # Extensions of the codec's only interest: their bytes, usersize (hashlimit).
    "extensions": """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:logdrop - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p udp -m multiport --dports 53,123,5000:5010 -m comment --comment "dns and ntp" -j ACCEPT
-A INPUT -p tcp -m multiport ! --sports 1:1023 -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -m state --state INVALID -j logdrop
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type echo-request -m limit --limit 5/s --limit-burst 7 -j LOG --log-prefix "ping " --log-level 6
-A INPUT -p tcp -m tcp --dport 25 -j REJECT --reject-with tcp-reset
-A INPUT -m mark --mark 0x10/0xff -m length --length 100:200 -j ACCEPT
-A INPUT -m iprange --src-range 2001:db8::1-2001:db8::9 -m hl --hl-gt 3 -j ACCEPT
-A INPUT -m frag --fragid 5:10 --fraglast -j DROP
-A INPUT -m rt --rt-type 0 --rt-segsleft 2 -m hbh --hbh-len 8 -m dst --dst-opts 1:2 -j DROP
-A INPUT -m ah --ahspi 500 -m ipv6header --header frag,auth --soft -j DROP
-A INPUT -p mh -m mh --mh-type binding-update -m eui64 -j ACCEPT
-A INPUT -m hashlimit --hashlimit-upto 10/sec --hashlimit-name h6 -j ACCEPT
-A INPUT -p tcp -m tcp --tcp-flags SYN,ACK SYN -m tcpmss --mss 1000:1500 -j ACCEPT
-A FORWARD -j REJECT --reject-with icmp6-adm-prohibited
-A logdrop -m limit --limit 1/min -j LOG
-A logdrop -j DROP
COMMIT
""",
    "nat_mangle_raw": """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination [2001:db8::2]:8080
-A POSTROUTING -o eth0 -j MASQUERADE
-A POSTROUTING -s 2001:db8:1::/48 -j SNAT --to-source 2001:db8::1
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --set-mark 7
-A PREROUTING -j HL --hl-dec 1
-A POSTROUTING -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp --dport 53 -j CT --notrack
COMMIT
*security
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j CONNSECMARK --save
COMMIT
""",
}
RULESETS = {Family.IPV4: RULESETS4, Family.IPV6: RULESETS6}
RULESET_CASES = [(family, name) for family in FAMILIES for name in sorted(RULESETS[family])]
RULESET_IDS = [f"{fid}-{name}" for fid, family in zip(FAMILY_IDS, FAMILIES)
               for name in sorted(RULESETS[family])]

def tables_of(rules: str) -> "list[str]":
    return re.findall(r"^\*(\w+)", rules, re.M)


def test_layouts_match_x86_64_abi():
    assert ipv4.ipt_ip.sizeof() == ipv4.SIZEOF_IPT_IP == 84
    assert ipv4.ipt_entry.sizeof() == ipv4.SIZEOF_IPT_ENTRY == 112
    assert ipv6.ip6t_ip6.sizeof() == ipv6.SIZEOF_IP6T_IP6 == 136
    assert ipv6.ip6t_entry.sizeof() == ipv6.SIZEOF_IP6T_ENTRY == 168
    assert X.xt_entry_match.sizeof() == X.xt_entry_target.sizeof() == X.SIZEOF_XT_ENTRY_HEADER == 32
    assert X.xt_standard_target.sizeof() == X.SIZEOF_XT_STANDARD_TARGET == 40
    assert X.xt_error_target.sizeof() == X.SIZEOF_XT_ERROR_TARGET == 64
    assert X.ipt_replace.sizeof() == X.SIZEOF_IPT_REPLACE == 96
    assert X.ipt_getinfo.sizeof() == X.SIZEOF_IPT_GETINFO == 84
    assert X.ipt_get_entries.sizeof() == X.SIZEOF_IPT_GET_ENTRIES == 40
    assert X.xt_counters_info.sizeof() == X.SIZEOF_XT_COUNTERS_INFO == 40
    assert X.xt_get_revision.sizeof() == 30
    blob = X.ipt_replace.build(dict(name=bytes(32), valid_hooks=0, num_entries=0, size=0, hook_entry=[0] * 5,
                                    underflow=[0] * 5, num_counters=0, counters=0x1122334455667788))
    assert blob[88:96] == bytes.fromhex("8877665544332211")


@pytest.mark.parametrize("family,ruleset", RULESET_CASES, ids=RULESET_IDS)
def test_round_trips_against_kernel(scratch, family, ruleset):
    rules = RULESETS[family][ruleset]
    ns = scratch(family)
    sent = ns.restore(rules)
    assert sorted(sent) == sorted(tables_of(rules))
    for table in tables_of(rules):
        kblob, kinfo, kentries = ns.kernel(table)
        # (a) byte-exact rebuild of what the binary passed and of what the kernel holds
        for blob in (sent[table], kblob):
            parsed = ns.parse(blob)
            assert codec.build_replace(parsed) == blob
        # (b) what GET_ENTRIES / GET_INFO answer, from either blob
        for blob in (sent[table], kblob):
            parsed = ns.parse(blob)
            assert codec.entries_as_kernel_returns(parsed, counters_of(kentries, family)) == kentries
            assert codec.getinfo_bytes(parsed) == kinfo
        # (c) comefrom: the hooks mark_source_chains found each entry reachable from
        parsed = ns.parse(kblob)
        comefrom = ns.layout.comefrom_field
        assert [e.hook_mask for e in parsed.entries] == \
            [comefrom.unpack_from(kentries, e.offset + ns.layout.comefrom_at)[0] for e in parsed.entries]


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_fresh_netns_table(scratch, family):
    """The kernel's initial table (never given to iptables) parses and answers alike,
    and is the one codec.initial_replace builds."""
    ns = scratch(family)
    kblob, kinfo, kentries = ns.kernel("filter")
    parsed = ns.parse(kblob)
    assert [e.target.verdict for e in parsed.entries[:3]] == [-X.NF_ACCEPT - 1] * 3
    assert parsed.entries[-1].target.errorname == "ERROR"
    assert codec.entries_as_kernel_returns(parsed, counters_of(kentries, family)) == kentries
    assert codec.getinfo_bytes(parsed) == kinfo
    # what the service creates on first use answers the same
    initial = ns.parse(codec.initial_replace("filter", family))
    assert codec.entries_as_kernel_returns(initial, counters_of(kentries, family)) == kentries
    assert codec.getinfo_bytes(initial) == kinfo


def _send_dropped(ns: Scratch, n: int) -> None:
    """n datagrams to port 9 on loopback, which CHAINS' OUTPUT -o lo -j c drops:
    counted all the same."""
    ns.sh("ip", "link", "set", "lo", "up")
    af, to = ((socket.AF_INET, ("127.0.0.1", 9)) if ns.family == Family.IPV4
              else (socket.AF_INET6, ("::1", 9)))
    with netns.entered(ns.name):
        with socket.socket(af, socket.SOCK_DGRAM) as s:
            for _ in range(n):
                with pytest.raises(PermissionError):
                    s.sendto(b"x" * 10, to)


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_counters_are_filled_in(scratch, family):
    ns = scratch(family)
    ns.restore(RULESETS[family]["chains"])
    _send_dropped(ns, 3)
    kblob, _, kentries = ns.kernel()
    counters = counters_of(kentries, family)
    assert any(p for p, _ in counters)
    parsed = ns.parse(kblob)
    assert codec.entries_as_kernel_returns(parsed, counters) == kentries
    packed = b"".join(X.xt_counters_packed.pack(*c) for c in counters)
    assert codec.with_counters(parsed, codec.kernel_entries(parsed), packed) == kentries


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_kernel_private_payload_is_zeroed(scratch, family):
    """GET_ENTRIES hides what follows an extension's usersize (limit: from
    `prev` on), whatever the replace carried there."""
    ns = scratch(family)
    ns.restore("*filter\n-A INPUT -m limit --limit 3/s -j ACCEPT\nCOMMIT\n")
    kblob, _, _ = ns.kernel()
    parsed = ns.parse(kblob)
    rule = parsed.entries[0]
    (limit,) = rule.matches
    assert (limit.name, X.USERSIZE[("match", "limit", 0)]) == ("limit", 8)
    limit.data = limit.data[:8] + b"\xaa" * 16 + struct.pack("<II", 5, 7) + limit.data[32:]
    blob = codec.build_replace(parsed)
    ns.set_replace(blob)
    _, _, kentries = ns.kernel()
    assert kentries != blob[96:]
    assert codec.entries_as_kernel_returns(ns.parse(blob), counters_of(kentries, family)) == kentries


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_names_and_counters_the_kernel_ignores(scratch, family):
    """Junk after the table name's forced NUL, comefrom and counters in the
    entries: the kernel accepts them, and so does the codec."""
    ns = scratch(family)
    ns.restore(RULESETS[family]["chains"])
    kblob, _, _ = ns.kernel()
    blob = bytearray(kblob)
    blob[31] = ord("X")
    parsed = ns.parse(bytes(blob))
    assert parsed.name == "filter"
    L = ns.layout
    for e in parsed.entries:
        L.comefrom_field.pack_into(blob, 96 + e.offset + L.comefrom_at, 0xDEAD)
        X.XT_COUNTERS.pack_into(blob, 96 + e.offset + L.counters_at, 1 << 40, 77)
    parsed = ns.parse(bytes(blob))
    assert (parsed.entries[0].comefrom, parsed.entries[0].pcnt) == (0xDEAD, 1 << 40)
    ns.set_replace(bytes(blob))
    _, _, kentries = ns.kernel()
    assert codec.entries_as_kernel_returns(parsed, [(0, 0)] * parsed.num_entries) == kentries


# ip6t_ip6 ends in 3 bytes of padding (after invflags), ip6t_entry has 4 between
# comefrom and its counters: x86_64 alignment, nothing reads them, and the kernel
# keeps and returns whatever the caller wrote there.
IP6_PAD_AT = ipv6.ip6t_ip6.sizeof() - 3
ENTRY6_PAD_AT = ipv6.IPV6.comefrom_at + 4


def _padded(blob: bytes, entries, ip_pad: bytes, entry_pad: bytes) -> bytes:
    out = bytearray(blob)
    for e in entries:
        at = X.SIZEOF_IPT_REPLACE + e.offset
        out[at + IP6_PAD_AT: at + IP6_PAD_AT + 3] = ip_pad
        out[at + ENTRY6_PAD_AT: at + ENTRY6_PAD_AT + 4] = entry_pad
    return bytes(out)


def test_ipv6_padding_is_the_callers(scratch):
    """Junk in both paddings of every rule that has a condition (an unconditional
    entry with junk in ip6t_ip6's padding would no longer be one: see
    test_abi_validation): the kernel takes it, GET_ENTRIES returns it, and so does
    codec.kernel_entries, also when a replace changes nothing else (the service
    takes unchanged entries over from the table in place)."""
    ns = scratch(Family.IPV6)
    ns.restore(RULESETS6["extensions"])
    kblob, kinfo, _ = ns.kernel()
    table = ns.parse(kblob)
    rules = [e for e in table.entries if not codec.unconditional(e, ipv6.IPV6)]
    assert len(rules) > 10
    # the second replace changes the entries' padding alone
    first, second = (_padded(kblob, rules, b"\xa1\xa2\xa3", b"\xb1\xb2\xb3\xb4"),
                     _padded(kblob, rules, b"\xa1\xa2\xa3", b"\xd1\xd2\xd3\xd4"))
    ns.set_replace(first)
    _, info1, entries1 = ns.kernel()
    parsed1 = ns.parse(first)
    assert codec.kernel_entries(parsed1) == entries1 and codec.getinfo_bytes(parsed1) == info1 == kinfo
    assert entries1.count(b"\xa1\xa2\xa3") == entries1.count(b"\xb1\xb2\xb3\xb4") == len(rules)
    ns.set_replace(second)
    _, _, entries2 = ns.kernel()
    parsed2 = ns.parse(second, previous=parsed1)
    assert codec.kernel_entries(parsed2) == entries2
    assert entries2.count(b"\xd1\xd2\xd3\xd4") == len(rules)
    assert codec.kernel_entries(parsed2, previous=(parsed1, entries1)) == entries2
    # Junk in the entry's padding leaves a policy unconditional (ip6t_ip6's does not).
    policies = [e for e in table.entries if e.offset in table.underflow]
    third = _padded(kblob, policies, b"\0\0\0", b"\xee" * 4)
    ns.set_replace(third)
    assert codec.kernel_entries(ns.parse(third)) == ns.kernel()[2]


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_add_counters(scratch, family):
    ns = scratch(family)
    ns.restore(RULESETS[family]["chains"])
    kblob, _, _ = ns.kernel()
    n = ns.parse(kblob).num_entries
    wanted = [(i, 1000 + i) for i in range(n)]
    blob = codec.build_counters_info("filter", wanted)
    assert codec.parse_counters_info(blob) == ("filter", wanted)
    with netns.entered(ns.name):
        sockopt.add_counters(blob, family)
        with pytest.raises(BpfilterError) as e:
            sockopt.add_counters(codec.build_counters_info("filter", wanted[:-1]), family)
    assert e.value.errno == errno.EINVAL
    assert counters_of(ns.kernel()[2], family) == wanted
    with pytest.raises(BpfilterError) as e:
        codec.parse_counters_info(blob[:-1])
    assert e.value.errno == errno.EINVAL


# (kind, name, revision, the kernel's errno or None) per family: what exists in one
# family only is unknown to the other.
REVISIONS = {
    Family.IPV4: [("match", "tcp", 0, None), ("match", "conntrack", 3, None),
                  ("target", "REJECT", 0, None), ("match", "icmp", 0, None),
                  ("match", "ttl", 0, None), ("match", "tcp", 7, errno.EPROTONOSUPPORT),
                  ("target", "NOSUCHTHING", 0, errno.ENOENT), ("match", "icmp6", 0, errno.ENOENT),
                  ("match", "hl", 0, errno.ENOENT), ("match", "frag", 0, errno.ENOENT)],
    Family.IPV6: [("match", "tcp", 0, None), ("match", "conntrack", 3, None),
                  ("target", "REJECT", 0, None), ("match", "icmp6", 0, None),
                  ("match", "hl", 0, None), ("match", "frag", 0, None),
                  ("match", "tcp", 7, errno.EPROTONOSUPPORT),
                  ("target", "NOSUCHTHING", 0, errno.ENOENT), ("match", "icmp", 0, errno.ENOENT),
                  ("match", "ttl", 0, errno.ENOENT), ("target", "TTL", 0, errno.ENOENT)],
}


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_get_revision(scratch, family):
    ns = scratch(family)
    with netns.entered(ns.name):
        for kind, name, rev, err in REVISIONS[family]:
            if err is None:
                sockopt.get_revision(kind, name, rev, family)
                continue
            with pytest.raises(BpfilterError) as e:
                sockopt.get_revision(kind, name, rev, family)
            assert e.value.errno == err, (kind, name, rev)


def test_parse_get_entries_and_getinfo_lengths():
    with pytest.raises(BpfilterError) as e:
        codec.parse_getinfo(bytes(83))
    assert e.value.errno == errno.EINVAL
    req = codec.get_entries_request("filter", 16)
    assert codec.parse_get_entries(req) == dict(name="filter", size=16, entries=bytes(16))
    with pytest.raises(BpfilterError) as e:
        codec.parse_get_entries(req + b"\0")
    assert e.value.errno == errno.EINVAL
