"""Debian's own ufw, unmodified, in a namespace of its own: on the kernel's iptables or
through `bpfilter exec` (tests/test_ufw.py compares the two, tools/bench/clients.py
times them).

ufw drives `iptables` (/usr/sbin/iptables, whatever Debian's alternatives make it);
each command gets a private mount namespace in which that is the legacy binary (the
setsockopt ABI bpfilter serves, the kernel's legacy tables for the reference) and
/etc/ufw a copy of its own, so that the host's stays untouched.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

from bpfilter_lab import namespaces

# enabled (IPv6 on, as Debian ships it), an allow, a deny and a limit rule, reloaded
COMMANDS = ["ufw --force enable", "ufw allow 22/tcp", "ufw deny 23/tcp", "ufw limit 2222/tcp",
            "ufw reload"]
ADDRESSES = {socket.AF_INET: ("10.86.0.1", "10.86.0.2", 24),
             socket.AF_INET6: ("fd86::1", "fd86::2", 64)}
# the legacy xtables binary in the nft one's place (every iptables name Debian's
# alternatives give points at one or the other), and the ufw configuration copied
PRIVATE = """set -e
mount --make-rprivate /
mount --bind /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi
mount --bind "$ETC/ufw" /etc/ufw
mount --bind "$ETC/default-ufw" /etc/default/ufw
exec "$@"
"""


class Host:
    """A namespace ufw runs in (through bpfilter when `through_bpfilter`, the service
    named by `env`'s BPFILTER_SOCKET, or on the kernel's iptables), with a peer on a
    veth, and ufw's configuration of its own."""

    def __init__(self, env: dict, server: str, peer: str, through_bpfilter: bool):
        self.env, self.server, self.peer = env, server, peer
        self.through_bpfilter = through_bpfilter
        self.etc = tempfile.mkdtemp(prefix="bpft-ufw-")
        shutil.copytree("/etc/ufw", os.path.join(self.etc, "ufw"), symlinks=True)
        shutil.copy2("/etc/default/ufw", os.path.join(self.etc, "default-ufw"))
        with namespaces.netlink(peer) as ipr:
            ipr.link("add", ifname="vp", kind="veth", peer={"ifname": "vs", "net_ns_fd": server})
        for ns, dev, which in ((peer, "vp", 0), (server, "vs", 1)):
            with namespaces.netlink(ns) as ipr:
                index = ipr.link_lookup(ifname=dev)[0]
                for family, (*addresses, prefix) in ADDRESSES.items():
                    ipr.addr("add", index=index, address=addresses[which], prefixlen=prefix,
                             **({"flags": 0x02} if family == socket.AF_INET6 else {}))
                ipr.link("set", index=index, state="up")

    def run(self, command: str) -> str:
        argv = command.split()
        if self.through_bpfilter:
            argv = [sys.executable, "-m", "bpfilter", "exec", "--", *argv]
        done = subprocess.run(["unshare", "-m", "sh", "-c", PRIVATE, "private",
                               "ip", "netns", "exec", self.server, *argv],
                              env={**self.env, "ETC": self.etc}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        return done.stdout

    def close(self) -> None:
        shutil.rmtree(self.etc, ignore_errors=True)
