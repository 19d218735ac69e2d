"""iptables extensions, one module each: its ABI struct (construct), its model and its
code generation live together so that adding an extension touches one place.

The generic part of the kernel's xt_check_match()/xt_check_target() (known name and
revision, payload size, the protocol the extension requires) is checked here once for
every match and target.
"""
from __future__ import annotations

import errno
import os
from typing import ClassVar, Optional

from ..abi.xtables import XT_ERROR_TARGET, XT_STANDARD_TARGET, Packed
from ..bpf.asm import Assembler
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import Kfunc, MapRef
from ..errors import BpfilterError
from ..model import ExtensionTarget, Family, Hook, IpHeader, Match, Rule, Table
from . import linux


BOTH_FAMILIES = (Family.IPV4, Family.IPV6)


def xt_align(size: int) -> int:
    return (size + 7) & ~7


def xt_invert(flag: int) -> Optional[bool]:
    """How `(test) ^ info->invert` reads for a raw invert field (mark, pkttype, mac):
    0 keeps the test, 1 inverts it, any other value makes the match hold whatever
    the test says (None: emit no test)."""
    return {0: False, 1: True}.get(flag)


class _Extension:
    """What both kinds of extension share: a name, a revision, the families it
    exists in, and a payload whose layout is a construct Struct. bpfilter implements
    every revision Linux has of the extensions it registers."""

    kind: ClassVar[str]
    name: ClassVar[str]
    revision: ClassVar[int] = 0
    families: ClassVar[tuple[Family, ...]] = (Family.IPV4,)
    proto: ClassVar[Optional[int]] = None   # the kernel's xt_match.proto / xt_target.proto
    hooks: ClassVar[Optional[int]] = None   # xt_match.hooks / xt_target.hooks: 1 << NF_INET_*
    # xt_match.table / xt_target.table: the only one (a few checkentries allow two)
    table: ClassVar["str | tuple[str, ...] | None"] = None
    # Linux registers the extension once for every family (NFPROTO_UNSPEC) rather
    # than per family: its lookup then answers EPROTOTYPE, not ENOENT, for a revision
    # it does not have.
    family_independent: ClassVar[bool] = False
    # Fact groups (compiler.facts.OPTIONAL) the extension reads: the prologue reads a
    # group only for tables that have a rule needing it.
    facts: ClassVar[frozenset[str]] = frozenset()
    # the kfunc that runs it, for the kernel's own (None: bpfilter's BPF runs it)
    runs_in: ClassVar[Optional[Kfunc]] = None
    struct: ClassVar  # construct Struct of the payload
    packed: ClassVar[Packed]  # struct, compiled on registration for decode()
    # It reads the transport header at the offset ip_packet_match() found (par->thoff).
    reads_transport: ClassVar[bool] = False
    # Maps its code refers to that whoever loads the table provides (the service's log
    # ring); loading without them refuses the table.
    environment: ClassVar[tuple[MapRef, ...]] = ()

    def __init__(self, family: Family):
        self.family = family   # one instance per family it is registered in

    @classmethod
    def payload_size(cls) -> int:
        return xt_align(cls.packed.size)

    def facts_of(self, model) -> frozenset[str]:
        """The fact groups this match or target reads; every one in `facts` unless
        overridden."""
        return self.facts

    def table_maps(self, table) -> dict[MapRef, int]:
        """Maps its code refers to, made afresh for every load of `table` (as the
        kernel's checkentry makes per-rule state afresh); the caller closes them."""
        return {}

    def unsupported(self, model) -> Optional[str]:
        """Why bpfilter cannot honour this valid match or target exactly, or None.
        Asked only once the whole table passed the kernel's checks, so that a bad blob
        gets the kernel's errno rather than bpfilter's refusal."""
        return None

    def check_ip(self, ip: IpHeader, where: str) -> None:
        """xt_check_match()/xt_check_target()'s protocol test, for an extension that
        names one protocol."""
        if self.proto is not None and (ip.proto != self.proto or ip.invert_proto):
            raise BpfilterError(errno.EINVAL, f"{where}: {self.kind} '{self.name}' is only valid "
                                              f"for protocol {self.proto} (use -p without '!')")

    def check_ip_payload(self, ip: IpHeader, payload: bytes, where: str) -> None:
        """check_ip(), for an extension whose checkentry asks for a protocol only for
        some of its options."""
        self.check_ip(ip, where)


class MatchExtension(_Extension):
    """What bpfilter knows of one match (name, revision) of one family."""

    kind = "match"

    def decode(self, payload: bytes, where: str) -> Match:
        """Model of the payload; rejects what the kernel's checkentry rejects."""
        raise NotImplementedError

    def decode_in(self, payload: bytes, where: str, hook_mask: int) -> Match:
        """decode(), for a match whose model keeps what checkentry is given beside the
        payload (the hooks the rule is reachable from)."""
        return self.decode(payload, where)

    def check_hooks(self, match: Match, hook_mask: int, where: str) -> None:
        """What checkentry rejects for the hooks the rule is reachable from, beyond
        `hooks` (which the generic check tests)."""

    def frames(self, match: Match) -> int:
        """BPF call frames the match's code opens below its rule's (a bpf_loop()
        callback runs in one of its own): a program nests at most 8."""
        return 0

    def describe(self, match: Match) -> str:
        """The match as `iptables -L -n` shows it."""
        raise NotImplementedError

    def emit(self, match: Match, asm: Assembler, out) -> None:
        """Code that folds into `out` (compiler.primitives.RuleOutcome) whether the
        packet fails the match, or makes the kernel's match set par->hotdrop."""
        raise NotImplementedError


class TargetExtension(_Extension):
    """What bpfilter knows of one target (name, revision) of one family."""

    kind = "target"

    def decode(self, payload: bytes, ip: IpHeader, where: str) -> ExtensionTarget:
        """Model of the payload; rejects what the kernel's checkentry rejects (which
        may look at the rule's ip part, as REJECT's tcp-reset does)."""
        raise NotImplementedError

    def decode_in(self, payload: bytes, ip: IpHeader, where: str, hook_mask: int,
                  entry: bytes) -> ExtensionTarget:
        """decode(), for a target whose model keeps what checkentry is given beside the
        payload (the hooks the rule is reachable from, its entry)."""
        return self.decode(payload, ip, where)

    def emit_rule(self, rule: Rule, target: ExtensionTarget, asm: Assembler, next_rule) -> None:
        """emit(), for a target whose code depends on its rule (its per-rule state)."""
        self.emit(target, asm, next_rule)

    # Fact groups the target's write leaves stale for the rules after it (what it
    # changes that the prologue read once): a table whose rules read one is refused.
    stale: ClassVar[frozenset[str]] = frozenset()

    def describe(self, target: ExtensionTarget) -> str:
        """The target's options as `iptables -L -n` shows them after the addresses."""
        raise NotImplementedError

    def emit(self, target: ExtensionTarget, asm: Assembler, next_rule) -> None:
        """Code run once the rule matched and was counted, R6 = &facts. A
        non-terminating target falls through (or jumps to `next_rule`); a
        terminating one exits with the verdict."""
        raise NotImplementedError


class _Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.extensions: dict[tuple[str, int, Family], _Extension] = {}

    def register(self, ext: type[_Extension]) -> type[_Extension]:
        ext.packed = Packed(ext.struct)
        for family in ext.families:
            self.extensions[(ext.name, ext.revision, family)] = ext(family)
        return ext

    def revisions(self, name: str, family: Family) -> list[int]:
        return sorted(r for (n, r, f) in self.extensions if n == name and f == family)

    def answered(self, name: str, family: Family) -> list[int]:
        """revisions(), but for the kernel's own extensions only where the kernel runs
        them (bpfilter.ko's kfunc is there): without it they are Linux's to answer for,
        which may not have them (xt_LED, xt_ipvs)."""
        return sorted(r for (n, r, f), ext in self.extensions.items()
                      if n == name and f == family
                      and (ext.runs_in is None or not missing_kfunc(ext.runs_in)))

    def find(self, name: str, revision: int, family: Family, where: str) -> _Extension:
        ext = self.extensions.get((name, revision, family))
        if ext is not None:
            return ext
        known = self.revisions(name, family)
        if known:
            # a revision Linux lacks too: xt_find_match()/xt_find_target()'s answer
            any_revision = self.extensions[(name, known[0], family)]
            err = errno.EPROTOTYPE if any_revision.family_independent else errno.ENOENT
            raise BpfilterError(err, f"{where}: {self.kind} '{name}' has no revision {revision} "
                                     f"(Linux has {', '.join(map(str, known))})")
        # one Linux has for the family is refused as unsupported (EOPNOTSUPP); any
        # other name does not exist, and the kernel answers ENOENT
        why = linux.REFUSED_WHY.get((self.kind, name))
        why = f"is refused: {why}" if why else "is not supported by bpfilter"
        raise BpfilterError(errno.EOPNOTSUPP if linux.revisions(self.kind, name, family)
                            else errno.ENOENT,
                            f"{where}: {self.kind} '{name}' revision {revision} {why}; the "
                            "whole table is refused")

    def checked(self, name: str, revision: int, payload: bytes, ip: IpHeader, family: Family,
                where: str, hook_mask: int = 0, table: Optional[str] = None) -> _Extension:
        """The extension, after xt_check_match()/xt_check_target()'s generic checks:
        the payload size, the table, the hooks the rule is reachable from, then the
        protocol."""
        ext = self.find(name, revision, family, where)
        if len(payload) != ext.payload_size():
            raise BpfilterError(errno.EINVAL, f"{where}: {self.kind} '{name}': invalid size "
                                              f"{len(payload)} (kernel expects {ext.payload_size()})")
        valid = (ext.table,) if isinstance(ext.table, str) else ext.table
        if valid is not None and table is not None and table not in valid:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.kind} '{name}' is only valid in "
                                              f"the {' or '.join(valid)} table, not {table}")
        if ext.hooks is not None and hook_mask & ~ext.hooks:
            raise BpfilterError(errno.EINVAL, f"{where}: {self.kind} '{name}' is used from hooks "
                                              f"{_hook_names(hook_mask)}, but only valid from "
                                              f"{_hook_names(ext.hooks)}")
        ext.check_ip_payload(ip, payload, where)
        return ext

    def of(self, model, family: Family) -> _Extension:
        return self.extensions[(model.name, model.revision, family)]


_MATCHES = _Registry("match")
_TARGETS = _Registry("target")
register_match = _MATCHES.register
register_target = _TARGETS.register


def known_match_revisions(name: str, family: Family) -> list[int]:
    """What (IP6)IPT_SO_GET_REVISION_MATCH answers for: the revisions Linux has (all
    that bpfilter implements among them). iptables then loads the extension as with
    the kernel, and a rule bpfilter cannot honour is refused by the replace, with a
    message naming it, rather than by iptables not finding the extension."""
    return sorted({*_MATCHES.answered(name, family), *linux.revisions("match", name, family)})


def known_target_revisions(name: str, family: Family) -> list[int]:
    """What (IP6)IPT_SO_GET_REVISION_TARGET answers for: as known_match_revisions, and
    ip_tables' own two targets."""
    if name in (XT_STANDARD_TARGET, XT_ERROR_TARGET):
        return [0]
    return sorted({*_TARGETS.answered(name, family), *linux.revisions("target", name, family)})


def decode_match(name: str, revision: int, payload: bytes, ip: IpHeader, family: Family,
                 where: str, hook_mask: int = 0, table: Optional[str] = None) -> Match:
    ext = _MATCHES.checked(name, revision, payload, ip, family, where, hook_mask, table)
    match = ext.decode_in(payload, where, hook_mask)
    ext.check_hooks(match, hook_mask, where)
    return match


def match_key(rule: Rule, match: Match) -> int:
    """The key of a match's own state (limit's bucket, statistic's nth counter): its
    rule's entry and its position in the rule, by identity, so that two equal
    matches in one rule have a state each, as the kernel's checkentry makes them."""
    position = next(i for i, other in enumerate(rule.matches) if other is match)
    return rule.entry << 32 | position


def keyed_matches(table: Table, model: type) -> list[tuple[int, Match]]:
    """Every match of `table` whose model is `model`, with its match_key(): the
    state a load makes afresh for each (limit's buckets, statistic's counters,
    quota's counts)."""
    return [(match_key(rule, m), m) for chain in table.chains.values()
            for rule in chain.rules for m in rule.matches if isinstance(m, model)]


def _hook_names(mask: int) -> str:
    return "/".join(h.chain_name for h in Hook if mask & (1 << h.value))


def reads_transport(matches: list[Match], family: Family) -> bool:
    return any(_MATCHES.of(m, family).reads_transport for m in matches)


def frames(rule: Rule, family: Family) -> int:
    """The call frames a rule's matches open below its chain's."""
    return max((_MATCHES.of(m, family).frames(m) for m in rule.matches), default=0)


def emit_match(match: Match, family: Family, asm: Assembler, out) -> None:
    _MATCHES.of(match, family).emit(match, asm, out)


def describe_match(match: Match, family: Family) -> str:
    return _MATCHES.of(match, family).describe(match)


def decode_target(name: str, revision: int, payload: bytes, ip: IpHeader, family: Family,
                  where: str, hook_mask: int = 0, table: Optional[str] = None,
                  entry: bytes = b"") -> ExtensionTarget:
    """`entry`: the rule's entry up to its target, as the replace has it."""
    ext = _TARGETS.checked(name, revision, payload, ip, family, where, hook_mask, table)
    return ext.decode_in(payload, ip, where, hook_mask, entry)


def unsupported_match(match: Match, family: Family) -> Optional[str]:
    return _MATCHES.of(match, family).unsupported(match)


def stale_facts(target: ExtensionTarget, family: Family) -> frozenset[str]:
    return _TARGETS.of(target, family).stale


def unsupported_target(target: ExtensionTarget, family: Family) -> Optional[str]:
    return _TARGETS.of(target, family).unsupported(target)


# bpfilter.ko's kfuncs (kmod/bpfilter.c): what a netfilter program cannot do itself.
MODULE = "bpfilter"


def missing_kfunc(kfunc: Kfunc) -> Optional[str]:
    """Why the programs cannot call `kfunc` of bpfilter.ko (the module is not loaded,
    as with `bpfilter serve`, or is too old to have it), or None. The loader resolves
    the same BTF to the id it calls (fd_array)."""
    try:
        Btf.module(kfunc.module).kfunc_id(kfunc.name)
    except BtfError as e:
        return str(e)
    return None


def emit_target(rule: Rule, family: Family, asm: Assembler, next_rule) -> None:
    _TARGETS.of(rule.target, family).emit_rule(rule, rule.target, asm, next_rule)


def describe_target(target: ExtensionTarget, family: Family) -> str:
    return _TARGETS.of(target, family).describe(target)


def used(table: Table) -> list[_Extension]:
    """The extensions the table's rules use, each once."""
    found: dict[int, _Extension] = {}
    for chain in table.chains.values():
        for rule in chain.rules:
            for m in rule.matches:
                extension = _MATCHES.of(m, table.family)
                found[id(extension)] = extension
            if isinstance(rule.target, ExtensionTarget):
                extension = _TARGETS.of(rule.target, table.family)
                found[id(extension)] = extension
    return list(found.values())


def environment_maps(table: Table) -> set[MapRef]:
    """The maps the table's extensions expect from whoever loads it."""
    return {ref for extension in used(table) for ref in extension.environment}


def table_maps(table: Table) -> dict[MapRef, int]:
    """The maps the table's extensions make for this load of it; the caller owns them."""
    maps: dict[MapRef, int] = {}
    try:
        for extension in used(table):
            maps.update(extension.table_maps(table))
    except BaseException:
        for fd in maps.values():
            os.close(fd)
        raise
    return maps


def facts_needed(rule: Rule, family: Family) -> frozenset[str]:
    """The fact groups a rule's matches and target read."""
    needed = [_MATCHES.of(m, family).facts_of(m) for m in rule.matches]
    if isinstance(rule.target, ExtensionTarget):
        needed.append(_TARGETS.of(rule.target, family).facts_of(rule.target))
    return frozenset().union(*needed)


# Registration happens on import of each extension module.
from . import (addrtype, comment, conntrack, icmp, iprange, length, limit, log,  # noqa: E402,F401
               mac, mark, multiport, owner, pkttype, reject, tcp, ttl, udp)
# IPv6's extension-header matches, esp (both families) and IPv4's ah
from . import ah, dccp, esp, eui64, frag, hbh, ipv6header, mh, rt, sctp, srh  # noqa: E402,F401
# the nat table's targets, and what kube-proxy's rules use with them
from . import connmark, nat, statistic  # noqa: E402,F401
# what only the kernel's own extensions can be, run by bpfilter.ko (ext/xtmatch.py)
from . import nfacct, quota, recent  # noqa: E402,F401
from . import connbytes, connstate, cpu, ct, dscp, ecn, hl, skbinfo, tcpmss  # noqa: E402,F401
from . import cbpf, hashlimit, helper, physdev, policy, rateest, realm, string, tcpoptstrip, time, u32  # noqa: E402,F401
from . import cluster, kernelside, npt, secmark, synproxy, tproxy, trace  # noqa: E402,F401
