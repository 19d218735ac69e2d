"""The match and target extensions Linux has, per family, with their revisions: what
the kernel's xt_find_revision() answers IPT_SO_GET_REVISION_MATCH/TARGET (ip_tables)
and IP6T_SO_GET_REVISION_MATCH/TARGET (ip6_tables) from.

Asked of Linux 6.18 with every netfilter extension built but IPVS, by probing each
name's revisions 0 to 7 (tests/test_service6.py holds it to the running kernel). A
name absent here does not exist for that family: the kernel answers ENOENT.
"""
from __future__ import annotations

from ..model import Family

_BOTH_MATCHES = {
    "ah": (0,), "bpf": (0, 1), "cgroup": (0, 1, 2), "cluster": (0,), "comment": (0,),
    "connbytes": (0,), "connlabel": (0,), "connlimit": (1,), "connmark": (1,),
    "conntrack": (1, 2, 3), "cpu": (0,), "dccp": (0,), "devgroup": (0,), "dscp": (0,),
    "ecn": (0,), "esp": (0,), "hashlimit": (1, 2, 3), "helper": (0,), "ipcomp": (0,),
    "iprange": (1,), "l2tp": (0,), "length": (0,), "limit": (0,), "mac": (0,), "mark": (1,),
    "multiport": (1,), "nfacct": (0, 1), "owner": (1,), "physdev": (0,), "pkttype": (0,),
    "policy": (0,), "quota": (0,), "rateest": (0,), "recent": (0, 1), "rpfilter": (0,),
    "sctp": (0,), "state": (0,), "statistic": (0,), "string": (1,), "tcp": (0,), "tcpmss": (0,),
    "time": (0,), "tos": (1,), "u32": (0,), "udp": (0,), "udplite": (0,),
}
_BOTH_TARGETS = {
    "": (0,), "ERROR": (0,), "AUDIT": (0,), "CHECKSUM": (0,), "CLASSIFY": (0,),
    "CONNMARK": (1, 2), "CONNSECMARK": (0,), "CT": (0, 1, 2), "DSCP": (0,), "HMARK": (0,),
    "IDLETIMER": (0, 1), "LOG": (0,), "MARK": (2,), "MASQUERADE": (0,), "NETMAP": (0,),
    "NFLOG": (0,), "NFQUEUE": (0, 1, 2, 3), "NOTRACK": (0,), "RATEEST": (0,), "REDIRECT": (0,),
    "REJECT": (0,), "SECMARK": (0, 1), "SYNPROXY": (0,), "TCPMSS": (0,), "TCPOPTSTRIP": (0,),
    "TEE": (1,), "TOS": (1,), "TRACE": (0,),
}

REVISIONS: dict[tuple[Family, str], dict[str, tuple[int, ...]]] = {
    (Family.IPV4, "match"): {
        **_BOTH_MATCHES, "addrtype": (0, 1), "icmp": (0,), "osf": (0,), "realm": (0,),
        "set": (0, 1, 2, 3, 4), "socket": (0, 1, 2, 3), "ttl": (0,),
    },
    (Family.IPV6, "match"): {
        **_BOTH_MATCHES, "addrtype": (1,), "dst": (0,), "eui64": (0,), "frag": (0,),
        "hbh": (0,), "hl": (0,), "icmp6": (0,), "ipv6header": (0,), "mh": (0,), "rt": (0,),
        "set": (1, 2, 3, 4), "socket": (1, 2, 3), "srh": (0, 1),
    },
    (Family.IPV4, "target"): {
        **_BOTH_TARGETS, "DNAT": (0, 1, 2), "ECN": (0,), "SET": (0, 1, 2, 3), "SNAT": (0, 1, 2),
        "TPROXY": (0, 1), "TTL": (0,),
    },
    (Family.IPV6, "target"): {
        **_BOTH_TARGETS, "DNAT": (1, 2), "DNPT": (0,), "HL": (0,), "SET": (1, 2, 3),
        "SNAT": (1, 2), "SNPT": (0,), "TPROXY": (1,),
    },
}


def revisions(kind: str, name: str, family: Family) -> tuple[int, ...]:
    """The revisions of match or target `name` Linux has for the family; () for none."""
    return REVISIONS[family, kind].get(name, ())


# Why bpfilter refuses an extension Linux has that it has no file for, where that is
# not for want of work but because it cannot be exact.
QUEUE_WHY = ("a netfilter BPF program's verdict is a drop or an accept, never a queue, "
             "and bpfilter.ko cannot queue the packet on the program's behalf: nf_queue() "
             "resumes past a hook index the program does not have, and userspace's "
             "verdict would reach the packet while the program still holds it")
REFUSED_WHY: dict[tuple[str, str], str] = {("target", "NFQUEUE"): QUEUE_WHY}
