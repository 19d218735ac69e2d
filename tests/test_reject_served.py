"""REJECT without bpfilter.ko: the answers the service sends, byte for byte the
kernel's REJECT target's, for real packets between namespaces.

Two pairs of namespaces with the same addresses: in one the kernel's iptables holds
the rules, in the other bpfilter's programs (attached, with the service's ring
drained by its Answers). The same packets go from each client; what comes back on
the client's link is compared (only the IP id of ICMP errors, which the kernel
draws from a hashed counter, and the checksum over it are left out), and real
sockets see the same errors.
"""
import errno
import select
import socket
import struct
import subprocess
import threading
import time

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


def _pair(prefix: str):
    client = namespaces.scratch(prefix + "c")
    server = namespaces.scratch(prefix + "s")
    return client, server


def _wire(client: str, server: str) -> None:
    with namespaces.netlink(client) as ipr:
        ipr.link("add", ifname="vc", kind="veth", peer={"ifname": "vs", "net_ns_fd": server})
    for ns, dev, address in ((client, "vc", CLIENT), (server, "vs", SERVER)):
        with namespaces.netlink(ns) as ipr:
            index = ipr.link_lookup(ifname=dev)[0]
            ipr.addr("add", index=index, address=address, prefixlen=24)
            ipr.link("set", index=index, state="up")


def _exchange(client: str, packets: list[bytes], settle: float = 0.3) -> list[list[bytes]]:
    """Each packet sent from the client; the IPv4 packets that came back for each."""
    with entered(client):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    answers = []
    with capture, sender:
        capture.bind(("vc", 0))
        for packet in packets:
            sender.sendto(packet, (SERVER, 0))
            got, end = [], time.monotonic() + settle
            while (left := end - time.monotonic()) > 0:
                if not select.select([capture], [], [], left)[0]:
                    break
                frame, address = capture.recvfrom(65536)
                if address[2] != socket.PACKET_OUTGOING and frame[12:14] == b"\x08\x00":
                    got.append(frame[14:])
            answers.append(got)
    return answers


def _comparable(packet: bytes) -> bytes:
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


def test_answers_are_the_kernels_byte_for_byte(drained_ring):
    ring, notes = drained_ring
    with namespaces.scratch("rjkc") as kc, namespaces.scratch("rjks") as ks, \
            namespaces.scratch("rjbc") as bc, namespaces.scratch("rjbs") as bs:
        _wire(kc, ks)
        _wire(bc, bs)
        done = subprocess.run(["ip", "netns", "exec", ks, f"{COMMAND[Family.IPV4]}-restore"],
                              input=RULES, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        table = load_filter_table(replace_blob(RULES), bs, environment=ring.maps(
            klog.ANSWER_REFS))
        try:
            kernel = _exchange(kc, [p for _, p in PACKETS])
            ours = _exchange(bc, [p for _, p in PACKETS])
        finally:
            table.close()
    differences = []
    for (what, _), k, o in zip(PACKETS, kernel, ours):
        if list(map(_comparable, k)) != list(map(_comparable, o)):
            differences.append(f"{what}:\n  kernel {[p.hex() for p in k]}\n  ours   "
                               f"{[p.hex() for p in o]}")
    assert not differences, "\n".join(differences)
    answered = [what for (what, _), k in zip(PACKETS, kernel) if k]
    assert len(answered) == 8, answered
    resets = [p for answers in ours for p in answers if p[9] == 6]
    assert len(resets) == 3 and all(map(_reset_checksum_whole, resets))
    assert not notes, notes
