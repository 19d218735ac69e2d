"""Keeping the kernel's connection tracking on in a namespace while a table reads it.

Conntrack only runs in a network namespace something asked it to run in: the
kernel's iptables does it in the checkentry of conntrack/state matches with
nf_ct_netns_get(), and drops it with nf_ct_netns_put() when the rule goes. That
call is not reachable from user space, but nftables makes it for every rule with a
`ct` expression, hooked or not. So while a bpfilter table has conntrack matches, the
namespace holds one nftables table, `ip bpfilter_conntrack`, with an unhooked chain
whose only rule reads `ct state`: it filters nothing and keeps conntrack on, exactly
as long as the kernel's iptables would.
"""
from __future__ import annotations

import errno
import shutil
import subprocess
from contextlib import nullcontext
from typing import Optional

from . import netns
from .errors import BpfilterError

TABLE = "bpfilter_conntrack"
_OFF = f"add table ip {TABLE}\ndelete table ip {TABLE}\n"
# Deleting and adding in one transaction: the new rule takes its reference before
# the old one drops its own, so conntrack never stops in between.
_ON = _OFF + f"table ip {TABLE} {{\n\tchain keep_conntrack_on {{\n\t\tct state invalid\n\t}}\n}}\n"


def _nft(script: str, netns_path: Optional[str]) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise BpfilterError(errno.EOPNOTSUPP, "conntrack matches need the nft command (nftables) "
                                              "to turn connection tracking on in the namespace")
    with netns.entered(netns_path) if netns_path else nullcontext():
        r = subprocess.run([nft, "-f", "-"], input=script, text=True, capture_output=True)
    if r.returncode:
        raise BpfilterError(errno.EOPNOTSUPP, f"cannot turn connection tracking "
                                              f"{'on' if 'ct state' in script else 'off'}: "
                                              f"nft: {r.stderr.strip()}")


def hold(netns_path: Optional[str]) -> None:
    """Conntrack on in the namespace (the calling thread's if None); idempotent."""
    _nft(_ON, netns_path)


def release(netns_path: Optional[str]) -> None:
    """Conntrack back to what the namespace had without bpfilter; idempotent."""
    _nft(_OFF, netns_path)


def switch(netns_path: Optional[str], before: bool, after: bool) -> None:
    """From a table that did (`before`) or did not read conntrack to one that does
    (`after`) or does not."""
    if after and not before:
        hold(netns_path)
    elif before and not after:
        release(netns_path)
