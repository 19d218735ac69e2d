"""iptables extensions, one module each: its ABI struct (construct), its model and its
code generation live together so that adding an extension touches one place.

The generic part of the kernel's xt_check_match() (known name and revision, payload
size, the protocol a match requires) is checked here once for every match.
"""
from __future__ import annotations

import errno
from typing import ClassVar, Optional

from ..abi.xtables import Packed
from ..bpf.asm import Assembler
from ..errors import BpfilterError
from ..model import Family, Hook, IpHeader, Match


def xt_align(size: int) -> int:
    return (size + 7) & ~7


def xt_invert(flag: int) -> Optional[bool]:
    """How `(test) ^ info->invert` reads for a raw invert field (mark, pkttype, mac):
    0 keeps the test, 1 inverts it, any other value makes the match hold whatever
    the test says (None: emit no test)."""
    return {0: False, 1: True}.get(flag)


class MatchExtension:
    """What bpfilter knows of one match (name, revision) of one family."""

    name: ClassVar[str]
    revision: ClassVar[int] = 0
    families: ClassVar[tuple[Family, ...]] = (Family.IPV4,)
    proto: ClassVar[Optional[int]] = None   # the kernel's xt_match.proto
    hooks: ClassVar[Optional[int]] = None   # the kernel's xt_match.hooks (a mask of Hook bits)
    # Fact groups (compiler.facts.OPTIONAL) the match reads: the prologue reads a
    # group only for tables that have a rule needing it.
    facts: ClassVar[frozenset[str]] = frozenset()
    struct: ClassVar  # construct Struct of the payload
    packed: ClassVar[Packed]  # struct, compiled by register_match for decode()

    @classmethod
    def payload_size(cls) -> int:
        return xt_align(cls.packed.size)

    def decode(self, payload: bytes, where: str) -> Match:
        """Model of the payload; rejects what the kernel's checkentry rejects."""
        raise NotImplementedError

    def facts_of(self, match: Match) -> frozenset[str]:
        """The fact groups this match reads; every one in `facts` unless overridden."""
        return self.facts

    def describe(self, match: Match) -> str:
        """The match as `iptables -L -n` shows it."""
        raise NotImplementedError

    def emit(self, match: Match, asm: Assembler, out) -> None:
        """Code that folds into `out` (compiler.primitives.RuleOutcome) whether the
        packet fails the match, or makes the kernel's match set par->hotdrop."""
        raise NotImplementedError


_MATCHES: dict[tuple[str, int, Family], MatchExtension] = {}


def register_match(ext: type[MatchExtension]) -> type[MatchExtension]:
    ext.packed = Packed(ext.struct)
    for family in ext.families:
        _MATCHES[(ext.name, ext.revision, family)] = ext()
    return ext


# Matches Linux has (net/netfilter/xt_*.c, net/ipv4/netfilter/ipt_*.c): a blob naming
# one bpfilter lacks is refused as unsupported (EOPNOTSUPP); any other name does not
# exist, and the kernel answers ENOENT.
LINUX_MATCHES = frozenset("""
    addrtype ah bpf cgroup cluster comment connbytes connlabel connlimit connmark conntrack cpu
    dccp devgroup dscp ecn esp hashlimit helper icmp iprange ipcomp ipvs l2tp length limit mac
    mark multiport nfacct osf owner physdev pkttype policy quota rateest realm recent rpfilter
    sctp set socket state statistic string tcp tcpmss time tos ttl u32 udp udplite
""".split())
LINUX_TARGETS = frozenset("""
    AUDIT CHECKSUM CLASSIFY CLUSTERIP CONNMARK CONNSECMARK CT DNAT DSCP ECN HMARK IDLETIMER LED
    LOG MARK MASQUERADE NETMAP NFLOG NFQUEUE NOTRACK RATEEST REDIRECT REJECT SECMARK SET SNAT
    SYNPROXY TCPMSS TCPOPTSTRIP TEE TOS TPROXY TRACE TTL
""".split())


def unknown_errno(name: str, known_to_linux: frozenset) -> int:
    return errno.EOPNOTSUPP if name in known_to_linux else errno.ENOENT


def known_match_revisions(name: str, family: Family) -> list[int]:
    """What IPT_SO_GET_REVISION_MATCH answers for: the revisions bpfilter implements."""
    return sorted(r for (n, r, f) in _MATCHES if n == name and f == family)


def match_extension(name: str, revision: int, family: Family, where: str) -> MatchExtension:
    ext = _MATCHES.get((name, revision, family))
    if ext is None:
        known = known_match_revisions(name, family)
        detail = f" (bpfilter implements revision {known})" if known else ""
        raise BpfilterError(unknown_errno(name, LINUX_MATCHES),
                            f"{where}: match '{name}' revision {revision} is not supported by "
                            f"bpfilter{detail}; the whole table is refused")
    return ext


def decode_match(name: str, revision: int, payload: bytes, ip: IpHeader, family: Family,
                 where: str, hook_mask: int = 0) -> Match:
    """`hook_mask`: the hooks the entry is reachable from (the kernel's comefrom)."""
    ext = match_extension(name, revision, family, where)
    if len(payload) != ext.payload_size():
        raise BpfilterError(errno.EINVAL, f"{where}: match '{name}': invalid size {len(payload)} "
                                          f"(kernel expects {ext.payload_size()})")
    if ext.hooks is not None and hook_mask & ~ext.hooks:
        allowed = ", ".join(h.chain_name for h in Hook if ext.hooks & (1 << h))
        raise BpfilterError(errno.EINVAL, f"{where}: match '{name}' is only valid in {allowed} "
                                          "(the rule is reachable from elsewhere)")
    if ext.proto is not None and (ip.proto != ext.proto or ip.invert_proto):
        raise BpfilterError(errno.EINVAL, f"{where}: match '{name}' is only valid for protocol "
                                          f"{ext.proto} (use -p without '!')")
    return ext.decode(payload, where)


def emit_match(match: Match, family: Family, asm: Assembler, out) -> None:
    _MATCHES[(match.name, match.revision, family)].emit(match, asm, out)


def facts_needed(match: Match, family: Family) -> frozenset[str]:
    return _MATCHES[(match.name, match.revision, family)].facts_of(match)


def describe_match(match: Match, family: Family) -> str:
    return _MATCHES[(match.name, match.revision, family)].describe(match)


# Registration happens on import of each extension module.
from . import icmp, mac, mark, pkttype, tcp, udp  # noqa: E402,F401
