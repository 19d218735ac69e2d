"""-m owner against the kernel: the same OUTPUT rules in two namespaces, one the
kernel's iptables (ip6tables) and one bpfilter, and sockets of several users and
groups sending through them, over IPv4 and IPv6. Datagrams a rule drops make sendto()
fail with EPERM; the kernel's own answers (a TCP reset to a closed port, sent from a
socket with no file behind it) show in the counters, which must be equal entry by entry.
"""
from __future__ import annotations

import errno
import os
import socket
import uuid

import pytest

from bpfilter.abi import codec, sockopt
from bpfilter.errors import BpfilterError
from bpfilter.loader import load_filter_table
from bpfilter.netns import entered
from bpfilter_lab import namespaces
from bpfilter.model import Family
from bpfilter_lab.backends import kernel_counters, restore_in
from bpfilter_lab.scratch import replace_blob

pytestmark = pytest.mark.kernel

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp --dport 7001 -m owner --uid-owner 1000 -j DROP
-A OUTPUT -p udp --dport 7002 -m owner ! --uid-owner 1000-1999 -j DROP
-A OUTPUT -p udp --dport 7003 -m owner --gid-owner 500 -j DROP
-A OUTPUT -p udp --dport 7004 -m owner --uid-owner 1001 --gid-owner 500-600 -j DROP
-A OUTPUT -p udp --dport 7005 -m owner --socket-exists -j DROP
-A OUTPUT -p udp --dport 7006 -m owner --gid-owner 700-710 --suppl-groups -j DROP
-A OUTPUT -p udp --dport 7007 -m owner ! --gid-owner 700 --suppl-groups -j DROP
-A OUTPUT -p udp --dport 7008 -m owner --uid-owner 1000-1999 ! --gid-owner 600-800 --suppl-groups -j DROP
-A OUTPUT -p tcp -m owner ! --uid-owner 0
-A OUTPUT -p tcp -m owner --uid-owner 0
-A OUTPUT -p tcp -m owner --socket-exists
-A OUTPUT -p tcp -m owner ! --socket-exists
COMMIT
"""
# (uid, gid, supplementary groups)
USERS = [(0, 0, ()), (1000, 500, ()), (1001, 550, (705,)), (1500, 100, (100, 200, 700)),
         (2000, 600, (900,)), (1200, 705, (1, 2)), (1300, 40, tuple(range(3000, 3100)) + (710,)),
         (4294967294, 4294967294, ())]
PORTS = range(7001, 7009)
LOOPBACK = {Family.IPV4: (socket.AF_INET, "127.0.0.1"), Family.IPV6: (socket.AF_INET6, "::1")}


def send_as(netns: str, uid: int, gid: int, port: int, family: Family = Family.IPV4,
            groups=()) -> int:
    """0 if a datagram from (uid, gid, supplementary groups) to the loopback address's
    port left, else the errno."""
    domain, loopback = LOOPBACK[family]
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            with entered(netns):
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                with socket.socket(domain, socket.SOCK_DGRAM) as s:
                    try:
                        s.sendto(b"x", (loopback, port))
                        code = 0
                    except OSError as e:
                        code = e.errno
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def connect_closed_port(netns: str, family: Family = Family.IPV4) -> int:
    """A SYN to a closed port: the kernel answers with a reset from its own socket."""
    domain, loopback = LOOPBACK[family]
    with entered(netns):
        with socket.socket(domain) as s:
            s.settimeout(0.5)
            return s.connect_ex((loopback, 7100))


@pytest.fixture
def two_namespaces():
    names = [f"bpft-own-{uuid.uuid4().hex[:6]}-{side}" for side in ("k", "b")]
    for n in names:
        namespaces.add(n)
    yield names
    for n in names:
        namespaces.delete(n)


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_owner_matches_as_the_kernel(two_namespaces, family):
    kns, bns = two_namespaces
    restore_in(kns, RULES, family)
    table = load_filter_table(replace_blob(RULES, family=family), bns, family=family)
    try:
        results = {}
        for ns in (kns, bns):
            results[ns] = [send_as(ns, uid, gid, port, family, groups)
                           for uid, gid, groups in USERS for port in PORTS]
            results[ns].append(connect_closed_port(ns, family))
        ours = table.counters()
    finally:
        table.close()
    assert results[bns] == results[kns]
    assert ours == kernel_counters(kns, family=family)
    # the cases did something: drops for some users, a reset counted as fileless
    dropped = results[kns][:-1].count(errno.EPERM)
    assert 0 < dropped < len(USERS) * len(PORTS)
    # --suppl-groups decided some: a user dropped only for a supplementary group
    by_port = dict(zip([(u, p) for u, _, _ in USERS for p in PORTS], results[kns]))
    assert by_port[1001, 7006] == by_port[1500, 7006] == by_port[1300, 7006] == errno.EPERM
    assert by_port[1000, 7006] == 0 and by_port[1500, 7007] == 0
    assert results[kns][-1] == errno.ECONNREFUSED


def test_owner_is_only_valid_in_output(fresh_netns):
    """A user chain with an owner rule, reached from INPUT: the kernel says EINVAL, and
    so does bpfilter. (iptables refuses to write it, so the jump is redirected in the
    blob.)"""
    raw = codec.parse_replace(replace_blob(
        "*filter\n:X - [0:0]\n:Y - [0:0]\n-A INPUT -j Y\n-A OUTPUT -j X\n"
        "-A X -p udp -m owner --uid-owner 1000 -j DROP\nCOMMIT\n"))
    jump_to_y = raw.entries[0]
    jump_to_x = next(e for e in raw.entries if e.index > 0 and e.target.name == ""
                     and e.target.verdict >= 0)
    jump_to_y.target.verdict = jump_to_x.target.verdict
    blob = codec.build_replace(raw)
    with entered(fresh_netns):
        with pytest.raises(BpfilterError) as kernel:
            sockopt.set_replace(blob)
    with pytest.raises(BpfilterError) as ours:
        load_filter_table(blob, attach=False)
    assert kernel.value.errno == ours.value.errno == errno.EINVAL
    assert "match 'owner' is used from hooks INPUT/OUTPUT, but only valid from " \
           "OUTPUT/POSTROUTING" in str(ours.value)
