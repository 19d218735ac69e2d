"""REJECT without bpfilter.ko: the answers the service sends, byte for byte the
kernel's REJECT target's, for real packets between namespaces.

Two pairs of namespaces with the same addresses: in one the kernel's iptables holds
the rules, in the other bpfilter's programs (attached, with the service's ring
drained by its Answers). The same packets go from each client; what comes back on
the client's link is compared (only the IP id of ICMP errors, which the kernel
draws from a hashed counter, and the checksum over it are left out), and real
sockets see the same errors.
"""
import contextlib
import select
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from bpfilter import klog
from bpfilter.answers import Answers, checksum
from bpfilter.loader import load_filter_table
from bpfilter.model import Family
from bpfilter.netns import entered
from bpfilter_lab import namespaces
from bpfilter_lab.scratch import replace_blob

from verdicts import COMMAND

pytestmark = pytest.mark.kernel

CLIENT, SERVER = "10.77.0.1", "10.77.0.2"
RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 81 -j REJECT --reject-with tcp-reset
-A INPUT -p udp --dport 82 -j REJECT
-A INPUT -p udp --dport 83 -j REJECT --reject-with icmp-host-prohibited
-A INPUT -p tcp --dport 84 -j REJECT --reject-with icmp-admin-prohibited
-A INPUT -p icmp -j REJECT --reject-with icmp-net-unreachable
-A INPUT -p 253 -j REJECT --reject-with icmp-proto-unreachable
COMMIT
"""
ETH_P_ALL = 0x0003


def _ip4(proto: int, payload: bytes, ident: int = 7, tos: int = 0, ttl: int = 64,
         src: str = CLIENT, dst: str = SERVER) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, 0, ttl, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def _pseudo(proto: int, length: int) -> bytes:
    return socket.inet_aton(CLIENT) + socket.inet_aton(SERVER) + struct.pack("!HH", proto, length)


def tcp(dport: int, flags: int = 0x02, seq: int = 1000, ack: int = 0, data: bytes = b"",
        bad_checksum: bool = False, tos: int = 0) -> bytes:
    segment = struct.pack("!HHIIBBHHH", 40000, dport, seq, ack, 5 << 4, flags, 512, 0, 0) + data
    check = checksum(_pseudo(6, len(segment)) + segment) ^ (0x5555 if bad_checksum else 0)
    return _ip4(6, segment[:16] + struct.pack("!H", check) + segment[18:], tos=tos)


def udp(dport: int, data: bytes = b"hello", zero_checksum: bool = False,
        bad_checksum: bool = False) -> bytes:
    datagram = struct.pack("!HHHH", 40001, dport, 8 + len(data), 0) + data
    check = 0 if zero_checksum else checksum(_pseudo(17, len(datagram)) + datagram) or 0xFFFF
    if bad_checksum:
        check ^= 0x5555
    return _ip4(17, datagram[:6] + struct.pack("!H", check) + datagram[8:])


def icmp(kind: int, code: int = 0, data: bytes = b"ping") -> bytes:
    message = struct.pack("!BBHI", kind, code, 0, 0x12340001) + data
    return _ip4(1, message[:2] + struct.pack("!H", checksum(message)) + message[4:])


PACKETS = [
    ("syn to a tcp-reset port", tcp(81)),
    ("ack with data", tcp(81, flags=0x18, seq=5000, ack=777, data=b"x" * 100)),
    ("fin without ack", tcp(81, flags=0x01, seq=42)),
    ("rst gets nothing", tcp(81, flags=0x04)),
    ("bad tcp checksum gets nothing", tcp(81, bad_checksum=True)),
    ("udp port unreachable", udp(82)),
    ("udp without checksum", udp(82, zero_checksum=True, data=b"q" * 700)),
    ("bad udp checksum gets nothing", udp(82, bad_checksum=True)),
    ("host prohibited", udp(83, data=b"z" * 1000)),
    ("tcp admin prohibited, tos kept", tcp(84, tos=0xB8)),
    ("an echo request is answered", icmp(8)),
    ("an icmp error is not", icmp(3, 3, data=_ip4(17, b"\0" * 8, src=SERVER, dst=CLIENT))),
    ("protocol 253, unverifiable, gets nothing", _ip4(253, b"abcd")),
]


# -- IPv6 ---------------------------------------------------------------------

CLIENT6, SERVER6 = "fd77::1", "fd77::2"
RULES6 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 81 -j REJECT --reject-with tcp-reset
-A INPUT -p udp --dport 82 -j REJECT
-A INPUT -p udp --dport 83 -j REJECT --reject-with icmp6-adm-prohibited
-A INPUT -p tcp --dport 84 -j REJECT --reject-with icmp6-addr-unreachable
-A INPUT -p ipv6-icmp --icmpv6-type echo-request -j REJECT --reject-with icmp6-no-route
-A INPUT -p ipv6-icmp --icmpv6-type destination-unreachable -j REJECT
-A INPUT -p 253 -j REJECT --reject-with icmp6-policy-fail
COMMIT
"""


def _ip6(proto: int, payload: bytes, src: str = CLIENT6, dst: str = SERVER6,
         tclass: int = 0) -> bytes:
    return (struct.pack("!IHBB", 0x60000000 | tclass << 20, len(payload), proto, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + payload)


def _pseudo6(proto: int, length: int, src: str = CLIENT6, dst: str = SERVER6) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!II", length, proto))


def tcp6(dport: int, flags: int = 0x02, seq: int = 1000, ack: int = 0, data: bytes = b"",
         bad_checksum: bool = False) -> bytes:
    segment = struct.pack("!HHIIBBHHH", 40000, dport, seq, ack, 5 << 4, flags, 512, 0, 0) + data
    check = checksum(_pseudo6(6, len(segment)) + segment) ^ (0x5555 if bad_checksum else 0)
    return _ip6(6, segment[:16] + struct.pack("!H", check) + segment[18:])


def udp6(dport: int, data: bytes = b"hello", bad_checksum: bool = False) -> bytes:
    datagram = struct.pack("!HHHH", 40001, dport, 8 + len(data), 0) + data
    check = (checksum(_pseudo6(17, len(datagram)) + datagram) or 0xFFFF) ^ (
        0x5555 if bad_checksum else 0)
    return _ip6(17, datagram[:6] + struct.pack("!H", check) + datagram[8:])


def icmp6(kind: int, code: int = 0, data: bytes = b"ping") -> bytes:
    message = struct.pack("!BBHI", kind, code, 0, 0x12340001) + data
    check = checksum(_pseudo6(58, len(message)) + message)
    return _ip6(58, message[:2] + struct.pack("!H", check) + message[4:])


def fragment6(payload_proto: int, offset: int, data: bytes) -> bytes:
    return _ip6(44, struct.pack("!BBHI", payload_proto, 0, offset << 3, 99) + data)


PACKETS6 = [
    ("syn to a tcp-reset port", tcp6(81)),
    ("ack with data", tcp6(81, flags=0x18, seq=5000, ack=777, data=b"x" * 100)),
    ("syn+fin", tcp6(81, flags=0x03, seq=42)),
    ("rst gets nothing", tcp6(81, flags=0x04)),
    ("bad tcp checksum gets nothing", tcp6(81, bad_checksum=True)),
    ("udp port unreachable", udp6(82)),
    ("bad udp checksum gets nothing", udp6(82, bad_checksum=True)),
    ("adm prohibited, a long quote", udp6(83, data=b"z" * 1400)),
    ("addr unreachable", tcp6(84)),
    ("an echo request is answered", icmp6(128)),
    ("an icmpv6 error is not", icmp6(1, 4, data=_ip6(17, b"\0" * 8, src=SERVER6, dst=CLIENT6))),
    ("protocol 253 verified against the pseudo-header, fails", _ip6(253, b"abcd")),
    ("a later fragment gets nothing", fragment6(17, 100, b"y" * 64)),
]


def _comparable4(packet: bytes) -> bytes:
    """The answer less what the kernel draws at random, an ICMP error's IP id (its
    header checksum covers it), and a reset's checksum: the kernel leaves the
    reset's to the device (CHECKSUM_PARTIAL), so on a veth it holds the pseudo-
    header's sum only (ours must be whole: see _reset_checksum_whole)."""
    if packet[9] == 1:
        return packet[:4] + b"\0\0" + packet[6:10] + b"\0\0" + packet[12:]
    if packet[9] == 6:
        return packet[:36] + b"\0\0" + packet[38:]
    return packet


def _reset_checksum_whole(packet: bytes) -> bool:
    pseudo = packet[12:20] + struct.pack("!HH", 6, len(packet) - 20)
    return checksum(pseudo + packet[20:]) == 0


@dataclass(frozen=True)
class Setup:
    """What differs between the families' exchanges."""
    domain: int
    client: str
    server: str
    prefix: int
    ethertype: bytes
    rules: str
    comparable: Callable[[bytes], bytes]

    def answer(self, ip: bytes) -> bool:
        """An answer of the server's (IPv6: not neighbour discovery)."""
        if self.domain == socket.AF_INET:
            return True
        return ip[8:24] == socket.inet_pton(socket.AF_INET6, self.server) and not (
            ip[6] == 58 and ip[40] in (133, 134, 135, 136))

    def icmp_error(self, ip: bytes) -> bool:
        return ip[9] == 1 if self.domain == socket.AF_INET else ip[6] == 58 and ip[40] == 1


SETUPS = {Family.IPV4: Setup(socket.AF_INET, CLIENT, SERVER, 24, b"\x08\x00", RULES,
                             _comparable4),
          Family.IPV6: Setup(socket.AF_INET6, CLIENT6, SERVER6, 64, b"\x86\xdd", RULES6,
                             lambda packet: packet)}
FAMILIES = pytest.mark.parametrize("family", list(SETUPS), ids=["ipv4", "ipv6"])


def _wire(client: str, server: str, setup: Setup) -> None:
    with namespaces.netlink(client) as ipr:
        ipr.link("add", ifname="vc", kind="veth", peer={"ifname": "vs", "net_ns_fd": server})
    for ns, dev, address in ((client, "vc", setup.client), (server, "vs", setup.server)):
        with namespaces.netlink(ns) as ipr:
            index = ipr.link_lookup(ifname=dev)[0]
            ipr.addr("add", index=index, address=address, prefixlen=setup.prefix,
                     **({"flags": 0x02} if setup.domain == socket.AF_INET6 else {}))  # NODAD
            ipr.link("set", index=index, state="up")


def _exchange(client: str, packets: list[bytes], setup: Setup, settle: float = 0.3,
              together: bool = False) -> list[list[bytes]]:
    """Each packet sent from the client (`together`: all at once); the server's
    packets that came back for each (for all)."""
    with entered(client):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sender = socket.socket(setup.domain, socket.SOCK_RAW, socket.IPPROTO_RAW)
    answers = []
    with capture, sender:
        capture.bind(("vc", 0))
        for batch in ([packets] if together else [[p] for p in packets]):
            for packet in batch:
                sender.sendto(packet, (setup.server, 0))
            got, end = [], time.monotonic() + settle
            while (left := end - time.monotonic()) > 0:
                if not select.select([capture], [], [], left)[0]:
                    break
                frame, address = capture.recvfrom(65536)
                if address[2] != socket.PACKET_OUTGOING and frame[12:14] == setup.ethertype \
                        and setup.answer(frame[14:]):
                    got.append(frame[14:])
            answers.append(got)
    return answers


def _warm_up(client: str, setup: Setup) -> None:
    """Until the server answers (a reset: no ICMP error, which would spend the
    peer's tokens): neighbours known both ways, so no answer waits on discovery."""
    reset = tcp(81) if setup.domain == socket.AF_INET else tcp6(81)
    for _ in range(50):
        if _exchange(client, [reset], setup, settle=0.1)[0]:
            return
    raise AssertionError("the server never answered")


@pytest.fixture
def drained_ring():
    """The service's ring, drained by Answers while the test runs; its notes."""
    ring = klog.LogRing.create()
    notes = []
    writer = klog.KernelLog(ring, notes.append, kmsg="/dev/null", answers=Answers())
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            if select.select([ring], [], [], 0.05)[0]:
                writer.drain()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    yield ring, notes
    stop.set()
    thread.join()
    writer.close()
    ring.close()


@contextlib.contextmanager
def kernel_and_ours(ring, family: Family):
    """(the kernel's client, ours): each a client beside a server whose REJECT rules
    are the kernel's or bpfilter's, answered by the ring's drain."""
    setup = SETUPS[family]
    with namespaces.scratch("rjkc") as kc, namespaces.scratch("rjks") as ks, \
            namespaces.scratch("rjbc") as bc, namespaces.scratch("rjbs") as bs:
        _wire(kc, ks, setup)
        _wire(bc, bs, setup)
        done = subprocess.run(["ip", "netns", "exec", ks, f"{COMMAND[family]}-restore"],
                              input=setup.rules, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        table = load_filter_table(replace_blob(setup.rules, family=family), bs,
                                  environment=ring.maps(klog.ANSWER_REFS), family=family)
        try:
            _warm_up(kc, setup)
            _warm_up(bc, setup)
            yield kc, bc
        finally:
            table.close()


# the packets each family's kernel answers
ANSWERED = {
    Family.IPV4: [what for what, _ in PACKETS[:3]] + [
        "udp port unreachable", "udp without checksum", "host prohibited",
        "tcp admin prohibited, tos kept", "an echo request is answered"],
    Family.IPV6: [what for what, _ in PACKETS6[:3]] + [
        "udp port unreachable", "adm prohibited, a long quote", "addr unreachable",
        "an echo request is answered"],
}


@FAMILIES
def test_answers_are_the_kernels_byte_for_byte(drained_ring, family):
    """Resets and ICMP errors for every --reject-with, and none where the kernel sends
    none (a reset, a bad checksum, an ICMP error, a later fragment, a protocol whose
    checksum cannot hold); IPv6's errors carry the flow label the kernel derives from
    the flow (the same for our socket's), its resets none."""
    ring, notes = drained_ring
    setup, packets = SETUPS[family], PACKETS if family == Family.IPV4 else PACKETS6
    with kernel_and_ours(ring, family) as (kernel_client, our_client):
        kernel = _exchange(kernel_client, [p for _, p in packets], setup)
        ours = _exchange(our_client, [p for _, p in packets], setup)
    differences = []
    for (what, _), k, o in zip(packets, kernel, ours):
        if list(map(setup.comparable, k)) != list(map(setup.comparable, o)):
            differences.append(f"{what}:\n  kernel {[p.hex() for p in k]}\n  ours   "
                               f"{[p.hex() for p in o]}")
    assert not differences, "\n".join(differences)
    assert [what for (what, _), k in zip(packets, kernel) if k] == ANSWERED[family]
    if family == Family.IPV4:
        resets = [p for answers in ours for p in answers if p[9] == 6]
        assert len(resets) == 3 and all(map(_reset_checksum_whole, resets))
    assert not notes, notes


@FAMILIES
def test_a_burst_is_answered_within_the_peers_icmp_rate_limit(drained_ring, family):
    """inet_peer_xrlim_allow(): six errors to a new peer at once, then one per
    net.ipv4.icmp_ratelimit (net.ipv6.icmp.ratelimit): the kernel's and ours, for
    ten datagrams at once."""
    ring, notes = drained_ring
    setup = SETUPS[family]
    packet = udp(82) if family == Family.IPV4 else udp6(82)
    with kernel_and_ours(ring, family) as clients:
        kernel, ours = (sum(map(setup.icmp_error, _exchange(client, [packet] * 10, setup,
                                                            settle=1.0, together=True)[0]))
                        for client in clients)
    assert kernel == ours, (kernel, ours)
    assert kernel < 10
    assert not notes, notes
