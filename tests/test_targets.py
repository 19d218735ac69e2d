"""Target extensions: LOG and REJECT as the kernel checks them, LOG's verdicts,
counters and lines through TEST_RUN, and REJECT's need of the service's ring. LOG is tested for both
families (ip6tables registers the same target): its lines through TEST_RUN are compared
with the kernel LOG target's for the same crafted packets sent through its OUTPUT.

(LOG lines compared with the kernel's own for real packets on every path:
test_service.py, test_log_lines_are_the_kernels.)
"""
import errno
import ipaddress
import os
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from bpfilter import klog
from bpfilter.abi import codec
from bpfilter.abi.ipv4 import IPT_INV_PROTO
from bpfilter.abi.xtables import ipt_replace
from bpfilter.bpf import syscall as bpf
from bpfilter.errors import BpfilterError
from bpfilter.loader import load_filter_table
from bpfilter.model import Family, Hook
from bpfilter.service import get_answer
from bpfilter.abi import ipv4
from bpfilter.abi import xtables as X
from bpfilter.netns import entered
from bpfilter_lab import namespaces
from bpfilter_lab.packets import (ROUTER_ALERT_MLD, AuthenticationHeader, DestinationOptions,
                                  Fragment, HopByHop, Option, Packet, Routing, icmpv6_error,
                                  pad_n)
from bpfilter_lab.scratch import RESTORE, replace_blob

from verdicts import COMMAND, Case, listing_agrees
from kmsg import KERNEL, NF_LOG_ALL_NETNS, PRINTK_DEVKMSG, Kmsg, logging_everywhere, sysctls
from test_refusals import kernel_refusal

pytestmark = pytest.mark.kernel

HEADER = ipt_replace.sizeof()
TARGET_HEADER = 32                 # struct xt_entry_target, before its payload
IP_PROTO, IP_INVFLAGS = 80, 83     # in struct ipt_ip


def ruleset(*lines: str) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":X - [0:0]", *lines, "COMMIT", ""])


FAMILIES = pytest.mark.parametrize("family", list(Family), ids=lambda f: f.name.lower())


def patched(text: str, rule: int, payload_at: int, value: bytes, ip_at: "int | None" = None,
            ip_value: "bytes | None" = None, family: Family = Family.IPV4) -> bytes:
    """The blob of `text` with entry `rule`'s target payload (and optionally its ipt_ip)
    rewritten: what iptables never writes, the kernel still checks."""
    blob = bytearray(replace_blob(text, family=family))
    e = codec.parse_replace(bytes(blob), family=family).entries[rule]
    at = HEADER + e.offset + e.target_offset + TARGET_HEADER + payload_at
    blob[at:at + len(value)] = value
    if ip_at is not None:
        blob[HEADER + e.offset + ip_at:HEADER + e.offset + ip_at + len(ip_value)] = ip_value
    return bytes(blob)


def ours(blob: bytes, log=None, family: Family = Family.IPV4) -> BpfilterError:
    with pytest.raises(BpfilterError) as info:
        load_filter_table(blob, attach=False, environment=log and log.maps(),
                          family=family).close()
    return info.value


# (what, ruleset line, payload offset, bytes, ip offset, ip bytes, message)
BAD_LOG = [
    ("LOG level 8", "-A OUTPUT -j LOG", 0, b"\x08", None, None, "level 8"),
    ("LOG prefix without NUL", "-A OUTPUT -j LOG", 2, b"p" * 30, None, None, "NUL-terminated"),
]
BAD = [(Family.IPV4, *b) for b in BAD_LOG] + [(Family.IPV6, *b) for b in BAD_LOG] + [
    (Family.IPV4, *b) for b in [
    ("REJECT echo-reply", "-A OUTPUT -j REJECT", 0, b"\x04", None, None, "echo-reply"),
    ("REJECT tcp-reset without -p tcp", "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
     0, b"", IP_PROTO, b"\x11\x00", "only valid with -p tcp"),
    ("REJECT tcp-reset with ! -p tcp", "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
     0, b"", IP_INVFLAGS, bytes([IPT_INV_PROTO]), "only valid with -p tcp"),
]]


def rule_entry(text: str, family: Family = Family.IPV4) -> int:
    """The entry of the ruleset's only rule."""
    raw = codec.parse_replace(replace_blob(text, family=family), family=family)
    return next(e.index for e in raw.entries if e.target.name not in ("", "ERROR"))


@pytest.mark.parametrize("family, what, line, at, value, ip_at, ip_value, message", BAD,
                         ids=[f"{b[1]} ({b[0].name.lower()})" for b in BAD])
def test_bad_payloads_get_the_kernels_errno(fresh_netns, family, what, line, at, value, ip_at,
                                            ip_value, message):
    text = ruleset(line)
    blob = patched(text, rule_entry(text, family), at, value, ip_at, ip_value, family)
    err = ours(blob, family=family)
    assert err.errno == errno.EINVAL, err
    assert "chain OUTPUT rule 1" in str(err) and message in str(err), err
    assert kernel_refusal(blob, fresh_netns, family) == errno.EINVAL


def test_a_bad_log_after_a_reject_still_gets_the_kernels_errno(fresh_netns):
    """REJECT is refused only once the whole table passed the kernel's checks."""
    text = ruleset("-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset", "-A X -j LOG")
    raw = codec.parse_replace(replace_blob(text))
    log_entry = next(e.index for e in raw.entries if e.target.name == "LOG")
    blob = patched(text, log_entry, 0, b"\x09")
    assert ours(blob).errno == errno.EINVAL
    assert kernel_refusal(blob, fresh_netns) == errno.EINVAL


@pytest.mark.parametrize("reject_with", ["icmp-net-unreachable", "icmp-host-unreachable",
                                         "icmp-port-unreachable", "icmp-proto-unreachable",
                                         "icmp-net-prohibited", "icmp-host-prohibited",
                                         "icmp-admin-prohibited", "tcp-reset"])
def test_valid_reject_without_the_module_needs_the_services_ring(fresh_netns, reject_with):
    """The service sends the answer (test_reject_served.py): loaded with its ring,
    refused without one, saying so."""
    blob = replace_blob(ruleset("-A INPUT -p udp -j ACCEPT", "-A INPUT -p tcp -j ACCEPT",
                                f"-A INPUT -p tcp -j REJECT --reject-with {reject_with}"))
    err = ours(blob)
    assert err.errno == errno.EOPNOTSUPP, err
    assert "REJECT rules without bpfilter.ko need the service's ring" in str(err), err
    ring = klog.LogRing.create()
    try:
        load_filter_table(blob, attach=False, environment=ring.maps(klog.ANSWER_REFS)).close()
    finally:
        ring.close()
    assert kernel_refusal(blob, fresh_netns) == 0


def revision(kind: str, name: str, rev: int) -> int:
    optname = ipv4.IPT_SO_GET_REVISION_MATCH if kind == "match" else ipv4.IPT_SO_GET_REVISION_TARGET
    payload = X.xt_get_revision.build(dict(name=name.encode().ljust(29, b"\0"), revision=rev))
    return get_answer(ipv4.IPV4, optname, len(payload), payload, info=None, entries=None)[0]


def test_get_revision_target_answers_from_the_registry():
    assert revision("target", "LOG", 0) == 0
    assert revision("target", "REJECT", 0) == 0
    assert revision("target", "", 0) == 0            # the standard target
    assert revision("target", "ERROR", 0) == 0
    assert revision("target", "LOG", 1) == -errno.EPROTONOSUPPORT
    # what Linux has, bpfilter too, as the kernel would (the replace refuses NFQUEUE)
    assert revision("target", "NFQUEUE", 3) == 0
    assert revision("target", "NFQUEUE", 4) == -errno.EPROTONOSUPPORT
    assert revision("target", "NOSUCH", 0) == -errno.ENOENT
    assert revision("match", "LOG", 0) == -errno.ENOENT


# ---------------------------------------------------------------- LOG through TEST_RUN

LOGGED = ruleset('-A OUTPUT -p udp -j LOG --log-prefix "first: " --log-level 6',
                 "-A OUTPUT -j X",
                 '-A X -p udp -j LOG --log-prefix "in X: " --log-ip-options',
                 "-A OUTPUT -p udp -j DROP")
SRC = {Family.IPV4: "10.0.0.1", Family.IPV6: "2001:db8::1"}
DST = {Family.IPV4: "10.0.0.2", Family.IPV6: "2001:db8::2"}
# a udp packet with an IP option, or behind a hop-by-hop header: the line of each
# without and with --log-ip-options
UDP = {Family.IPV4: Packet(SRC[Family.IPV4], DST[Family.IPV4], "udp", sport=1234, dport=53,
                           ttl=7, options=b"\x94\x04\x00\x00").build(7, 1),
       Family.IPV6: Packet(SRC[Family.IPV6], DST[Family.IPV6], "udp", sport=1234, dport=53,
                           ttl=7, ext=[HopByHop((ROUTER_ALERT_MLD,))]).build(7, 1)}
LINE = {Family.IPV4: ("IN= OUT=lo SRC=10.0.0.1 DST=10.0.0.2 LEN=48 TOS=0x00 PREC=0x00 TTL=7 "
                      "ID=7 {opt}PROTO=UDP SPT=1234 DPT=53 LEN=24 ", "OPT (94040000) "),
        Family.IPV6: ("IN= OUT=lo SRC=2001:0db8:0000:0000:0000:0000:0000:0001 "
                      "DST=2001:0db8:0000:0000:0000:0000:0000:0002 LEN=72 TC=0 HOPLIMIT=7 "
                      "FLOWLBL=7 {opt}PROTO=UDP SPT=1234 DPT=53 LEN=24 ", "OPT ( ) ")}


@pytest.fixture
def ring():
    ring = klog.LogRing.create()
    yield ring
    ring.close()


def log_table(rules: str, ring, family: Family):
    return load_filter_table(replace_blob(rules, family=family), attach=False,
                             environment=ring.maps(), family=family)


def drained(ring, tmp_path, devkmsg: str = "ratelimit") -> tuple[int, list[str], bytes]:
    """The service's writer drains the ring into a file: (lines written, its notes, the
    file). nf_log_all_netns is on: TEST_RUN's hook state has no netns."""
    notes, sink = [], tmp_path / "kmsg"
    sink.write_bytes(b"")
    writer = klog.KernelLog(ring, notes.append, kmsg=str(sink))
    try:
        with sysctls({NF_LOG_ALL_NETNS: "1", PRINTK_DEVKMSG: devkmsg}):
            written = writer.drain()
    finally:
        writer.close()
    return written, notes, sink.read_bytes()


@FAMILIES
def test_log_lines_and_the_rules_after_it(ring, family):
    """LOG writes its line and the packet goes on: to the user chain's LOG, then DROP;
    every rule on the way counts it."""
    table = log_table(LOGGED, ring, family)
    try:
        assert table.test_run(Hook.LOCAL_OUT, UDP[family]) == 0
        counts = [c for c, _ in table.counters()]
    finally:
        table.close()
    # INPUT and FORWARD policies, OUTPUT's 3 rules and policy, X's head, LOG and RETURN
    assert counts == [0, 0, 1, 1, 1, 0, 0, 1, 1, 0]
    lines = [klog.format_line(r) for r in ring.records()]
    line, opt = LINE[family]
    assert lines == [(6, ("first: " + line.format(opt="")).encode()),
                     (4, ("in X: " + line.format(opt=opt)).encode())]
    assert list(ring.records()) == []   # consumed


@FAMILIES
def test_no_line_for_a_packet_log_does_not_match(ring, family):
    table = log_table(LOGGED, ring, family)
    try:
        tcp = Packet(SRC[family], DST[family], "tcp").build(1, 1)
        assert table.test_run(Hook.LOCAL_OUT, tcp) == 1
    finally:
        table.close()
    assert list(ring.records()) == []


@pytest.mark.parametrize("family, size, captured", [
    (Family.IPV4, 48, 192), (Family.IPV6, 128, 128), (Family.IPV6, 129, 256),
    (Family.IPV6, 1448, 1280)], ids=["ipv4", "ipv6-128", "ipv6-129", "ipv6-1448"])
def test_a_full_ring_loses_lines_and_counts_them(ring, tmp_path, family, size, captured):
    """Lines the full ring refuses are counted, and the count logged. A record holds the
    smallest capture class of the packet's family that the packet fits, or the largest:
    how many records fit says which it took."""
    udp = Packet(SRC[family], DST[family], "udp").build(1, 1)
    packet = Packet(SRC[family], DST[family], "udp", payload_len=16 + size - len(udp)).build(1, 1)
    assert len(packet) == size
    table = log_table(ruleset("-A OUTPUT -j LOG"), ring, family)
    ring.set_budget(2 * klog.RING_SIZE)   # no share to keep: the ring is the limit
    fit = klog.RING_SIZE // (klog.record_size(captured) + 8)   # each record has an 8-byte header
    try:
        bpf.nf_test_run(table.hooks[Hook.LOCAL_OUT].prog_fd, Hook.LOCAL_OUT, packet,
                        repeat=fit + 500)
    finally:
        table.close()
    written, notes, sink = drained(ring, tmp_path)
    assert written == fit
    assert ring.dropped() == 500
    assert notes == ["LOG: 500 lines lost (the ring buffer was full), 500 since start"]
    src = ipaddress.ip_address(SRC[family]).exploded.encode()
    assert sink.count(b"<4>IN= OUT=lo SRC=" + src + b" ") == fit


def test_a_namespace_has_its_share_of_the_ring_in_flight(ring, tmp_path):
    """One namespace (TEST_RUN's, inum 0) may have at most its share of the ring in
    flight: what it writes beyond is refused, counted as its own loss, and the rest
    of the ring stays free for the lines of the others. Drained, its lines are
    credited back and it may write a share again."""
    family = Family.IPV4
    packet = Packet(SRC[family], DST[family], "udp").build(1, 1)
    charge = klog.record_size(192) + 8               # 8-byte header, 8-aligned already
    share = klog.share_of(1)
    assert ring.budget() == klog.share_of(0) == klog.RING_SIZE // 2
    assert share == klog.RING_SIZE // 2 and klog.RING_SIZE // charge > 2 * (share // charge)
    table = log_table(ruleset("-A OUTPUT -j LOG"), ring, family)
    try:
        run = table.hooks[Hook.LOCAL_OUT].prog_fd
        flood = klog.RING_SIZE // charge + 100        # more than the whole ring
        bpf.nf_test_run(run, Hook.LOCAL_OUT, packet, repeat=flood)
        written, notes, _ = drained(ring, tmp_path)
        fits = share // charge
        assert written == fits and ring.dropped() == 0, "the ring itself filled up"
        assert notes == [f"LOG: {flood - fits} lines lost (netns 0 had its share of the "
                         f"ring in flight), {flood - fits} since start"]
        # drained and nothing in flight: its entry is forgotten, its share whole again
        bpf.nf_test_run(run, Hook.LOCAL_OUT, packet, repeat=fits)
        assert drained(ring, tmp_path)[:2] == (fits, [])
    finally:
        table.close()


def test_the_initial_namespace_is_known_on_every_kernel(monkeypatch, tmp_path):
    """nf_log_allowed(): with nf_log_all_netns off only the initial namespace logs. Its
    inode is PROC_NET_INIT_INO from Linux 6.18 only (Debian's 6.12 allocates it at
    boot): the writer takes init's, whatever it is. Here the "initial namespace" is a
    file's inode, as a kernel before 6.18 would have any."""
    init = tmp_path / "init-netns"
    init.write_bytes(b"")
    monkeypatch.setattr(klog, "INIT_NETNS", str(init), raising=False)
    inum = os.stat(init).st_ino
    assert inum != klog.PROC_NET_INIT_INO
    packet = Packet("10.0.0.1", "10.0.0.2", "udp").build(1, 1)

    def record(netns: int, level: int) -> klog.Record:
        raw = bytearray(klog.record_size(len(packet)))
        struct.pack_into("<IIIBB", raw, 0, netns, 0, len(packet), level, 0)
        struct.pack_into("<H", raw, klog.R_CAPTURED, len(packet))
        raw[klog.R_FAMILY] = Family.IPV4
        raw[klog.R_OUT:klog.R_OUT + 2] = b"lo"
        raw[klog.R_PACKET:klog.R_PACKET + len(packet)] = packet
        return klog.Record(bytes(raw))

    class Ring:     # records of the initial namespace and of another one
        def records(self):
            return iter([record(inum, 4), record(klog.PROC_NET_INIT_INO, 6)])

        def newly_dropped(self):
            return 0

        def lost_over_share(self):
            return {}

    notes, sink = [], tmp_path / "kmsg"
    sink.write_bytes(b"")
    writer = klog.KernelLog(Ring(), notes.append, kmsg=str(sink))
    try:
        with sysctls({NF_LOG_ALL_NETNS: "0"}):
            assert writer.drain() == 1
    finally:
        writer.close()
    assert sink.read_bytes().startswith(b"<4>IN= OUT=lo SRC=10.0.0.1 ") and notes == []


@FAMILIES
def test_log_needs_a_ring(family):
    err = ours(replace_blob(ruleset("-A OUTPUT -j LOG"), family=family), family=family)
    assert err.errno == errno.EOPNOTSUPP and "log ring" in str(err)


def line_of(packet: bytes, level: int = 5) -> tuple[int, bytes]:
    """format_line() of the record an OUTPUT LOG rule would write for an IPv4 `packet`."""
    record = bytearray(klog.record_size(len(packet)))
    struct.pack_into("<IIIBB", record, 0, klog.PROC_NET_INIT_INO, 0, len(packet), level, 0)
    struct.pack_into("<H", record, klog.R_CAPTURED, len(packet))
    record[klog.R_FAMILY] = Family.IPV4
    record[klog.R_OUT:klog.R_OUT + 2] = b"lo"
    record[klog.R_PACKET:klog.R_PACKET + len(packet)] = packet
    return klog.format_line(klog.Record(bytes(record)))


def test_a_packet_too_short_for_its_headers_is_logged_as_the_kernel_does():
    """The TRUNCATED/INCOMPLETE spellings come from skb->len, not from what was copied.
    (The kernel's raw sockets set an IPv4 total length themselves, so this one is not
    sent through the kernel; IPv6's are, below.)"""
    packet = Packet("10.0.0.1", "10.0.0.2", "tcp").build(1, 1)[:30]
    assert line_of(packet) == (5, b"IN= OUT=lo SRC=10.0.0.1 DST=10.0.0.2 LEN=56 TOS=0x00 "
                                  b"PREC=0x00 TTL=64 ID=1 PROTO=TCP INCOMPLETE [10 bytes] ")


def test_tcp_ae_before_the_kernel_named_it(monkeypatch):
    """Kernels whose struct tcphdr has no AE bit (Debian's 6.12) count it among the
    reserved bits and print no AE (nf_log_dump_tcp_header() with TCP_RESERVED_BITS
    0x0F000000); this machine's prints the other form, checked below with the kernel."""
    monkeypatch.setattr(klog, "tcp_has_ae", lambda: False)
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, (5 << 4) | 0x0F, 0x02, 100, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, bytes([127, 0, 0, 1]),
                     bytes([127, 0, 0, 1]))
    assert line_of(ip + tcp)[1] == (b"IN= OUT=lo SRC=127.0.0.1 DST=127.0.0.1 LEN=40 TOS=0x00 "
                                    b"PREC=0x00 TTL=64 ID=1 PROTO=TCP SPT=1 DPT=2 WINDOW=100 "
                                    b"RES=0x3c SYN URGP=0 ")


# ------------------------------------------- crafted packets, beside the kernel's LOG
#
# The same bytes through the kernel's LOG target (a raw socket writing the whole IP
# header in a netns whose routes all go out of lo, so its lines say OUT=lo as TEST_RUN's
# do) and through bpfilter's under TEST_RUN: packets no stack would send, for the corners
# of the kernel's dump.

CRAFTED_RULES = ruleset('-A OUTPUT -j LOG --log-prefix "crafted: "',
                        '-A OUTPUT -j LOG --log-prefix "crafted-all: " --log-level 6 '
                        "--log-ip-options --log-tcp-sequence --log-tcp-options")
CRAFTED_LINE = re.compile(r"crafted(-all)?: IN=")


def tcp_with_flag_bits(family: Family) -> bytes:
    """A tcp SYN whose reserved bits and AE are all set, which no Packet sets."""
    pkt = bytearray(Packet(SRC[family], DST[family], "tcp", sport=1, dport=2).build(1, 1))
    pkt[len(pkt) - 16 - 20 + 12] |= 0x0F
    return bytes(pkt)


def with_payload_len(pkt: bytes, value: int) -> bytes:
    return pkt[:4] + struct.pack("!H", value) + pkt[6:]


def six(*args, **fields) -> bytes:
    return Packet(SRC[Family.IPV6], DST[Family.IPV6], *args, **fields).build(1, 1)


PADS = tuple(pad_n(200) for _ in range(4))     # 800 bytes of destination options
QUOTED = Packet(DST[Family.IPV6], SRC[Family.IPV6], "tcp", tcp_options=bytes(40),
                ext=[HopByHop(), DestinationOptions(PADS), Routing(4, 1, (SRC[Family.IPV6],) * 4)])
CRAFTED = {
    Family.IPV4: [tcp_with_flag_bits(Family.IPV4)],
    Family.IPV6: [
        tcp_with_flag_bits(Family.IPV6),
        six("tcp", tos=0xFF, flow_label=0xFFFFF, tcp_options=b"\x01" * 40, tcp_doff=15,
            payload_len=0)[:40 + 30],                   # OPT (TRUNCATED)
        # the payload length as written: 0 (not gso) is LEN=40, behind hop-by-hop
        # options too (without a jumbo payload option, which lo would answer, looped
        # back, with a parameter problem through OUTPUT); one past the packet is believed
        with_payload_len(six("tcp"), 0),
        with_payload_len(six("udp", ext=[HopByHop()]), 0),
        with_payload_len(six("udp", ext=[DestinationOptions(), Routing()]), 1000),
        six("tcp", payload_len=0)[:40],                 # INCOMPLETE [0 bytes]
        six("ipv6-nonxt", ext=[HopByHop()])[:41],       # TRUNCATED
        six("udp", ext=[HopByHop(), DestinationOptions((Option(0x1E, b"x"),)),
                        Routing(0, 1, (SRC[Family.IPV6],)), Fragment(more=True),
                        AuthenticationHeader(spi=0xFFFFFFFF), DestinationOptions()]),
        six("udp", ext=[Fragment(offset=8191, more=True)]),
        six("ipv6-nonxt", ext=[Fragment(offset=1)]),
        six(50, ext=[Fragment(offset=1)]),              # a later fragment's ESP
        six("ipv6-nonxt", ext=[DestinationOptions()]),
        six(136, payload_len=8),                        # UDP-Lite
        six("tcp", ext=[Routing(4, 3, (DST[Family.IPV6],) * 4, type_data=bytes([3, 0, 0, 0]))]),
        # ICMPv6: every type dump_ipv6_packet() names, an error quoting an error (no second
        # level), and one quoting 800 bytes of extension headers before its tcp header
        *(six("icmp", icmp_type=t, icmp_code=c, icmp_rest=r) for t, c, r in (
            (129, 0, 0xFFFF0001), (130, 0, 0), (131, 0, 0), (132, 0, 0), (133, 0, 0),
            (200, 7, 0), (2, 0, 0xFFFFFFFF), (4, 2, 0xFFFFFFFF))),
        icmpv6_error(SRC[Family.IPV6], DST[Family.IPV6], Packet(
            DST[Family.IPV6], SRC[Family.IPV6], "icmp", icmp_type=1,
            quoted=Packet(SRC[Family.IPV6], DST[Family.IPV6], "udp"))).build(1, 1),
        icmpv6_error(SRC[Family.IPV6], DST[Family.IPV6], QUOTED, icmp_type=3).build(1, 1),
        # a line longer than nf_log_buf's 1019 bytes: "OPT ( ) " for each of 130 headers
        six("udp", ext=[DestinationOptions()] * 130),
    ],
}


def kernel_lines(netns: str, family: Family, rules: str, packets: list[bytes]
                 ) -> list[tuple[int, str]]:
    """(level, text) of the kernel LOG target's lines for `packets` sent out of OUTPUT."""
    done = subprocess.run(["ip", "netns", "exec", netns, RESTORE[family]], input=rules,
                          text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    domain = socket.AF_INET if family is Family.IPV4 else socket.AF_INET6
    dst_at = slice(16, 20) if family is Family.IPV4 else slice(24, 40)
    per_packet = rules.count("-j LOG")
    kmsg = Kmsg()
    try:
        with entered(netns):
            with socket.socket(domain, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
                for p in packets:
                    s.sendto(p, (socket.inet_ntop(domain, p[dst_at]), 0))

        def logged(lines):
            return [(level, text) for f, level, text in lines
                    if f == KERNEL and CRAFTED_LINE.match(text)]
        return logged(kmsg.wait(lambda lines: len(logged(lines)) >= per_packet * len(packets)))
    finally:
        kmsg.close()


def our_lines(ring, family: Family, rules: str, packets: list[bytes]) -> list[tuple[int, str]]:
    table = log_table(rules, ring, family)
    try:
        for p in packets:
            table.test_run(Hook.LOCAL_OUT, p)
    finally:
        table.close()
    return [(level, text.decode()) for level, text in map(klog.format_line, ring.records())]


@FAMILIES
def test_crafted_packets_lines_are_the_kernels(kernel_netns, ring, family):
    packets = CRAFTED[family]
    with logging_everywhere():
        kernel = kernel_lines(kernel_netns, family, CRAFTED_RULES, packets)
    ours = our_lines(ring, family, CRAFTED_RULES, packets)
    assert len(kernel) == 2 * len(packets)
    assert ours == kernel, "\n".join(f"kernel: {k}\nours:   {o}" for k, o in zip(kernel, ours)
                                      if k != o) or (kernel, ours)


def test_a_line_reading_past_the_capture_is_lost_and_counted(kernel_netns, ring, tmp_path):
    """An IPv6 header chain running past the 1280 bytes a record holds: the kernel
    prints the line; bpfilter cannot rebuild it, so writes none and says so."""
    packet = six("tcp", ext=[DestinationOptions(PADS), DestinationOptions(PADS)])
    with logging_everywhere():
        assert len(kernel_lines(kernel_netns, Family.IPV6, CRAFTED_RULES, [packet])) == 2
    table = log_table(CRAFTED_RULES, ring, Family.IPV6)
    try:
        table.test_run(Hook.LOCAL_OUT, packet)
    finally:
        table.close()
    written, notes, sink = drained(ring, tmp_path)
    assert written == 0
    assert notes == ["LOG: 2 lines lost (the line reads packet bytes past the 1280 copied), "
                     "2 since start"]
    assert sink == b""


def test_every_line_reaches_the_kernel_log_on_a_stock_system(ring):
    """/dev/kmsg drops a writer's lines past 10 in 5 seconds through one open file
    unless kernel.printk_devkmsg=on (a stock system has "ratelimit"), and the kernel's
    own LOG lines are not rate-limited: bpfilter's writer gets every line of a burst
    into the kernel log."""
    tag = f"burst-{os.getpid()}: "
    table = log_table(ruleset(f'-A OUTPUT -j LOG --log-prefix "{tag}"'), ring, Family.IPV4)
    try:
        for _ in range(35):
            table.test_run(Hook.LOCAL_OUT, UDP[Family.IPV4])
    finally:
        table.close()
    kmsg, notes = Kmsg(), []
    writer = klog.KernelLog(ring, notes.append)
    try:
        with sysctls({NF_LOG_ALL_NETNS: "1", PRINTK_DEVKMSG: "ratelimit"}):
            assert writer.drain() == 35
        lines = kmsg.wait(lambda lines: len([t for *_, t in lines if t.startswith(tag)]) >= 35)
    finally:
        writer.close()
        kmsg.close()
    assert len([t for *_, t in lines if t.startswith(tag)]) == 35, lines
    assert not [t for *_, t in lines if "suppressed" in t], lines
    assert notes == []


def test_no_line_is_written_while_dev_kmsg_takes_none(ring, tmp_path):
    """With kernel.printk_devkmsg=off /dev/kmsg takes nothing from userspace (the
    service then refuses LOG rules); lines already in the ring are counted lost."""
    table = log_table(ruleset("-A OUTPUT -j LOG"), ring, Family.IPV4)
    try:
        table.test_run(Hook.LOCAL_OUT, UDP[Family.IPV4])
    finally:
        table.close()
    written, notes, sink = drained(ring, tmp_path, devkmsg="off")
    assert written == 0
    assert notes == ["LOG: 1 lines lost (kernel.printk_devkmsg is 'off'), 1 since start"]
    assert sink == b""


@FAMILIES
def test_log_listed_as_iptables_lists_it(kernel_netns, family):
    listing_agrees(kernel_netns, Case("LOG", """
        :X -
        -A INPUT -p tcp -j LOG --log-prefix "test: " --log-level 1 --log-tcp-sequence --log-tcp-options --log-ip-options --log-macdecode
        -A INPUT -j LOG
        -A X -j LOG --log-prefix "a b" --log-level 7
        """, [], family=family))


# ------------------------------------------- a real flow, both LOGs in one namespace

FLOW_ADDRESSES = {Family.IPV4: ("10.99.0.1", "10.99.0.2", 24),
                  Family.IPV6: ("2001:db8:99::1", "2001:db8:99::2", 64)}
FLOW_FLAGS = "--log-tcp-sequence --log-tcp-options --log-ip-options"
FLOW_RULES = ruleset(f'-A OUTPUT -p tcp -j LOG --log-prefix "flow: " {FLOW_FLAGS}')
MTU = 1500


def tcp_transfer(tx: str, rx: str, family: Family, size: int) -> None:
    """`size` bytes over TCP from tx to rx, closed at both ends."""
    domain = socket.AF_INET if family is Family.IPV4 else socket.AF_INET6
    here, there, _ = FLOW_ADDRESSES[family]
    with entered(rx):
        listener = socket.socket(domain, socket.SOCK_STREAM)
    with listener:
        listener.bind((there, 5001))
        listener.listen()
        received = []

        def serve():
            conn, _ = listener.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    received.append(len(chunk))
        server = threading.Thread(target=serve)
        server.start()
        with entered(tx):
            sender = socket.socket(domain, socket.SOCK_STREAM)
        with sender:
            sender.connect((there, 5001))
            sender.sendall(bytes(size))
        server.join(timeout=30)
    assert sum(received) == size


@FAMILIES
def test_a_real_tcp_flows_lines_are_the_kernels(ring, family):
    """A TCP transfer between two namespaces, logged at the sender's OUTPUT by the
    kernel's LOG target and by bpfilter's, both attached in that namespace: the same
    skbs get the same lines. Segmentation offload makes most of them larger than the
    MTU (tcp sets gso only then), which the records' gso state must say: it is what
    LEN= comes from for a BIG TCP packet, whose length field is 0. (BIG TCP itself,
    gso_max_size past 64k on the veth, gave no larger skbs when tried.)"""
    here, there, prefix = FLOW_ADDRESSES[family]
    with namespaces.scratch("bpft-tx") as tx, namespaces.scratch("bpft-rx") as rx:
        with namespaces.netlink(tx) as ipr:
            ipr.link("add", ifname="vt", kind="veth", peer={"ifname": "vr", "net_ns_fd": rx})
        for ns, dev, address in ((tx, "vt", here), (rx, "vr", there)):
            with namespaces.netlink(ns) as ipr:
                index = ipr.link_lookup(ifname=dev)[0]
                ipr.addr("add", index=index, address=address, prefixlen=prefix,
                         flags=0x02)   # IFA_F_NODAD
                ipr.link("set", index=index, state="up", mtu=MTU)
        # the kernel's LOG in mangle, whose hook runs just before filter's: a BPF
        # netfilter link may not share its hook's priority (EBUSY), filter's included
        done = subprocess.run(["ip", "netns", "exec", tx, COMMAND[family], "-t", "mangle", "-A",
                               "OUTPUT", "-p", "tcp", "-j", "LOG", "--log-prefix", "flow: ",
                               *FLOW_FLAGS.split()], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        table = load_filter_table(replace_blob(FLOW_RULES, family=family), tx,
                                  environment=ring.maps(), family=family)
        try:
            with logging_everywhere():
                kmsg = Kmsg()
                try:
                    tcp_transfer(tx, rx, family, 4 << 20)
                    seen = []    # until the kernel's lines stop coming
                    while len(seen) < 2 or seen[-1] != seen[-2]:
                        seen.append(len(kmsg.read()))
                        time.sleep(0.1)
                    kernel = [(level, text) for f, level, text in kmsg.read()
                              if f == KERNEL and text.startswith("flow: IN=")]
                finally:
                    kmsg.close()
        finally:
            table.close()
    records = list(ring.records())
    ours = [(level, text.decode()) for level, text in map(klog.format_line, records)]
    assert ours == kernel, "\n".join(f"kernel: {k}\nours:   {o}" for k, o in zip(kernel, ours)
                                     if k != o) or (len(kernel), len(ours))
    assert [r.gso_tcp() for r in records] == [r.skb_len > MTU for r in records]
    assert any(r.skb_len > MTU for r in records)
