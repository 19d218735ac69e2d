"""Keeping the kernel's connection tracking on in a namespace while a table reads it.

Conntrack only runs in a network namespace something asked it to run in: the
kernel's iptables does it in the checkentry of conntrack/state matches with
nf_ct_netns_get(), and drops it with nf_ct_netns_put() when the rule goes. That
call is not reachable from user space by itself, so it is made in one of two ways:

- by bpfilter.ko, for its helper (`bpfilter serve --device`): an ioctl on
  /dev/bpfilter with the namespace's fd and the family, and the module makes exactly those calls
  (kmod/bpfilter_proto.h);
- elsewhere (`bpfilter serve`), by nftables, which makes the call for every rule
  with a `ct` expression, hooked or not: the namespace holds one nftables table,
  `ip bpfilter_conntrack` (`ip6` for IPv6), with an unhooked chain whose only rule reads
  `ct state`. It filters nothing and keeps conntrack on.

Either way conntrack stays on exactly as long as the kernel's iptables would keep
it: from before the first packet meets a table reading it until that table goes.
The service takes one hold when a table starts reading conntrack and gives it
back when the table stops, for the table's family (conntrack runs per family:
iptables' rules turn on IPv4's, ip6tables' IPv6's): the module counts holds per
namespace and family, nftables' table is one per namespace and family (`ip` or
`ip6`; enough while filter is the only table bpfilter has).
"""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from contextlib import nullcontext
from typing import Optional

from . import kmodule, netns, proto
from .errors import BpfilterError
from .netfilter import NFPROTO_IPV4, NFPROTO_IPV6

TABLE = "bpfilter_conntrack"
ACCOUNTING = "/proc/sys/net/netfilter/nf_conntrack_acct"
# nftables' table family: its ct expression takes conntrack for that family only
_NFT_FAMILY = {NFPROTO_IPV4: "ip", NFPROTO_IPV6: "ip6"}


def _off(family: int) -> str:
    nft = _NFT_FAMILY[family]
    return f"add table {nft} {TABLE}\ndelete table {nft} {TABLE}\n"


def _on(family: int) -> str:
    # Deleting and adding in one transaction: the new rule takes its reference before
    # the old one drops its own, so conntrack never stops in between.
    return _off(family) + (f"table {_NFT_FAMILY[family]} {TABLE} {{\n\tchain keep_conntrack_on "
                           f"{{\n\t\tct state invalid\n\t}}\n}}\n")

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


def _ioctl(request: int, netns_path: Optional[str], family: int) -> None:
    on = request == proto.IOC_CONNTRACK_GET
    with kmodule.netns_fd(netns_path) as fd:
        kmodule.ioctl(request, proto.conntrack.build(dict(netns_fd=fd, family=family)),
                      f"turn connection tracking {'on' if on else 'off'}")


def hold(netns_path: Optional[str], family: int = NFPROTO_IPV4) -> None:
    """Conntrack on in the namespace (the calling thread's if None) for one table of
    family (NFPROTO_IPV4 or NFPROTO_IPV6)."""
    if kmodule.present():
        _ioctl(proto.IOC_CONNTRACK_GET, netns_path, family)
    else:
        _nft(_on(family), netns_path)


def force_accounting(netns_path: Optional[str]) -> None:
    """Conntrack's accounting on in the namespace (the calling thread's if None), as
    connbytes_mt_check() turns it on, with its warning: for good (the kernel never
    turns it back off), and only for entries made from then on."""
    with netns.entered(netns_path) if netns_path else nullcontext():
        try:
            # /proc/sys/net is the opening thread's namespace's
            with open(ACCOUNTING, "r+") as setting:
                if setting.read().strip() != "0":
                    return
                setting.seek(0)
                setting.write("1\n")
        except OSError as err:
            raise BpfilterError(errno.EOPNOTSUPP, f"connbytes needs conntrack's accounting, "
                                                  f"which cannot be turned on: {ACCOUNTING}: "
                                                  f"{err.strerror}") from None
    print("bpfilter: connbytes: Forcing CT accounting to be enabled", file=sys.stderr)


def release(netns_path: Optional[str], family: int = NFPROTO_IPV4) -> None:
    """One table's hold given back: conntrack back to what the namespace had without
    bpfilter once no table of that family holds it."""
    if kmodule.present():
        _ioctl(proto.IOC_CONNTRACK_PUT, netns_path, family)
    else:
        _nft(_off(family), netns_path)
