"""The kernel's own iptables tables in a network namespace, as bpfilter sees them
beside its own.

Without bpfilter.ko (`bpfilter serve`), an iptables run outside `bpfilter exec`
reaches the kernel's ip_tables, which makes its table in that namespace on first use.
Before bpfilter's, the kernel's table holds the hooks' priority (netfilter then refuses
bpfilter's); after, netfilter lets it in beside bpfilter's and both decide every
packet. What the kernel's table holds tells whether that matters: one as the kernel
makes it (no rule, every policy ACCEPT) lets every packet on, as no table at all.
"""
from __future__ import annotations

import functools

from . import netns
from .abi import codec, families, sockopt
from .abi.xtables import SIZEOF_XT_COUNTERS
from .decode import table_from_blob
from .model import Family


def exists(netns_path: str, family: Family, name: str) -> bool:
    """Whether the kernel has made its table `name` in that namespace."""
    with netns.entered(netns_path):
        return _listed(family, name)


def _listed(family: Family, name: str) -> bool:
    """Whether the calling thread's namespace has the kernel's table `name`, read from
    its names file (asking ip_tables for the table would make it)."""
    # thread-self: /proc/net is the thread group leader's namespace
    try:
        with open(f"/proc/thread-self/net/{families.of(family).names_file}") as names:
            return name in names.read().split()
    except FileNotFoundError:   # no x_tables for that family in this kernel
        return False


@functools.lru_cache(maxsize=None)
def _initial(family: Family, name: str):
    raw, _ = table_from_blob(codec.initial_replace(name, family), family)
    return raw, codec.kernel_entries(raw)


def filters(netns_path: str, family: Family, name: str) -> bool:
    """Whether the kernel's table `name` exists there and can decide a packet
    otherwise than ACCEPT: it holds a rule, or a policy other than ACCEPT."""
    with netns.entered(netns_path):
        if not _listed(family, name):
            return False
        info = codec.parse_getinfo(sockopt.get_info(name, family))
        initial, entries = _initial(family, name)
        if (info["size"], info["num_entries"]) != (initial.size, initial.num_entries):
            return True
        answer = codec.parse_get_entries(sockopt.get_entries(name, info["size"], family))
    theirs = answer["entries"]
    counters_at = initial.abi.counters_at
    counters = b"".join(theirs[e.offset + counters_at: e.offset + counters_at + SIZEOF_XT_COUNTERS]
                        for e in initial.entries)
    return codec.with_counters(initial, entries, counters) != theirs


def holder(family: Family, name: str) -> str:
    """The kernel module that makes table `name` of family."""
    return f"{'ip6' if family == Family.IPV6 else 'ip'}table_{name}"

