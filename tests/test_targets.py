"""Target extensions: LOG and REJECT as the kernel checks them, LOG's verdicts,
counters and lines through TEST_RUN, and REJECT's refusal.

(LOG lines compared with the kernel's own for real packets: test_service.py,
test_log_lines_are_the_kernels.)
"""
import errno
import struct
import subprocess

import pytest

from bpfilter import klog
from bpfilter.abi import codec
from bpfilter.decode import table_from_raw
from bpfilter.abi.ipv4 import IPT_INV_PROTO
from bpfilter.abi.xtables import ipt_replace
from bpfilter.bpf import syscall as bpf
from bpfilter.errors import BpfilterError
from bpfilter.listing import render
from bpfilter.loader import load_filter_table
from bpfilter.model import Hook
from bpfilter.service import revision_answer
from bpfilter.abi import ipv4
from bpfilter.abi import xtables as X
from bpfilter_lab.packets import Packet
from bpfilter_lab.scratch import replace_blob

from kmsg import NF_LOG_ALL_NETNS, PRINTK_DEVKMSG, logging_everywhere, sysctls
from test_refusals import kernel_refusal

pytestmark = pytest.mark.kernel

HEADER = ipt_replace.sizeof()
TARGET_HEADER = 32                 # struct xt_entry_target, before its payload
IP_PROTO, IP_INVFLAGS = 80, 83     # in struct ipt_ip


def ruleset(*lines: str) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":X - [0:0]", *lines, "COMMIT", ""])


def patched(text: str, rule: int, payload_at: int, value: bytes, ip_at: "int | None" = None,
            ip_value: "bytes | None" = None) -> bytes:
    """The blob of `text` with entry `rule`'s target payload (and optionally its ipt_ip)
    rewritten: what iptables never writes, the kernel still checks."""
    blob = bytearray(replace_blob(text))
    e = codec.parse_replace(bytes(blob)).entries[rule]
    at = HEADER + e.offset + e.target_offset + TARGET_HEADER + payload_at
    blob[at:at + len(value)] = value
    if ip_at is not None:
        blob[HEADER + e.offset + ip_at:HEADER + e.offset + ip_at + len(ip_value)] = ip_value
    return bytes(blob)


def ours(blob: bytes, log=None) -> BpfilterError:
    with pytest.raises(BpfilterError) as info:
        load_filter_table(blob, attach=False, environment=log and log.maps()).close()
    return info.value


BAD = [
    # (what, ruleset line, payload offset, bytes, ip offset, ip bytes, message)
    ("LOG level 8", "-A OUTPUT -j LOG", 0, b"\x08", None, None, "level 8"),
    ("LOG prefix without NUL", "-A OUTPUT -j LOG", 2, b"p" * 30, None, None, "NUL-terminated"),
    ("REJECT echo-reply", "-A OUTPUT -j REJECT", 0, b"\x04", None, None, "echo-reply"),
    ("REJECT tcp-reset without -p tcp", "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
     0, b"", IP_PROTO, b"\x11\x00", "only valid with -p tcp"),
    ("REJECT tcp-reset with ! -p tcp", "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
     0, b"", IP_INVFLAGS, bytes([IPT_INV_PROTO]), "only valid with -p tcp"),
]


def rule_entry(text: str) -> int:
    """The entry of the ruleset's only rule."""
    raw = codec.parse_replace(replace_blob(text))
    return next(e.index for e in raw.entries if e.target.name not in ("", "ERROR"))


@pytest.mark.parametrize("what, line, at, value, ip_at, ip_value, message", BAD,
                         ids=[b[0] for b in BAD])
def test_bad_payloads_get_the_kernels_errno(fresh_netns, what, line, at, value, ip_at,
                                            ip_value, message):
    text = ruleset(line)
    blob = patched(text, rule_entry(text), at, value, ip_at, ip_value)
    err = ours(blob)
    assert err.errno == errno.EINVAL, err
    assert "chain OUTPUT rule 1" in str(err) and message in str(err), err
    assert kernel_refusal(blob, fresh_netns) == errno.EINVAL


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
def test_valid_reject_is_refused_as_needing_the_module(fresh_netns, reject_with):
    blob = replace_blob(ruleset("-A INPUT -p udp -j ACCEPT", "-A INPUT -p tcp -j ACCEPT",
                                f"-A INPUT -p tcp -j REJECT --reject-with {reject_with}"))
    err = ours(blob)
    assert err.errno == errno.EOPNOTSUPP, err
    assert ("chain INPUT rule 3 (entry 2): target 'REJECT' needs bpfilter.ko (kernel module "
            f"mode) to send its {reject_with} answer") in str(err), err
    assert kernel_refusal(blob, fresh_netns) == 0   # the kernel takes it: a refusal, not a check


def test_log_uid_is_refused():
    err = ours(replace_blob(ruleset("-A OUTPUT -j LOG --log-uid")))
    assert err.errno == errno.EOPNOTSUPP
    assert "chain OUTPUT rule 1" in str(err) and "--log-uid" in str(err)


def revision(kind: str, name: str, rev: int) -> int:
    optname = ipv4.IPT_SO_GET_REVISION_MATCH if kind == "match" else ipv4.IPT_SO_GET_REVISION_TARGET
    payload = X.xt_get_revision.build(dict(name=name.encode().ljust(29, b"\0"), revision=rev))
    return revision_answer(ipv4.IPV4, optname, payload)[0]


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
UDP = Packet("10.0.0.1", "10.0.0.2", "udp", sport=1234, dport=53, ttl=7,
             options=b"\x94\x04\x00\x00").build(7, 1)
LINE = ("IN= OUT=lo SRC=10.0.0.1 DST=10.0.0.2 LEN=48 TOS=0x00 PREC=0x00 TTL=7 ID=7 {opt}"
        "PROTO=UDP SPT=1234 DPT=53 LEN=24 ")


@pytest.fixture
def ring():
    ring = klog.LogRing.create()
    yield ring
    ring.close()


def test_log_lines_and_the_rules_after_it(ring):
    """LOG writes its line and the packet goes on: to the user chain's LOG, then DROP;
    every rule on the way counts it."""
    table = load_filter_table(replace_blob(LOGGED), attach=False, environment=ring.maps())
    try:
        assert table.test_run(Hook.LOCAL_OUT, UDP) == 0
        counts = [c for c, _ in table.counters()]
    finally:
        table.close()
    # INPUT and FORWARD policies, OUTPUT's 3 rules and policy, X's head, LOG and RETURN
    assert counts == [0, 0, 1, 1, 1, 0, 0, 1, 1, 0]
    lines = [klog.format_line(r) for r in ring.records()]
    assert lines == [(6, ("first: " + LINE.format(opt="")).encode()),
                     (4, ("in X: " + LINE.format(opt="OPT (94040000) ")).encode())]
    assert list(ring.records()) == []   # consumed


def test_no_line_for_a_packet_log_does_not_match(ring):
    table = load_filter_table(replace_blob(LOGGED), attach=False, environment=ring.maps())
    try:
        tcp = Packet("10.0.0.1", "10.0.0.2", "tcp").build(1, 1)
        assert table.test_run(Hook.LOCAL_OUT, tcp) == 1
    finally:
        table.close()
    assert list(ring.records()) == []


def test_a_full_ring_loses_lines_and_counts_them(ring, tmp_path):
    """Lines the full ring refuses are counted, and the count logged. (TEST_RUN's hook
    state has no netns: nf_log_all_netns must let the lines through.)"""
    table = load_filter_table(replace_blob(ruleset("-A OUTPUT -j LOG")), attach=False, environment=ring.maps())
    fit = klog.RING_SIZE // (klog.RECORD_SIZE + 8)    # each record has an 8-byte header
    try:
        bpf.nf_test_run(table.hooks[Hook.LOCAL_OUT].prog_fd, Hook.LOCAL_OUT, UDP,
                        repeat=fit + 500)
    finally:
        table.close()
    notes, sink = [], tmp_path / "kmsg"
    sink.write_bytes(b"")
    writer = klog.KernelLog(ring, notes.append, kmsg=str(sink))
    try:
        with logging_everywhere():
            assert writer.drain() == fit
    finally:
        writer.close()
    assert ring.dropped() == 500
    assert notes == ["LOG: 500 lines lost (the ring buffer was full), 500 since start"]
    assert sink.read_bytes().count(b"<4>IN= OUT=lo SRC=10.0.0.1") == fit


def test_log_needs_a_ring():
    err = ours(replace_blob(ruleset("-A OUTPUT -j LOG")))
    assert err.errno == errno.EOPNOTSUPP and "log ring" in str(err)


def line_of(packet: bytes, level: int = 5) -> tuple[int, bytes]:
    """format_line() of the record an OUTPUT LOG rule would write for `packet`."""
    record = bytearray(klog.RECORD_SIZE)
    struct.pack_into("<IIIBB", record, 0, klog.PROC_NET_INIT_INO, 0, len(packet), level, 0)
    struct.pack_into("<H", record, klog.R_CAPTURED, len(packet))
    record[klog.R_OUT:klog.R_OUT + 2] = b"lo"
    record[klog.R_PACKET:klog.R_PACKET + len(packet)] = packet
    return klog.format_line(klog.Record(bytes(record)))


def test_a_packet_too_short_for_its_headers_is_logged_as_the_kernel_does():
    """The TRUNCATED/INCOMPLETE spellings come from skb->len, not from what was copied."""
    packet = Packet("10.0.0.1", "10.0.0.2", "tcp").build(1, 1)[:30]
    assert line_of(packet) == (5, b"IN= OUT=lo SRC=10.0.0.1 DST=10.0.0.2 LEN=56 TOS=0x00 "
                                  b"PREC=0x00 TTL=64 ID=1 PROTO=TCP INCOMPLETE [10 bytes] ")


def test_tcp_reserved_bits_and_ae_as_the_kernel_prints_them():
    """The lab's packets cannot set them; the expected line is the kernel's (6.18) for
    this packet sent through a LOG rule in OUTPUT."""
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, (5 << 4) | 0x0F, 0x02, 100, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, bytes([127, 0, 0, 1]),
                     bytes([127, 0, 0, 1]))
    assert line_of(ip + tcp)[1] == (b"IN= OUT=lo SRC=127.0.0.1 DST=127.0.0.1 LEN=40 TOS=0x00 "
                                    b"PREC=0x00 TTL=64 ID=1 PROTO=TCP SPT=1 DPT=2 WINDOW=100 "
                                    b"RES=0x38 AE SYN URGP=0 ")


def test_lines_the_kernel_would_rate_limit_are_counted_lost(ring, tmp_path):
    """With printk_devkmsg=ratelimit the kernel would drop most of what bpfilter writes
    to /dev/kmsg, silently: bpfilter writes none and counts them."""
    table = load_filter_table(replace_blob(ruleset("-A OUTPUT -j LOG")), attach=False, environment=ring.maps())
    try:
        table.test_run(Hook.LOCAL_OUT, UDP)
    finally:
        table.close()
    notes, sink = [], tmp_path / "kmsg"
    sink.write_bytes(b"")
    writer = klog.KernelLog(ring, notes.append, kmsg=str(sink))
    try:
        with sysctls({NF_LOG_ALL_NETNS: "1", PRINTK_DEVKMSG: "ratelimit"}):
            assert writer.drain() == 0
    finally:
        writer.close()
    assert notes == ["LOG: 1 lines lost (kernel.printk_devkmsg is not 'on'), 1 since start"]
    assert sink.read_bytes() == b""


def test_log_listed_as_iptables_lists_it(fresh_netns):
    rules = ruleset('-A INPUT -p tcp -j LOG --log-prefix "test: " --log-level 1 '
                    "--log-tcp-sequence --log-tcp-options --log-ip-options --log-macdecode",
                    "-A INPUT -j LOG", '-A X -j LOG --log-prefix "a b" --log-level 7')
    table = table_from_raw(codec.parse_replace(replace_blob(rules)))
    listed = render(table, [(0, 0)] * table.num_entries).splitlines()
    subprocess.run(["ip", "netns", "exec", fresh_netns, "iptables-legacy-restore"], input=rules,
                   text=True, check=True)
    kernel = subprocess.run(["ip", "netns", "exec", fresh_netns, "iptables-legacy", "-L", "-n"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [line.split(None, 2)[2] for line in listed if " LOG " in line]
    theirs = [line for line in kernel if line.startswith("LOG ")]
    assert len(ours) == len(theirs) == 3
    for mine, kernels in zip(ours, theirs):
        assert mine.startswith("LOG ")
        assert mine.split("0.0.0.0/0")[-1].strip() == kernels.split("0.0.0.0/0")[-1].strip()
