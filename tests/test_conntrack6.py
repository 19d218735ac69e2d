"""-m conntrack and -m state for ip6tables: the tuples' 16-byte addresses, their masks
and their `ip6tables -L -n` text, and real IPv6 connections through `bpfilter serve`
(which keeps IPv6 conntrack on with an `ip6` nftables table) beside the kernel's own
ip6tables, with the same answers and counters.

Each side is a pair of namespaces over one veth: F, the firewall under test
(2001:db8:6::1), and P, its peer (2001:db8:6::2), with static neighbours and no
link-local addresses, so that only the test's packets cross F's hooks.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile

import pytest

from bpfilter import ext
from bpfilter.abi import codec
from bpfilter.abi.xtables import SIZEOF_XT_ENTRY_HEADER, ipt_replace
from bpfilter.abi.ipv6 import SIZEOF_IP6T_ENTRY
from bpfilter.decode import table_from_blob
from bpfilter.ext import conntrack as ct
from bpfilter.loader import load_ruleset
from bpfilter.model import Family
from bpfilter.netns import entered
from bpfilter_lab.scratch import replace_blob

from test_refusals import kernel_refusal
from test_reject6_addrtype6 import kernels
from test_service import Service, nets, svc  # noqa: F401 (fixtures)

pytestmark = pytest.mark.kernel

V4, V6 = Family.IPV4, Family.IPV6
F_ADDR, P_ADDR = "2001:db8:6::1", "2001:db8:6::2"
F_MAC, P_MAC = "02:bf:06:00:00:01", "02:bf:06:00:00:02"
HEADER = ipt_replace.sizeof()
PY = sys.executable


# ---------------------------------------------------------------- decode and text

def conntrack_matches(text: str, family: Family = V6) -> list:
    _, table = table_from_blob(replace_blob(text, family=family), family)
    return [m for c in table.chains.values() for r in c.rules for m in r.matches]


ADDRESSED = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctorigsrc 2001:db8::/64 ! --ctrepldst 2001:db8::1 --ctstate NEW
-A INPUT -m conntrack ! --ctorigdst 2001:db8:ffff::/48 --ctreplsrc ::1
-A INPUT -m state --state RELATED,ESTABLISHED
-A INPUT -m conntrack --ctorigsrc 2001:db8:0:0:8000::/65 --ctproto 17 --ctorigdstport 53
COMMIT
"""
# the same rules for iptables
ADDRESSED4 = ADDRESSED.replace("2001:db8::/64", "10.0.0.0/8").replace("2001:db8::1", "10.0.0.1") \
    .replace("2001:db8:ffff::/48", "10.1.0.0/16").replace("::1", "127.0.0.1") \
    .replace("2001:db8:0:0:8000::/65", "10.0.0.128/25")


def test_addresses_decode_with_their_16_bytes():
    first, second, state, fourth = conntrack_matches(ADDRESSED)
    orig_src, orig_dst, repl_src, repl_dst = first.addrs
    assert orig_src == ct.Address(bytes.fromhex("20010db8") + bytes(12),
                                  bytes.fromhex("ff" * 8) + bytes(8), False)
    assert repl_dst == ct.Address(bytes.fromhex("20010db8") + bytes(11) + b"\1", b"\xff" * 16,
                                  True)
    assert second.addrs[1].invert and second.addrs[1].mask == b"\xff" * 6 + bytes(10)
    assert second.addrs[2].addr == bytes(15) + b"\1"
    assert (state.name, state.state_mask) == ("conntrack", 0b110)   # -m state: revision 3
    assert fourth.addrs[0].mask == b"\xff" * 8 + b"\x80" + bytes(7)


def test_older_revisions_decode_ipv6_addresses_alike():
    """Revisions 1 and 2 (older ip6tables) share revision 3's address layout."""
    raw = codec.parse_replace(replace_blob(ADDRESSED, family=V6), family=V6)
    payload = raw.entries[0].matches[0].data
    v3 = ct._mtinfo(3).parse(payload)
    fields = {k: v for k, v in v3.items() if not k.startswith("_") and not k.endswith("_high")}
    for revision, size in ((1, 152), (2, 160)):
        older = ct._mtinfo(revision).build(fields).ljust(size, b"\0")
        old = ext._MATCHES.find("conntrack", revision, V6, "test").decode(older, "test")
        assert old.addrs == conntrack_matches(ADDRESSED)[0].addrs


def test_ipv6_tables_read_their_own_fact_group():
    """IPv6 rules read the "ct6" group, which fills the shared "ct" region and the
    IPv6 addresses' own; IPv4 tables keep "ct" alone, and both turn conntrack on."""
    _, table = table_from_blob(replace_blob(ADDRESSED, family=V6), V6)
    ruleset = load_ruleset(table, {})
    try:
        assert ruleset.compiled.needs >= {"ct6"} and "ct" not in ruleset.compiled.needs
        assert ruleset.uses_conntrack
    finally:
        ruleset.close()
    _, table = table_from_blob(replace_blob(ADDRESSED4), V4)
    ruleset = load_ruleset(table, {})
    try:
        assert "ct" in ruleset.compiled.needs and "ct6" not in ruleset.compiled.needs
        assert ruleset.uses_conntrack
    finally:
        ruleset.close()


def crafted_masks(text: str, family: Family, masks: dict[int, bytes]) -> bytes:
    """The blob of `text`, the origsrc mask of rule i set to masks[i] (masks no
    iptables writes: not a prefix)."""
    blob = bytearray(replace_blob(text, family=family))
    raw = codec.parse_replace(bytes(blob), family=family)
    entry_size = SIZEOF_IP6T_ENTRY if family == V6 else 112
    rules = [e for e in raw.entries if e.matches]
    for i, mask in masks.items():
        at = HEADER + rules[i].offset + entry_size + SIZEOF_XT_ENTRY_HEADER + 16  # origsrc_mask
        blob[at:at + len(mask)] = mask
    return bytes(blob)


@pytest.mark.parametrize("family", [V4, V6], ids=["ipv4", "ipv6"])
def test_conntrack_listed_as_iptables_lists_it(fresh_netns, family):
    """Each conntrack match's text is what ip(6)tables -L -n prints for it, masks
    that are not a prefix included (given to the kernel as a blob)."""
    if family == V6:
        # inet_ntop() spells an address with 96 leading zero bits in IPv4's way
        text = ADDRESSED.replace("COMMIT", "-A INPUT -m conntrack --ctorigdst ::102:304/120\nCOMMIT")
        masks = {1: bytes.fromhex("ffff" + "00" * 12 + "ffff")}
        command, anywhere = "ip6tables-legacy", "::/0"
    else:
        text = ADDRESSED4
        masks = {1: bytes.fromhex("ff00ff00")}
        command, anywhere = "iptables-legacy", "0.0.0.0/0"
    text = text.replace("-A INPUT -m conntrack ! --ctorigdst",
                        "-A INPUT -m conntrack --ctorigsrc " +
                        ("2001:db8::2" if family == V6 else "10.0.0.2") + " ! --ctorigdst")
    blob = crafted_masks(text, family, masks)
    _, table = table_from_blob(blob, family)
    ours = [" ".join(ext.describe_match(m, family) for m in r.matches)
            for r in table.chains["INPUT"].rules]
    assert (kernels if family == V6 else kernel_refusal)(blob, fresh_netns) == 0
    out = subprocess.run(["ip", "netns", "exec", fresh_netns, command, "-L", "INPUT", "-n"],
                         capture_output=True, text=True, check=True).stdout
    theirs = [line.split(anywhere, 2)[-1].strip() for line in out.splitlines()[2:]]
    assert ours == theirs
    # the crafted mask is printed as a mask
    assert ("ctorigsrc 2001:db8::2/ffff::ffff" if family == V6
            else "ctorigsrc 10.0.0.2/255.0.255.0") in theirs[1]
    if family == V6:
        assert theirs[-1] == "ctorigdst ::1.2.3.4/120"


# ---------------------------------------------------------------- real connections

class Pair:
    """F, the firewall under test, and its peer P over one veth (f0 -- p0)."""

    def __init__(self, nets) -> None:
        self.f, self.p = nets(2)
        run = lambda *a: subprocess.run(list(a), check=True)   # noqa: E731
        run("ip", "link", "add", "f0", "netns", self.f, "address", F_MAC, "type", "veth",
            "peer", "name", "p0", "netns", self.p, "address", P_MAC)
        for ns, dev, addr, peer, mac in ((self.f, "f0", F_ADDR, P_ADDR, P_MAC),
                                         (self.p, "p0", P_ADDR, F_ADDR, F_MAC)):
            # no link-local address: no DAD, no MLD, no router solicitation crosses F
            run("ip", "-n", ns, "link", "set", dev, "addrgenmode", "none")
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.icmp.ratelimit=0")
            run("ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
            run("ip", "-n", ns, "neigh", "add", peer, "lladdr", mac, "dev", dev, "nud",
                "permanent")
            run("ip", "-n", ns, "link", "set", dev, "up")

    def sockets(self, ns: str, kind: int, port: int = 0, listen: bool = False) -> socket.socket:
        with entered(ns):
            s = socket.socket(socket.AF_INET6, kind)
        s.settimeout(1)
        if port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((F_ADDR if ns == self.f else P_ADDR, port))
        if listen:
            s.listen(4)
        return s

    def ask(self, port: int, echo: bool) -> str:
        """F asks P over UDP from a connected socket: what comes back."""
        server = self.sockets(self.p, socket.SOCK_DGRAM, port) if echo else None
        client = self.sockets(self.f, socket.SOCK_DGRAM)
        try:
            client.connect((P_ADDR, port))
            client.send(b"ask")
            if server:
                data, peer = server.recvfrom(64)
                server.sendto(data, peer)
            return "reply" if client.recv(64) == b"ask" else "garbage"
        except socket.timeout:
            return "no reply"
        except OSError as e:
            return os.strerror(e.errno)
        finally:
            client.close()
            if server:
                server.close()

    def unsolicited(self, port: int) -> str:
        """P sends to F's port, on which F listens."""
        receiver = self.sockets(self.f, socket.SOCK_DGRAM, port)
        sender = self.sockets(self.p, socket.SOCK_DGRAM)
        try:
            sender.sendto(b"hello", (F_ADDR, port))
            receiver.recv(64)
            return "received"
        except socket.timeout:
            return "not received"
        finally:
            receiver.close()
            sender.close()

    def connect(self, src: str, port: int, listening: bool) -> str:
        """A TCP connect() from src (F or P) to the other's port."""
        to, dst_ns = (P_ADDR, self.p) if src == self.f else (F_ADDR, self.f)
        server = self.sockets(dst_ns, socket.SOCK_STREAM, port, listen=True) if listening \
            else None
        client = self.sockets(src, socket.SOCK_STREAM)
        client.settimeout(0.5)   # before the SYN is sent again (after 1 s)
        try:
            client.connect((to, port))
            return "connected"
        except socket.timeout:
            return "no answer"
        except OSError as e:
            return os.strerror(e.errno)
        finally:
            # ended with a reset: a FIN exchange's packets depend on timing
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            if server:
                server.close()

    def ping(self, src: str) -> str:
        """One ICMPv6 echo request from src to the other, and its reply within 1 s."""
        to = P_ADDR if src == self.f else F_ADDR
        with entered(src):
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            s.settimeout(1)
            ident = os.getpid() & 0xFFFF
            # type 128, code 0, checksum (the kernel fills it in), identifier, sequence
            s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"ping", (to, 0))
            while True:
                data, _ = s.recvfrom(128)
                if data[0] == 129 and struct.unpack("!H", data[4:6])[0] == ident:
                    return "answered"
        except socket.timeout:
            return "no answer"
        finally:
            s.close()


SERVER = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m state --state INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
"""

# count-only rules on the tuples' addresses, then the stateful rules
ADDRESSES = f"""*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:seen - [0:0]
-A INPUT -j seen
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A seen -m conntrack --ctorigsrc {F_ADDR}
-A seen -m conntrack --ctorigsrc {P_ADDR}
-A seen -m conntrack --ctorigsrc 2001:db8:6::/64 --ctorigdst {P_ADDR}/127
-A seen -m conntrack ! --ctorigsrc 2001:db8:6::/64
-A seen -m conntrack --ctorigsrc 2001:db8:7::/48
-A seen -m conntrack --ctreplsrc {F_ADDR} ! --ctrepldst {F_ADDR}
-A seen -m conntrack ! --ctreplsrc 2001:db8:6::/127 --ctproto 6
-A seen -m conntrack --ctrepldst 2001:db8:6:0:8000::/65
-A seen -m conntrack --ctorigsrc ::1
-A seen -m conntrack --ctstate NEW --ctdir ORIGINAL
-A seen -m state --state ESTABLISHED
COMMIT
"""


class Side:
    """One pair's firewall, run by the kernel's ip6tables or by bpfilter serve."""

    def __init__(self, svc: Service, nets, kernel: bool) -> None:
        self.svc, self.kernel, self.pair = svc, kernel, Pair(nets)

    def run(self, *argv: str, input: "str | None" = None) -> str:
        run = self.svc.kok if self.kernel else self.svc.ok
        return run(self.pair.f, *argv, input=input)

    def replace(self, blob: bytes) -> None:
        """The blob, as the kernel or the service takes it (the same code through the
        shim), with the table's current entry count as num_counters."""
        with tempfile.NamedTemporaryFile(suffix=".blob") as f:
            f.write(blob)
            f.flush()
            self.run(PY, "-c", _REPLACE, f.name)

    def listing(self, *chains: str) -> str:
        """The chains' `-L -v` listings. Not OUTPUT's: F's MLD reports (sent from ::
        when its address comes up) cross it, while only one of the two tables is in."""
        return "".join(self.run("ip6tables-legacy", "-L", chain, "-v", "-x", "-n")
                       for chain in chains)


# what ip6tables-legacy-restore does with a blob: the table's entry count as
# num_counters, and room for the old counters (the shim writes them back there)
_REPLACE = """
import ctypes, sys
from bpfilter.abi import codec, sockopt
from bpfilter.abi.xtables import ipt_replace
from bpfilter.model import Family
blob = bytearray(open(sys.argv[1], "rb").read())
header = ipt_replace.parse(bytes(blob[:96]))
header.num_counters = codec.parse_getinfo(sockopt.get_info("filter", Family.IPV6))["num_entries"]
old = ctypes.create_string_buffer(16 * header.num_counters)
header.counters = ctypes.addressof(old)
blob[:96] = ipt_replace.build(header)
sockopt.set_replace(bytes(blob), family=Family.IPV6)
"""


@pytest.fixture
def sides(svc, nets):
    return [Side(svc, nets, kernel=True), Side(svc, nets, kernel=False)]


def nft_tables(side: Side) -> str:
    return side.svc.kok(side.pair.f, "nft", "list", "tables")


def server_probes(pair: Pair) -> list[str]:
    return [
        f"udp reply: {pair.ask(7, echo=True)}",                       # ESTABLISHED
        f"udp to a closed port: {pair.ask(6, echo=False)}",           # the error: RELATED
        f"unsolicited udp: {pair.unsolicited(8)}",                    # NEW: the policy
        f"tcp out: {pair.connect(pair.f, 7, listening=True)}",        # SYN-ACK: ESTABLISHED
        f"tcp out to a closed port: {pair.connect(pair.f, 6, listening=False)}",  # its RST
        f"tcp in to 22: {pair.connect(pair.p, 22, listening=True)}",  # NEW, accepted
        f"tcp in to 23: {pair.connect(pair.p, 23, listening=True)}",  # NEW, the policy
        f"ping out: {pair.ping(pair.f)}",                             # echo reply: ESTABLISHED
        f"ping in: {pair.ping(pair.p)}",                              # echo request: NEW
    ]


def test_a_stateful_ipv6_firewall_through_bpfilter_serve(sides):
    """RELATED,ESTABLISHED under a DROP policy: replies and an ICMPv6 error pass,
    nothing unsolicited does, with the kernel's ip6tables' counters; conntrack is
    turned on for IPv6 by an `ip6` nftables table while the table reads it."""
    answers = {}
    for side in sides:
        side.run("ip6tables-legacy-restore", input=SERVER)
        answers[side.kernel] = server_probes(side.pair)
        assert answers[side.kernel] == [
            "udp reply: reply", "udp to a closed port: Connection refused",
            "unsolicited udp: not received", "tcp out: connected",
            "tcp out to a closed port: Connection refused", "tcp in to 22: connected",
            "tcp in to 23: no answer", "ping out: answered", "ping in: no answer"], side.kernel
    kernel, ours = sides
    assert ours.listing("INPUT") == kernel.listing("INPUT")
    assert "table ip6 bpfilter_conntrack" in nft_tables(ours)
    assert "table ip bpfilter_conntrack" not in nft_tables(ours)
    ours.run("ip6tables-legacy", "-F", "INPUT")
    assert nft_tables(ours) == ""


def test_the_tuples_addresses_compare_as_the_kernels(sides):
    """Each address test of conntrack_mt() (masks as prefixes, one that is not,
    inverted, both directions' tuples) counts the same packets as the kernel's."""
    # seen's rule 9, --ctorigsrc ::1, gets the mask ::ffff: the last 16 bits only
    blob = bytearray(replace_blob(ADDRESSES, family=V6))
    raw = codec.parse_replace(bytes(blob), family=V6)
    (rule,) = [e for e in raw.entries if e.matches and e.matches[0].name == "conntrack"
               and ct._mtinfo(3).parse(e.matches[0].data).origsrc_addr == bytes(15) + b"\1"]
    at = HEADER + rule.offset + SIZEOF_IP6T_ENTRY + SIZEOF_XT_ENTRY_HEADER
    blob[at:at + 16] = bytes(14) + b"\0\2"                     # the address: ::2
    blob[at + 16:at + 32] = bytes(14) + b"\xff\xff"             # its mask
    for side in sides:
        side.replace(bytes(blob))
        pair = side.pair
        assert pair.ask(7, echo=True) == "reply"
        assert pair.ask(6, echo=False) == "Connection refused"
        assert pair.connect(pair.f, 7, listening=True) == "connected"
        assert pair.connect(pair.p, 22, listening=True) == "connected"
        assert pair.unsolicited(8) == "not received"
    kernel, ours = sides
    assert ours.listing("INPUT", "seen") == kernel.listing("INPUT", "seen")
    counts = [int(line.split()[0]) for line in kernel.listing("seen").splitlines()[2:]]
    # every rule but --ctorigsrc 2001:db8:7::/48 saw packets; ! /64 saw none either
    assert [bool(c) for c in counts] == [True, True, True, False, False, True, True, False,
                                         True, True, True], counts
