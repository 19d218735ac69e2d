"""pkttype's rule for packets a host sends itself, against the kernel.

pkttype_mt() does not take skb->pkt_type as it is for a looped-back packet
(PACKET_LOOPBACK: the copy of its own multicast or broadcast a host delivers to
itself, which crosses PREROUTING and INPUT): IPv4 calls it multicast when the
destination is a multicast address and broadcast otherwise; IPv6, which has no
broadcast, always multicast. Test runs cannot make such a packet, so real sockets
send them here, in two namespaces wired alike, one filtered by the kernel's
ip(6)tables and one by bpfilter: every entry's counters must be the same, and the
rules counting looped-back copies must have counted them as the kernel's family
rule says.

Each namespace sends out of a veth device (a host loops multicast back to the groups
its sending device joined) whose peer is in a sink namespace without IPv6, which
answers nothing. The device starts nothing of its own: IPv6 on it has no address (no
DAD, no MLD; it still joins all-nodes, ff02::1, which is never reported), the
sockets' IPv6 source lives on lo, and nothing IPv4 sends to a group or a broadcast
needs ARP.
"""
from __future__ import annotations

import socket
import struct

import pytest

from bpfilter.loader import load_filter_table
from bpfilter.model import Family
from bpfilter.netns import entered
from bpfilter_lab import namespaces
from bpfilter_lab.backends import kernel_counters, restore_in
from bpfilter_lab.scratch import replace_blob

pytestmark = pytest.mark.kernel

PORT = 9
RULES = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp --dport {PORT} -m pkttype --pkt-type multicast
-A INPUT -p udp --dport {PORT} -m pkttype --pkt-type broadcast
-A INPUT -p udp --dport {PORT} -m pkttype --pkt-type unicast
-A INPUT -p udp --dport {PORT} -m pkttype ! --pkt-type multicast
-A OUTPUT -p udp --dport {PORT} -m pkttype --pkt-type unicast
-A OUTPUT -p udp --dport {PORT} -m pkttype ! --pkt-type unicast
COMMIT
"""
INPUT_MULTICAST, INPUT_BROADCAST, INPUT_UNICAST, OUTPUT_UNICAST = 0, 1, 2, 6

DEVICE = "pkt0"
LOCAL4, SUBNET_BROADCAST, GROUP4 = "10.9.0.1", "10.9.0.255", "224.0.0.1"
LOCAL6, GROUP6 = "2001:db8:9::1", "ff02::1"
# (destination, how many) per family: looped-back multicast, broadcast, and unicast
# to the host's own address (through lo: PACKET_HOST)
SENT = {Family.IPV4: [(GROUP4, 3), (SUBNET_BROADCAST, 2), (LOCAL4, 1)],
        Family.IPV6: [(GROUP6, 3), (LOCAL6, 1)]}


def wire(netns: str, sink: str, peer: str) -> int:
    """The device, up, its peer in `sink`; the addresses; the device's index."""
    namespaces.write_sysctls(netns, {"net.ipv6.conf.default.addr_gen_mode": 1,
                                     "net.ipv6.conf.default.accept_dad": 0})
    with namespaces.netlink(netns) as ipr:
        ipr.link("add", ifname=DEVICE, kind="veth", peer={"ifname": peer, "net_ns_fd": sink})
        index = ipr.link_lookup(ifname=DEVICE)[0]
        ipr.link("set", index=index, state="up")
        ipr.addr("add", index=index, address=LOCAL4, prefixlen=24, broadcast=SUBNET_BROADCAST)
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=LOCAL6, prefixlen=128,
                 family=socket.AF_INET6)
    return index


def send(netns: str, family: Family, index: int) -> None:
    with entered(netns):
        if family is Family.IPV4:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOCAL4))
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.bind((LOCAL6, 0))
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, struct.pack("i", index))
    with s:
        for dst, count in SENT[family]:
            for _ in range(count):
                s.sendto(b"pkttype", (dst, PORT))


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_looped_back_packets_as_the_kernel_types_them(family):
    with namespaces.scratch("bpft-pkt-k") as kernel, namespaces.scratch("bpft-pkt-b") as ours, \
            namespaces.scratch("bpft-pkt-sink") as sink:
        namespaces.write_sysctls(sink, {"net.ipv6.conf.all.disable_ipv6": 1,
                                        "net.ipv6.conf.default.disable_ipv6": 1})
        indexes = {netns: wire(netns, sink, peer)
                   for netns, peer in ((kernel, "sinkk"), (ours, "sinkb"))}
        with namespaces.netlink(sink) as ipr:
            for peer in ("sinkk", "sinkb"):
                ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], state="up")
        restore_in(kernel, RULES, family)
        table = load_filter_table(replace_blob(RULES, family=family), ours, family=family)
        try:
            for netns in (kernel, ours):
                send(netns, family, indexes[netns])
            counters = table.counters()
        finally:
            table.close()
        assert counters == kernel_counters(kernel, family=family)
    packets = [p for p, _ in counters]
    multicast, broadcast = (3, 2) if family is Family.IPV4 else (3, 0)
    assert packets[INPUT_MULTICAST] == multicast
    assert packets[INPUT_BROADCAST] == broadcast
    assert packets[INPUT_UNICAST] == 1
    # whatever they are sent to, locally sent packets are PACKET_HOST at OUTPUT
    assert packets[OUTPUT_UNICAST] == sum(n for _, n in SENT[family])
