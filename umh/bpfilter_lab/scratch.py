"""Blobs exactly as the unmodified iptables writes them, without the service.

The kernel's own legacy iptables, in a throwaway network namespace, is given the
ruleset text by the real `iptables-legacy-restore`; reading the table back with
IPT_SO_GET_INFO/GET_ENTRIES gives the ipt_replace that binary produced (the kernel
only adds counters and its comefrom marks, which parse_replace recomputes anyway).
"""
from __future__ import annotations

import errno
import subprocess

from bpfilter import netns
from bpfilter.abi import sockopt
from bpfilter.errors import BpfilterError

from . import namespaces


def replace_blob(rules: str, table: str = "filter", restore: str = "iptables-legacy-restore") -> bytes:
    with namespaces.scratch("bpfl-scratch") as name:
        done = subprocess.run(["ip", "netns", "exec", name, restore], input=rules, text=True,
                              capture_output=True)
        if done.returncode:
            raise BpfilterError(errno.EINVAL, f"{restore} refused the ruleset: "
                                              f"{done.stderr.strip() or done.stdout.strip()}")
        with netns.entered(name):
            return sockopt.read_replace(table)
