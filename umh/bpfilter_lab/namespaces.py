"""Named network namespaces, made and wired through netlink (pyroute2) rather than by
running `ip`. They are bound in /run/netns as `ip netns add` binds them, so commands
still run inside them with `ip netns exec NAME`, as a person runs them, and
bpfilter.netns.entered(NAME) moves a thread into them.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator, Mapping

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from bpfilter.netns import entered


def add(name: str) -> None:
    """A new namespace bound to `name`, its loopback up."""
    pyroute2_netns.create(name)
    try:
        with netlink(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    except BaseException:
        delete(name)
        raise


def delete(name: str) -> None:
    pyroute2_netns.remove(name)


@contextlib.contextmanager
def scratch(prefix: str = "bpft") -> Iterator[str]:
    """A new namespace (loopback up) named after `prefix`, deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    add(name)
    try:
        yield name
    finally:
        delete(name)


@contextlib.contextmanager
def netlink(name: str) -> Iterator[IPRoute]:
    """An rtnetlink socket of the namespace: a socket belongs to the namespace its
    thread was in when it was made."""
    with entered(name):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def write_sysctls(name: str, values: Mapping[str, "str | int"]) -> None:
    """net.* sysctls of the namespace, by dotted key: /proc/sys/net shows the
    namespace of the thread that opens the file."""
    with entered(name):
        for key, value in values.items():
            with open(os.path.join("/proc/sys", key.replace(".", "/")), "w") as f:
                f.write(str(value))
