"""Debian's own ufw, unmodified, through `bpfilter exec` on a stock system, beside the
same ufw on the kernel's iptables: enabled (IPv6 on, as Debian ships it), with an
allow, a deny and a limit rule, it leaves the same rules in both families, says the
same `ufw status verbose`, and real connections from a peer, over IPv4 and IPv6, meet
the same fate: accepted, dropped (a timeout), or, past the limit's sixth connection in
30 seconds, refused by the REJECT ufw's limit chain ends in (its answer sent by the
service, answers.py), the rules counting alike (but for the answers themselves at
OUTPUT, see _inbound).

How ufw runs in its namespace: bpfilter_lab/ufw.py.
"""

import errno
import socket

import pytest

from bpfilter import netns
from bpfilter_lab.ufw import ADDRESSES, COMMANDS, Host
from test_service import nets, svc  # noqa: F401,F811  (fixtures)

pytestmark = pytest.mark.kernel


def _listen(ns: str, family: int, ports) -> list[socket.socket]:
    with netns.entered(ns):
        listeners = []
        for port in ports:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ADDRESSES[family][1], port))
            s.listen(64)
            listeners.append(s)
    return listeners


def _connect(ns: str, family: int, port: int) -> str:
    with netns.entered(ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(1.5)
        try:
            s.connect((ADDRESSES[family][1], port))
            return "connected"
        except socket.timeout:
            return "timed out"
        except OSError as err:
            return errno.errorcode.get(err.errno, str(err.errno))


def _fates(host: Host) -> dict:
    """Each family's connections from the peer: one to 22, 23 and 8080 (no rule:
    ufw's default), then eight to 2222, the limited port."""
    fates = {}
    for family in ADDRESSES:
        listeners = _listen(host.server, family, (22, 23, 2222, 8080))
        try:
            fates[family] = [_connect(host.peer, family, port)
                             for port in (22, 23, 8080, *[2222] * 8)]
        finally:
            for s in listeners:
                s.close()
    return fates


def _rules(host: Host, command: str) -> str:
    saved = host.run(command)
    return "".join(line + "\n" for line in saved.splitlines()
                   if not line.startswith("#"))


def _zeroed(saved: str) -> str:
    return "\n".join(line.split(" [")[0] if line.startswith(":") else line
                     for line in saved.splitlines())


def _inbound(listing: str) -> str:
    """The listing's chains but OUTPUT's: the kernel attaches its REJECT answers to
    the refused packet's conntrack entry (RELATED at OUTPUT: ufw's first output rule
    takes them), where the service's are packets of their own (README, REJECT), so
    the output chains count them otherwise."""
    return "\n\n".join(chain for chain in listing.split("\n\n")
                       if "output" not in chain.split("\n", 1)[0].lower())


def test_ufw_through_bpfilter_is_ufw_on_the_kernel(svc, nets):
    kernel_server, kernel_peer, our_server, our_peer = nets(4)
    hosts = [Host(svc.env, kernel_server, kernel_peer, False),
             Host(svc.env, our_server, our_peer, True)]
    try:
        for host in hosts:
            for command in COMMANDS:
                host.run(command)
        kernel, ours = hosts
        for save in ("iptables-legacy-save", "ip6tables-legacy-save"):
            assert _zeroed(_rules(ours, save)) == _zeroed(_rules(kernel, save)), save
        status = [host.run("ufw status verbose") for host in hosts]
        assert status[1] == status[0]
        assert "2222/tcp (v6)              LIMIT IN" in status[0], status[0]
        fates = [_fates(host) for host in hosts]
        assert fates[1] == fates[0]
        for family in ADDRESSES:
            assert fates[0][family][:3] == ["connected", "timed out", "timed out"]
            assert "ECONNREFUSED" in fates[0][family][3:], repr(fates[0])
        listing = "iptables-legacy -L -v -n -x"
        theirs, mine = _inbound(kernel.run(listing)), _inbound(ours.run(listing))
        assert mine == theirs, "\n".join(f"kernel: {k}\nours:   {o}" for k, o in
                                         zip(theirs.splitlines(), mine.splitlines()) if k != o)
        # IPv6: the kernel's answer to a SYN reaches the peer while its connect() still
        # holds the socket (tcp_v6_err() then only notes it) and the peer is refused
        # at its retransmitted SYN, a second later; ours comes after connect() let go
        # and refuses at the first: the limited port's rules count those SYNs twice
        # with the kernel. The other rules count alike.
        listing = "ip6tables-legacy -L -v -n -x"
        theirs, mine = kernel.run(listing), ours.run(listing)
        for port in ("dpt:22 ", "dpt:23 "):
            assert [line for line in mine.splitlines() if port in line] == \
                [line for line in theirs.splitlines() if port in line], (theirs, mine)
    finally:
        for host in hosts:
            host.close()
    assert "answers not sent" not in svc.log_text(), svc.log_text()
