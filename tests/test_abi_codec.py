"""The ipt_replace codec against the kernel's own legacy iptables.

Blobs come from the real iptables-legacy-restore, in scratch network
namespaces: as the kernel reads them back (sockopt.read_replace) and as the
binary itself passed them to setsockopt (captured with strace).  The kernel's
IPT_SO_GET_INFO/GET_ENTRIES replies are the reference for what the service
must answer.
"""
import errno
import itertools
import os
import re
import socket
import struct
import subprocess

import pytest

from bpfilter import netns
from bpfilter.abi import codec, sockopt
from bpfilter.abi import ipv4, ipv6
from bpfilter.abi import xtables as X
from bpfilter.errors import BpfilterError
from bpfilter_lab import namespaces

_serial = itertools.count()


class Scratch:
    """A throwaway netns with the kernel's legacy iptables in it."""

    def __init__(self):
        self.name = f"bpft-{os.getpid()}-{next(_serial)}"
        namespaces.add(self.name)

    def delete(self):
        namespaces.delete(self.name)

    def sh(self, *argv, stdin=None):
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], input=stdin, text=True,
                              capture_output=True, check=True).stdout

    def restore(self, rules: str) -> "dict[str, bytes]":
        """Load rules with iptables-legacy-restore; returns the ipt_replace
        blobs the binary handed to setsockopt, by table name."""
        trace = subprocess.run(
            ["ip", "netns", "exec", self.name, "strace", "-f", "-qq", "-e", "trace=setsockopt",
             "-e", "signal=none", "-s", "4000000", "-xx", "-o", "/dev/stderr",
             "iptables-legacy-restore"],
            input=rules, text=True, capture_output=True)
        assert trace.returncode == 0, trace.stderr[-2000:]
        blobs = {}
        for m in re.finditer(r'IPT_SO_SET_REPLACE, "((?:\\x[0-9a-f]{2})*)"', trace.stderr):
            blob = bytes.fromhex(m.group(1).replace("\\x", ""))
            blobs[X.cstr(blob[:32])] = blob
        return blobs

    def kernel(self, table="filter"):
        """(read_replace blob, GET_INFO reply, GET_ENTRIES entries) from the kernel."""
        with netns.entered(self.name):
            blob = sockopt.read_replace(table)
            info = sockopt.get_info(table)
            entries = codec.parse_get_entries(sockopt.get_entries(table, codec.parse_getinfo(info)["size"]))
        return blob, info, entries["entries"]


@pytest.fixture
def scratch():
    made = []

    def make():
        ns = Scratch()
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()


def counters_of(entries: bytes) -> "list[tuple[int, int]]":
    out, off = [], 0
    while off < len(entries):
        out.append(struct.unpack_from("<QQ", entries, off + 96))
        off += struct.unpack_from("<H", entries, off + 90)[0]
    return out


MANY = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n" + "".join(
    f"-A {('INPUT', 'FORWARD', 'OUTPUT')[i % 3]} -s 10.{i // 250}.{i % 250}.0/24 -p tcp --dport {1000 + i} -j "
    f"{('ACCEPT', 'DROP', 'RETURN')[i % 3]}\n"
    for i in range(600)
) + "COMMIT\n"

RULESETS = {
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


@pytest.mark.parametrize("ruleset", sorted(RULESETS))
def test_round_trips_against_kernel(scratch, ruleset):
    rules = RULESETS[ruleset]
    ns = scratch()
    sent = ns.restore(rules)
    assert sorted(sent) == sorted(tables_of(rules))
    for table in tables_of(rules):
        # (a) byte-exact rebuild of what iptables passed and of what the kernel holds
        for blob in (sent[table], ns.kernel(table)[0]):
            parsed = codec.parse_replace(blob)
            assert codec.build_replace(parsed) == blob
        kblob, kinfo, kentries = ns.kernel(table)
        # (b) what GET_ENTRIES / GET_INFO answer, from either blob
        for blob in (sent[table], kblob):
            parsed = codec.parse_replace(blob)
            assert codec.entries_as_kernel_returns(parsed, counters_of(kentries)) == kentries
            assert codec.getinfo_bytes(parsed) == kinfo
        parsed = codec.parse_replace(kblob)
        assert [e.hook_mask for e in parsed.entries] == [struct.unpack_from("<I", kentries, e.offset + 92)[0]
                                                         for e in parsed.entries]


def test_fresh_netns_table(scratch):
    """The kernel's initial table (never given to iptables) parses and answers alike."""
    ns = scratch()
    kblob, kinfo, kentries = ns.kernel("filter")
    parsed = codec.parse_replace(kblob)
    assert [e.target.verdict for e in parsed.entries[:3]] == [-X.NF_ACCEPT - 1] * 3
    assert parsed.entries[-1].target.errorname == "ERROR"
    assert codec.entries_as_kernel_returns(parsed, counters_of(kentries)) == kentries
    assert codec.getinfo_bytes(parsed) == kinfo


def test_counters_are_filled_in(scratch):
    ns = scratch()
    ns.restore(RULESETS["chains"])
    with netns.entered(ns.name):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(3):
                # OUTPUT -o lo -j c drops it: counted all the same.
                with pytest.raises(PermissionError):
                    s.sendto(b"x" * 10, ("127.0.0.1", 9))
    kblob, _, kentries = ns.kernel()
    counters = counters_of(kentries)
    assert any(p for p, _ in counters)
    assert codec.entries_as_kernel_returns(codec.parse_replace(kblob), counters) == kentries


def test_kernel_private_payload_is_zeroed(scratch):
    """GET_ENTRIES hides what follows an extension's usersize (limit: from
    `prev` on), whatever the replace carried there."""
    ns = scratch()
    ns.restore("*filter\n-A INPUT -m limit --limit 3/s -j ACCEPT\nCOMMIT\n")
    kblob, _, _ = ns.kernel()
    parsed = codec.parse_replace(kblob)
    rule = parsed.entries[0]
    (limit,) = rule.matches
    assert (limit.name, X.USERSIZE[("match", "limit", 0)]) == ("limit", 8)
    limit.data = limit.data[:8] + b"\xaa" * 16 + struct.pack("<II", 5, 7) + limit.data[32:]
    blob = codec.build_replace(parsed)
    with netns.entered(ns.name):
        sockopt.set_replace(blob)
    _, _, kentries = ns.kernel()
    assert kentries != blob[96:]
    assert codec.entries_as_kernel_returns(codec.parse_replace(blob), counters_of(kentries)) == kentries


def test_names_and_counters_the_kernel_ignores(scratch):
    """Junk after the table name's forced NUL, comefrom and counters in the
    entries: the kernel accepts them, and so does the codec."""
    ns = scratch()
    ns.restore(RULESETS["chains"])
    kblob, _, _ = ns.kernel()
    blob = bytearray(kblob)
    blob[31] = ord("X")
    parsed = codec.parse_replace(bytes(blob))
    assert parsed.name == "filter"
    for e in parsed.entries:
        struct.pack_into("<IQQ", blob, 96 + e.offset + 92, 0xDEAD, 1 << 40, 77)
    parsed = codec.parse_replace(bytes(blob))
    assert (parsed.entries[0].comefrom, parsed.entries[0].pcnt) == (0xDEAD, 1 << 40)
    with netns.entered(ns.name):
        sockopt.set_replace(bytes(blob))
    _, _, kentries = ns.kernel()
    assert codec.entries_as_kernel_returns(parsed, [(0, 0)] * parsed.num_entries) == kentries


def test_add_counters(scratch):
    ns = scratch()
    ns.restore(RULESETS["chains"])
    kblob, _, _ = ns.kernel()
    n = codec.parse_replace(kblob).num_entries
    wanted = [(i, 1000 + i) for i in range(n)]
    blob = codec.build_counters_info("filter", wanted)
    assert codec.parse_counters_info(blob) == ("filter", wanted)
    with netns.entered(ns.name):
        sockopt.add_counters(blob)
        with pytest.raises(BpfilterError) as e:
            sockopt.add_counters(codec.build_counters_info("filter", wanted[:-1]))
    assert e.value.errno == errno.EINVAL
    assert counters_of(ns.kernel()[2]) == wanted
    with pytest.raises(BpfilterError) as e:
        codec.parse_counters_info(blob[:-1])
    assert e.value.errno == errno.EINVAL


def test_get_revision(scratch):
    ns = scratch()
    with netns.entered(ns.name):
        sockopt.get_revision("match", "tcp", 0)
        sockopt.get_revision("match", "conntrack", 3)
        sockopt.get_revision("target", "REJECT", 0)
        for kind, name, rev, err in (("match", "tcp", 7, errno.EPROTONOSUPPORT),
                                     ("target", "NOSUCHTHING", 0, errno.ENOENT)):
            with pytest.raises(BpfilterError) as e:
                sockopt.get_revision(kind, name, rev)
            assert e.value.errno == err


def test_parse_get_entries_and_getinfo_lengths():
    with pytest.raises(BpfilterError) as e:
        codec.parse_getinfo(bytes(83))
    assert e.value.errno == errno.EINVAL
    req = codec.get_entries_request("filter", 16)
    assert codec.parse_get_entries(req) == dict(name="filter", size=16, entries=bytes(16))
    with pytest.raises(BpfilterError) as e:
        codec.parse_get_entries(req + b"\0")
    assert e.value.errno == errno.EINVAL
