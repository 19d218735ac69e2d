"""Blobs exactly as the unmodified iptables and ip6tables write them, without the service.

The kernel's own legacy tables, in a throwaway network namespace, are given the
ruleset text by the real `iptables-legacy-restore` (`ip6tables-legacy-restore`);
reading the table back with its GET_INFO/GET_ENTRIES options gives the ipt_replace
(ip6t_replace) that binary produced: the kernel only adds counters and its comefrom
marks, which parse_replace recomputes anyway.
"""
from __future__ import annotations

import errno
import subprocess

from bpfilter import netns
from bpfilter.abi import sockopt
from bpfilter.errors import BpfilterError
from bpfilter.model import Family

from . import namespaces

RESTORE = {Family.IPV4: "iptables-legacy-restore", Family.IPV6: "ip6tables-legacy-restore"}


def replace_blob(rules: str, table: str = "filter", family: Family = Family.IPV4) -> bytes:
    restore = RESTORE[family]
    with namespaces.scratch("bpfl-scratch") as name:
        done = subprocess.run(["ip", "netns", "exec", name, restore], input=rules, text=True,
                              capture_output=True)
        if done.returncode:
            raise BpfilterError(errno.EINVAL, f"{restore} refused the ruleset: "
                                              f"{done.stderr.strip() or done.stdout.strip()}")
        with netns.entered(name):
            return sockopt.read_replace(table, family)
