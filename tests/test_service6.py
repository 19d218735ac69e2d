"""The service for IPv6, end to end: the unmodified Debian ip6tables-legacy binaries
through `bpfilter exec`, side by side with the kernel's own ip6_tables, with the
private services, namespaces and helpers of test_service.py.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time

import pytest
import test_service
from families import tool
from test_service import (LIST_AND_REFUSE, LOCAL_RULES, PY, USER_CHAINS, _strip_save,
                          assert_filters, commands_behave_as_with_the_kernel, inum_of, kernel_tables, local_traffic,
                          malformed_replaces_answer_as_the_kernel, side_by_side)

from bpfilter import netns
from bpfilter.ext import linux
from bpfilter.model import Family

pytestmark = pytest.mark.kernel
# test_service.py's fixtures: a private service, scratch namespaces
svc, nets = test_service.svc, test_service.nets

V4, V6 = Family.IPV4, Family.IPV6
IP6TABLES, IP6TABLES_SAVE, IP6TABLES_RESTORE = tool(V6), tool(V6, "-save"), tool(V6, "-restore")
FRESH = ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"]
# LOCAL_RULES and USER_CHAINS name ports and chains only: they read the same to
# ip6tables-restore, and test_service.py's loopback helpers send IPv6 as well.
DATAGRAM6 = 40 + 8 + 10


# ---------------------------------------------------------------- 1. commands

# (command, whether the kernel refuses it): every kind of ip6tables command, with
# what bpfilter implements for IPv6, then what ip6tables or ip6_tables refuse.
COMMANDS = [
    ("-N web", False),
    ("-N ssh", False),
    ("-A INPUT -i lo -j ACCEPT", False),
    ("-A INPUT -p tcp --dport 22 -j ssh", False),
    ("-A INPUT -p tcp -m tcp --dport 80 -j web", False),
    ("-I INPUT -s fd00::/8 -j DROP", False),
    ("-I INPUT 3 -p udp --dport 53 -c 3 300 -j ACCEPT", False),
    ("-A web -s 2001:db8:1::/48 -c 7 700 -j ACCEPT", False),
    ("-A web -j DROP", False),
    ("-A ssh -s 2001:db8::1 -j ACCEPT", False),
    ("-A ssh -j RETURN", False),
    ("-A OUTPUT -o lo -p ipv6-icmp --icmpv6-type echo-request -j ACCEPT", False),
    ("-A FORWARD -i vin0 -o vout+ -p tcp ! --syn -g web", False),
    ("-A INPUT -p icmpv6 -m icmp6 ! --icmpv6-type 1/4 -j DROP", False),
    ("-A INPUT -p ipv6-icmp --icmpv6-type neighbour-solicitation -m hl --hl-eq 255 -j ACCEPT",
     False),
    ("-A INPUT -m hl ! --hl-eq 5 -m comment --comment hops", False),
    ("-A OUTPUT -m owner --uid-owner 1000-2000 ! --gid-owner 5 --socket-exists -j DROP", False),
    ('-A INPUT -p tcp -m multiport --dports 22,80:90 -m comment --comment "web and ssh" '
     "-j ACCEPT", False),
    ("-I OUTPUT -p udp -m multiport ! --sports 53,123 -c 4 4000", False),
    ("-A FORWARD -p sctp -m multiport --ports 9", False),
    ("-A FORWARD ! -s 2001:db8::/ffff:ffff:0:ffff:: ! -d ::1 ! -i eth0 ! -o ppp+ ! -p udp "
     "-j DROP", False),
    ("-A FORWARD -p all -j ACCEPT", False),
    ("-A FORWARD -p ipv6-nonxt -s ::/0 -d fe80::/10", False),
    ('-C INPUT -p tcp -m multiport --dports 22,80:90 -m comment --comment "web and ssh" '
     "-j ACCEPT", False),
    ('-C INPUT -p tcp -m multiport --dports 22,80:91 -m comment --comment "web and ssh" '
     "-j ACCEPT", True),
    ("-D FORWARD -p all -j ACCEPT", False),
    ("-C INPUT -p udp --dport 53 -j ACCEPT", False),
    ("-C INPUT -s 2001:db8::9 -j DROP", True),
    ("-R INPUT 1 -s fc00::/7 -c 11 1100 -j DROP", False),
    ("-D INPUT -p udp --dport 53 -j ACCEPT", False),
    ("-D INPUT 1", False),
    ("-P FORWARD DROP", False),
    ("-P OUTPUT DROP", False),
    ("-P OUTPUT ACCEPT", False),
    ("-A INPUT -m mark --mark 0x10/0xff -j web", False),
    ("-A OUTPUT -m mark ! --mark 0xffffffff -c 5 500", False),
    ("-A INPUT -m mac --mac-source 02:BF:00:00:01:02 -p udp -j ACCEPT", False),
    ("-A web -m mac ! --mac-source 42:01:0a:03:04:05", False),
    ("-A INPUT -p tcp --tcp-option 2 --syn -j ACCEPT", False),
    ("-A OUTPUT -p tcp --dport 22 ! --tcp-option 8 -j DROP", False),
    ("-A INPUT -p ipv6-icmp -m limit --limit 5/sec --limit-burst 10 -j ACCEPT", False),
    ("-A web -m limit --limit 7/min --limit-burst 1 -m limit --limit 3/hour", False),
    ("-E web www", False),
    ("-D INPUT -s 2001:db8::9 -j DROP", True),
    *LIST_AND_REFUSE,
    ("-A INPUT -s 10.0.0.1 -j DROP", True),                  # ip6tables: not an IPv6 address
    ("-A INPUT -m owner --uid-owner 0 -j DROP", True),       # checkentry: owner is OUTPUT's
    ("-A OUTPUT -p udp -m tcp --dport 1 -j DROP", True),     # checkentry: tcp needs -p tcp
    ("-A OUTPUT ! -p tcp -m tcp --dport 1 -j DROP", True),
    ("-A INPUT -p udp -m multiport --dports 1:2,3:4,5:6,7:8,9:10,11:12,13:14,15:16", True),
    # and tearing down
    ("-F ssh", False),
    ("-D INPUT -p tcp --dport 22 -j ssh", False),
    ("-X ssh", False),
    ("-A INPUT -s 2001:db8::5 -c 2 200 -j DROP", False),
    ("-F", False),
    ("-X", False),
    ("-P FORWARD ACCEPT", False),
]


def test_ip6tables_commands_behave_as_with_the_kernel(svc, nets):
    commands_behave_as_with_the_kernel(svc, nets, V6, COMMANDS, "2001:db8:1::/48", "fc00::/7",
                                       "2001:db8::7")


# ---------------------------------------------------------------- 2. save and restore

ROUTER6 = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:lan - [0:0]
:icmp6 - [0:0]
:services - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p ipv6-icmp -j icmp6
-A INPUT -i lan0 -j lan
-A INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j services
-A INPUT -s fe80::/10 -p udp -m udp --sport 547 --dport 546 -j ACCEPT
-A FORWARD -i lan0 -o wan0 -s 2001:db8:100::/56 -j ACCEPT
-A FORWARD -i wan0 -o lan0 -p tcp -m multiport --dports 80,443 -j ACCEPT
-A FORWARD -o lan0 -p ipv6-icmp -m icmp6 --icmpv6-type packet-too-big -j ACCEPT
-A lan -m mac --mac-source 02:00:00:00:00:01 -j DROP
-A lan -p udp -m multiport --dports 53,67:68,123 -j ACCEPT
-A lan -j RETURN
-A icmp6 -p ipv6-icmp -m icmp6 --icmpv6-type echo-request -m limit --limit 10/sec -j ACCEPT
-A icmp6 -p ipv6-icmp -m icmp6 --icmpv6-type neighbour-solicitation -m hl --hl-eq 255 -j ACCEPT
-A icmp6 -p ipv6-icmp -m icmp6 --icmpv6-type neighbour-advertisement -m hl --hl-eq 255 -j ACCEPT
-A icmp6 -p ipv6-icmp -m icmp6 --icmpv6-type router-advertisement -m hl ! --hl-eq 254 -j ACCEPT
-A icmp6 -j DROP
-A services -p tcp -m tcp --dport 22 -m comment --comment ssh -j ACCEPT
-A services -p tcp -m multiport ! --dports 1:1023 -m mark --mark 0x1/0x1 -j ACCEPT
-A OUTPUT -m owner --uid-owner 0-999 -j ACCEPT
-A OUTPUT -p udp -m udp --dport 53 -m owner ! --socket-exists -j DROP
COMMIT
"""
NOFLUSH6 = """\
*filter
:extra - [0:0]
-A INPUT -s 2001:db8:5::5/128 -j extra
-A extra -j DROP
-I FORWARD 1 -p udp -j ACCEPT
-D INPUT -i lo -j ACCEPT
-A icmp6 -p ipv6-icmp -j ACCEPT
COMMIT
"""
COUNTED6 = """\
*filter
:INPUT ACCEPT [5:500]
:FORWARD DROP [6:600]
:OUTPUT ACCEPT [7:700]
:c1 - [0:0]
[1:100] -A INPUT -p tcp -j c1
[2:200] -A c1 -s 2001:db8::1/128 -j ACCEPT
[3:300] -A OUTPUT -p udp -m udp --dport 53 -j ACCEPT
COMMIT
"""
MORE_COUNTED6 = """\
*filter
:c2 - [8:800]
[9:900] -A INPUT -s 2001:db8::9/128 -j c2
[4:400] -A c2 -j DROP
COMMIT
"""
BROKEN6 = """\
*filter
:INPUT DROP [0:0]
-A INPUT -p udp -j ACCEPT
-A INPUT -s 192.0.2.1 -j ACCEPT
COMMIT
"""


def test_ip6tables_save_and_restore_match_the_kernel(svc, nets):
    kns, bns = nets(2)
    files = {}
    for name, text in (("router", ROUTER6), ("noflush", NOFLUSH6), ("counted", COUNTED6),
                       ("more", MORE_COUNTED6), ("broken", BROKEN6)):
        files[name] = os.path.join(svc.dir, f"{name}.rules6")
        with open(files[name], "w") as f:
            f.write(text)
    steps = [
        f"{IP6TABLES_RESTORE} {files['router']}",
        f"{IP6TABLES_RESTORE} -n {files['noflush']}",
        f"{IP6TABLES_RESTORE} -c {files['counted']}",
        f"{IP6TABLES_RESTORE} --noflush --counters {files['more']}",
        f"{IP6TABLES_RESTORE} {files['broken']}",
        f"{IP6TABLES_SAVE} -c > {files['counted']}.saved && "
        f"{IP6TABLES_RESTORE} -c {files['counted']}.saved",
        f"{IP6TABLES_RESTORE} {files['counted']}",
    ]
    router, noflush, counted, more, broken, again, plain = side_by_side(
        svc, kns, bns, steps, V6)["kernel"]
    assert router["rc"] == 0 and len(re.findall(r"^-A ", router["save"], re.M)) == \
        len(re.findall(r"^-A ", ROUTER6, re.M))
    kept = noflush["save"].splitlines()
    assert "-A INPUT -s 2001:db8:5::5/128 -j extra" in kept and "-A extra -j DROP" in kept
    assert "-A icmp6 -p ipv6-icmp -j ACCEPT" in kept and "-A INPUT -i lo -j ACCEPT" not in kept
    assert kept.index("-A FORWARD -p udp -j ACCEPT") < \
        kept.index("-A FORWARD -s 2001:db8:100::/56 -i lan0 -o wan0 -j ACCEPT")
    assert "Chain INPUT (policy ACCEPT 5 packets, 500 bytes)" in counted["L"]
    assert "[2:200] -A c1 -s 2001:db8::1/128 -j ACCEPT" in counted["save_c"].splitlines()
    assert "[9:900] -A INPUT -s 2001:db8::9/128 -j c2" in more["save_c"].splitlines()
    assert broken["rc"] != 0 and broken["save_c"] == more["save_c"]
    assert again["rc"] == 0 and again["save_c"] == more["save_c"]    # its own save, restored
    assert not re.search(r"\[[1-9]", plain["save_c"])


# ---------------------------------------------------------------- 3. real IPv6 traffic

TRAFFIC_RULES = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:udp-in - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m hl --hl-lt 5 -j DROP
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type echo-request -j ACCEPT
-A INPUT -p udp -j udp-in
-A udp-in -p udp -m udp --dport 9 -j DROP
-A udp-in -p udp -m multiport --dports 53,123 -j ACCEPT
-A udp-in -s fd00:6::2/128 -j RETURN
-A OUTPUT -p udp -m udp --dport 7 -j DROP
-A OUTPUT -o v0 -p ipv6-icmp -m icmp6 --icmpv6-type echo-reply -j ACCEPT
-A OUTPUT -d fd00:6::/64 -p udp -m mark ! --mark 0x1
COMMIT
"""
T_ADDR, P_ADDR = "fd00:6::1", "fd00:6::2"
T_MAC, P_MAC = "02:bf:00:00:06:01", "02:bf:00:00:06:02"
# What one exchange() delivers under TRAFFIC_RULES.
DELIVERED = {"udp 53": 3, "udp 123 at hop limit 3": 0, "udp 9": 0, "echo replies": 3,
             "udp 5353 out": 2, "udp 7 out refused": 2}


class Wire6:
    """A target namespace T (the filter under test) and a peer P, one veth pair apart:
    T's v0 fd00:6::1, P's p0 fd00:6::2. Only the test's packets cross T's hooks:
    no link-local addresses (so no router solicitation), no DAD, static neighbours
    (no neighbour discovery), and the MLD reports that joining the solicited-node
    groups sends are over before settle() returns."""

    def __init__(self, target: str, peer: str):
        self.target, self.peer = target, peer
        for ns in (target, peer):
            _sh(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_ra=0",
                "net.ipv6.conf.default.accept_ra=0", "net.ipv6.conf.all.router_solicitations=0",
                "net.ipv6.conf.default.router_solicitations=0")
        _sh(target, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "p0", "netns", peer)
        for ns, dev, mac, addr, other, other_mac in ((target, "v0", T_MAC, T_ADDR, P_ADDR, P_MAC),
                                                     (peer, "p0", P_MAC, P_ADDR, T_ADDR, T_MAC)):
            _sh(ns, "ip", "link", "set", dev, "address", mac, "addrgenmode", "none")
            _sh(ns, "ip", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
            _sh(ns, "ip", "neigh", "add", other, "lladdr", other_mac, "dev", dev, "nud", "permanent")
        for ns, dev in ((target, "v0"), (peer, "p0")):
            _sh(ns, "ip", "link", "set", dev, "up")

    def ipv6_stats(self) -> tuple:
        return tuple(_sh(ns, "cat", "/proc/net/snmp6") for ns in (self.target, self.peer))

    def settle(self, quiet: float = 1.5, timeout: float = 15.0) -> None:
        """Wait until neither namespace has sent or received IPv6 for `quiet` s."""
        deadline = time.monotonic() + timeout
        last, since = self.ipv6_stats(), time.monotonic()
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, "IPv6 traffic of its own in the wire never stops"
            time.sleep(0.1)
            now = self.ipv6_stats()
            if now != last:
                last, since = now, time.monotonic()

    def exchange(self) -> dict[str, int]:
        """The peer sends UDP to T (ports 53, 9, and 123 with hop limit 3) and three
        echo requests; T sends UDP to the peer's 5353 and 7. What arrived where."""
        with netns.entered(self.target):
            t53, t123, t9, t_tx = (_udp6(port) for port in (53, 123, 9, None))
        with netns.entered(self.peer):
            p5353, p_tx, low = _udp6(5353), _udp6(None), _udp6(None)
            low.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 3)
            ping = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        socks = (t53, t123, t9, t_tx, p5353, p_tx, low, ping)
        try:
            for _ in range(3):
                p_tx.sendto(b"0123456789", (T_ADDR, 53))
            for _ in range(2):
                p_tx.sendto(b"0123456789", (T_ADDR, 9))
            low.sendto(b"0123456789", (T_ADDR, 123))
            ident = os.getpid() & 0xFFFF
            for seq in range(3):      # the kernel fills in an ICMPv6 raw socket's checksum
                ping.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"ping", (T_ADDR, 0))
            for _ in range(2):
                t_tx.sendto(b"0123456789", (P_ADDR, 5353))
            refused = 0
            for _ in range(2):
                try:
                    t_tx.sendto(b"0123456789", (P_ADDR, 7))
                except PermissionError:
                    refused += 1
            replies = _received(ping, lambda data: data[0] == 129 and
                                struct.unpack_from("!H", data, 4)[0] == ident)
            return {"udp 53": _received(t53), "udp 123 at hop limit 3": _received(t123),
                    "udp 9": _received(t9), "echo replies": replies,
                    "udp 5353 out": _received(p5353), "udp 7 out refused": refused}
        finally:
            for s in socks:
                s.close()


def _sh(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True,
                          text=True).stdout


def _udp6(port: "int | None") -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    if port is not None:
        s.bind(("::", port))
    return s


def _received(s: socket.socket, wanted=lambda data: True, wait: float = 0.5) -> int:
    """How many wanted datagrams reach s until none has for `wait` seconds."""
    n = 0
    s.settimeout(wait)
    while True:
        try:
            data = s.recv(2048)
        except socket.timeout:
            return n
        n += wanted(data)


@pytest.fixture
def wires(nets):
    """wire(): a fresh Wire6 in two new namespaces (T, P)."""
    return lambda: Wire6(*nets(2))


def test_counters_after_real_ipv6_traffic(svc, wires):
    """The same ruleset in the kernel's ip6_tables and in bpfilter, the same packets:
    the same deliveries, and ip6tables lists and saves the same counters."""
    kernel, ours = wires(), wires()
    for wire in (kernel, ours):
        wire.settle()
    svc.kok(kernel.target, IP6TABLES_RESTORE, input=TRAFFIC_RULES)
    svc.ok(ours.target, IP6TABLES_RESTORE, input=TRAFFIC_RULES)
    assert kernel.exchange() == DELIVERED
    assert ours.exchange() == DELIVERED
    for argv in ([IP6TABLES, "-L", "-v", "-x", "-n", "--line-numbers"], [IP6TABLES_SAVE, "-c"]):
        theirs = _strip_save(svc.kok(kernel.target, *argv))
        assert _strip_save(svc.ok(ours.target, *argv)) == theirs
    listing = svc.kok(kernel.target, IP6TABLES, "-L", "-v", "-x", "-n")
    # the counts are the packets sent, nothing else crossed the hooks
    assert re.search(rf"^\s+2\s+{2 * DATAGRAM6} DROP .* udp dpt:9$", listing, re.M), listing
    assert re.search(r"^\s+3\s+\d+ ACCEPT .* ipv6-icmptype 128$", listing, re.M), listing
    assert "Chain INPUT (policy DROP 0 packets, 0 bytes)" in listing


def test_killing_the_service_keeps_ipv6_filtering(svc, wires):
    """kill -9: the pinned IPv6 table goes on filtering and counting; the next
    ip6tables command starts a service that recovers it, counters included."""
    kernel, ours = wires(), wires()
    for wire in (kernel, ours):
        wire.settle()
    svc.kok(kernel.target, IP6TABLES_RESTORE, input=TRAFFIC_RULES)
    svc.ok(ours.target, IP6TABLES_RESTORE, input=TRAFFIC_RULES)
    assert kernel.exchange() == ours.exchange() == DELIVERED
    pid = svc.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while svc.running():
        assert time.monotonic() < deadline, "kill -9 did not kill the service"
        time.sleep(0.01)
    assert kernel.exchange() == ours.exchange() == DELIVERED
    argv = [IP6TABLES, "-L", "-v", "-x", "-n"]
    listing = svc.ok(ours.target, *argv)
    assert svc.running() and svc.pid != pid
    assert f"recovered ip6tables table filter of netns {inum_of(ours.target)}" in svc.log_text()
    assert listing == svc.kok(kernel.target, *argv)
    assert re.search(rf"^\s+4\s+{4 * DATAGRAM6} DROP .* udp dpt:9$", listing, re.M), listing
    assert _strip_save(svc.ok(ours.target, IP6TABLES_SAVE, "-c")) == \
        _strip_save(svc.kok(kernel.target, IP6TABLES_SAVE, "-c"))


# ---------------------------------------------------------------- 4. the other socket options

NAMES_CHILD = """\
import ctypes, json, sys
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fread.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
out = []
for path in sys.argv[1:]:
    f = libc.fopen(path.encode(), b"r")   # as ip6tables-save reads it: the shim's fopen
    buf = ctypes.create_string_buffer(4096)
    n = libc.fread(buf, 1, 4096, f)
    libc.fclose(f)
    out.append(buf.raw[:n].decode())
print(json.dumps(out))
"""
NAMES = ["/proc/net/ip6_tables_names", "/proc/net/ip_tables_names"]


def test_table_names_files(svc, nets):
    """/proc/net/ip6_tables_names as ip6tables reads it (fopen): empty in a new
    namespace, "filter" once ip6tables used it, and the IPv4 file untouched; the
    same as the kernel's in its own namespace."""
    kns, bns = nets(2)
    child = os.path.join(svc.dir, "names.py")
    with open(child, "w") as f:
        f.write(NAMES_CHILD)

    def both() -> tuple[list, list]:
        return (json.loads(svc.kok(kns, PY, child, *NAMES)),
                json.loads(svc.ok(bns, PY, child, *NAMES)))

    theirs, ours = both()
    assert ours == theirs == ["", ""]
    for ns, run in ((kns, svc.kok), (bns, svc.ok)):
        run(ns, IP6TABLES, "-A", "INPUT", "-p", "udp", "-j", "ACCEPT")
    theirs, ours = both()
    assert ours == theirs == ["filter\n", ""]
    # ip6tables-save finds its tables through that file
    assert _strip_save(svc.ok(bns, IP6TABLES_SAVE)) == _strip_save(svc.kok(kns, IP6TABLES_SAVE))
    assert kernel_tables(svc, bns, V6) == ""


REVISIONS_CHILD = """\
import json, sys
from bpfilter.abi import sockopt
from bpfilter.errors import BpfilterError
from bpfilter.model import Family
out = []
for family, kind, name, revision in json.load(open(sys.argv[1])):
    try:
        sockopt.get_revision(kind, name, revision, Family[family])
        out.append(0)
    except BpfilterError as err:
        out.append(err.errno)
print(json.dumps(out))
"""
# What ip6tables asks about (IP6T_SO_GET_REVISION_MATCH/TARGET, 68/69), and iptables
# (66/67): every extension Linux has in either family (bpfilter's among them), under
# both families' socket options, from revision 0 to one past the last, and names
# that exist nowhere.
ASKED = sorted({(family.name, kind, name, revision)
                for (_, kind), known in linux.REVISIONS.items() for name in [*known, "nosuch"]
                for family in (V4, V6) for revision in range(max(known.get(name, (0,))) + 2)})


def test_revisions_answer_as_the_kernel(svc, nets):
    """GET_REVISION, each family's own socket option, through the shim and from the
    kernel: the same answer (0, EPROTONOSUPPORT or ENOENT) to every question. bpfilter
    answers for what Linux has, not only for what it implements: ip6tables then loads
    an extension as it would with the kernel, and a rule bpfilter cannot honour is
    refused by the replace, naming it (test_bad_ipv6_input_...)."""
    kns, bns = nets(2)
    spec = os.path.join(svc.dir, "revisions.json")
    with open(spec, "w") as f:
        json.dump(ASKED, f)
    child = os.path.join(svc.dir, "revisions.py")
    with open(child, "w") as f:
        f.write(REVISIONS_CHILD)
    theirs = json.loads(svc.kok(kns, PY, child, spec))
    ours = json.loads(svc.ok(bns, PY, child, spec))
    assert [(q, o, t) for q, o, t in zip(ASKED, ours, theirs) if o != t] == []
    assert set(theirs) == {0, errno.ENOENT, errno.EPROTONOSUPPORT}


# ---------------------------------------------------------------- 5. two families, one netns

def test_ipv4_and_ipv6_tables_are_independent(svc, nets):
    """One namespace, both families: each table filters and counts its own traffic
    only, and changing one (rules, counters, policies, flushing) leaves the other
    as it was."""
    (ns,) = nets(1)
    svc.ok(ns, tool(V4, "-restore"), input=LOCAL_RULES)
    svc.ok(ns, IP6TABLES_RESTORE, input=LOCAL_RULES)
    assert local_traffic(ns, accepted=2, dropped=3, family=V4) == (2, 0)
    assert local_traffic(ns, accepted=1, dropped=2, family=V6) == (1, 0)

    def state(family: Family) -> tuple[str, str]:
        return (svc.ok(ns, tool(family), "-L", "-v", "-x", "-n"),
                _strip_save(svc.ok(ns, tool(family, "-save"), "-c")))
    v4, v6 = state(V4), state(V6)
    assert "[3:114] -A OUTPUT -p udp -m udp --dport 9 -j DROP" in v4[1]
    assert f"[2:{2 * DATAGRAM6}] -A OUTPUT -p udp -m udp --dport 9 -j DROP" in v6[1]
    for changed, commands in (
            (V6, ["-A OUTPUT -p udp --dport 7777 -j DROP", "-Z", "-P INPUT DROP", "-N x", "-F",
                  "-X"]),
            (V4, ["-I OUTPUT -p udp --dport 7777 -j DROP", "-Z OUTPUT", "-P OUTPUT DROP",
                  "-F"])):
        other = V4 if changed == V6 else V6
        before = state(other)
        for command in commands:
            svc.ok(ns, tool(changed), *command.split())
            assert state(other) == before, f"{tool(changed)} {command} changed the other family"
        assert_filters(ns, other)
        svc.ok(ns, tool(changed, "-restore"), input=LOCAL_RULES)     # as it was, for the next
    # both pinned side by side, the kernel's own tables never made
    (tables,) = [os.listdir(os.path.join(svc.bpffs, d)) for d in os.listdir(svc.bpffs)
                 if d.startswith(f"{inum_of(ns)}-")]
    assert sorted(tables) == ["ipv4-filter", "ipv6-filter"]
    assert kernel_tables(svc, ns, V4) == kernel_tables(svc, ns, V6) == ""


# ---------------------------------------------------------------- 6. bad input

def test_bad_ipv6_input_leaves_both_families_filtering(svc, nets):
    """Malformed ip6t_replace blobs get the kernel's errno, and an ip6tables command
    bpfilter refuses says why; after each, the IPv6 and the IPv4 rulesets in place
    are unchanged and still filter."""
    ns, kns = nets(2)
    svc.ok(ns, tool(V4, "-restore"), input=USER_CHAINS)
    svc.ok(ns, IP6TABLES_RESTORE, input=USER_CHAINS)
    svc.kok(kns, IP6TABLES_RESTORE, input=USER_CHAINS)
    saved = {family: _strip_save(svc.ok(ns, tool(family, "-save"), "-c")) for family in (V4, V6)}
    pid = svc.pid

    def unchanged():
        assert svc.running() and svc.pid == pid
        for family in (V4, V6):
            assert_filters(ns, family)
        for family in (V4, V6):
            # the traffic counted, nothing else changed
            now = _strip_save(svc.ok(ns, tool(family, "-save"), "-c"))
            assert re.sub(r"\[\d+:\d+\]", "", now) == re.sub(r"\[\d+:\d+\]", "", saved[family])

    unchanged()
    malformed_replaces_answer_as_the_kernel(svc, ns, kns, V6)
    unchanged()
    # what bpfilter does not implement for IPv6, or only with bpfilter.ko: refused
    # whole, by rule and extension
    for rule, names in (("-j NFLOG --nflog-group 3", "target 'NFLOG'"),
                        ("-j NFQUEUE --queue-num 3", "target 'NFQUEUE'"),
                        ("-m connlabel --label 6", "match 'connlabel'"),
                        ("-p tcp -m connlimit --connlimit-above 2", "match 'connlimit'")):
        done = svc.exec(ns, IP6TABLES, "-A", "X", *rule.split())
        assert done.returncode != 0
        assert "chain X rule 2" in done.stderr and names in done.stderr, done.stderr
        assert ("is refused: " in done.stderr or "needs bpfilter.ko" in done.stderr) \
            and "(ENOTSUP)" in done.stderr, done.stderr
        assert "Warning" not in done.stderr      # ip6tables found the extension, as with the kernel
        assert svc.kernel(kns, IP6TABLES, "-A", "X", *rule.split()).returncode == 0
        unchanged()
