"""From a validated raw table (codec.parse_replace) to the neutral model.

First the checks the kernel still makes after translate_table(), in its order, so a
bad blob gets the kernel's errno: each entry's matches then its target
(find_check_entry), then the table itself (__do_replace). Only then what bpfilter
itself cannot do, refused with EOPNOTSUPP and a message, never approximated.

The kernel accepts any entry layout that passes translate_table(); libiptc only ever
writes one: built-in chains in hook order, each ending in its policy, then user
chains, each an ERROR head naming it, its rules and an unconditional RETURN, then a
final ERROR entry. bpfilter models chains, so it requires that layout.
"""
from __future__ import annotations

import errno
from functools import lru_cache

from .. import ext
from ..errors import BpfilterError
from ..model import (Accept, Chain, Drop, ExtensionTarget, Fallthrough, Family, Goto, Hook,
                     Interface, IpHeader, Jump, Match, Prefix, Return, Rule, Table, Verdict)
from . import xtables as X
from .codec import check_builtin_target, check_do_replace, gc_paused
from .xtables import RawEntry, RawTable

SUPPORTED_TABLES = ("filter",)
_STANDARD_VERDICTS = {-X.NF_ACCEPT - 1: Accept(), -X.NF_DROP - 1: Drop(), X.XT_RETURN: Return()}


def _unsupported(message: str, entry: "int | None" = None) -> BpfilterError:
    return BpfilterError(errno.EOPNOTSUPP, message + "; the whole table is refused", entry)


def _is_error(entry: RawEntry) -> bool:
    return entry.target.name == X.XT_ERROR_TARGET


def _unconditional(entry: RawEntry) -> bool:
    ip = entry.ip
    return (entry.target_offset == X.SIZEOF_IPT_ENTRY and not any(
        ip.src + ip.dst + ip.smsk + ip.dmsk + ip.iniface + ip.outiface + ip.iniface_mask
        + ip.outiface_mask) and ip.proto == 0 and ip.flags == 0 and ip.invflags == 0)


@gc_paused()
def table_from_raw(raw: RawTable, family: Family = Family.IPV4) -> Table:
    entries = raw.entries
    starts = _chain_starts(raw)
    spans = _chain_spans(starts, len(entries))
    where = {}
    for first, end in spans.values():
        chain = starts[first]
        for e in entries[first:end]:
            what = f"rule {e.index - first + 1}" if e.index < end - 1 else (
                "policy" if chain.builtin else "final RETURN")
            where[e.index] = f"chain {chain.name} {what} (entry {e.index})"

    ips = [_ip_header(e) for e in entries]
    matches: list[list[Match]] = []
    targets: dict[int, ExtensionTarget] = {}
    for e, ip in zip(entries, ips):
        place = where.get(e.index, f"entry {e.index}")
        matches.append([ext.decode_match(m.name, m.revision, m.data, ip, family, place,
                                         e.hook_mask) for m in e.matches])
        t = e.target
        if t.name in (X.XT_STANDARD_TARGET, X.XT_ERROR_TARGET):
            check_builtin_target(e)
        else:
            targets[e.index] = ext.decode_target(t.name, t.revision, t.data, ip, family, place)
    check_do_replace(raw)
    if raw.name not in SUPPORTED_TABLES:
        raise _unsupported(f"table '{raw.name}' is not supported by bpfilter yet "
                           f"(supported: {', '.join(SUPPORTED_TABLES)})")
    for e, rule_matches in zip(entries, matches):
        for match in rule_matches:
            reason = ext.unsupported_match(match, family)
            if reason:
                raise _unsupported(f"{where.get(e.index, f'entry {e.index}')}: match "
                                   f"'{match.name}' {reason}")
    for index, target in targets.items():
        reason = ext.unsupported_target(target, family)
        if reason:
            raise _unsupported(f"{where.get(index, f'entry {index}')}: target '{target.name}' "
                               f"{reason}")

    if not _is_error(entries[-1]):
        raise _unsupported("the table does not end with an ERROR entry", entries[-1].index)
    by_offset = {e.offset: e.index for e in entries}
    chain_of_jump = {index: c.name for index, c in starts.items() if not c.builtin}
    for first, (start, end) in spans.items():
        chain = starts[first]
        body = entries[start:end]
        if not body:
            raise _unsupported(f"chain '{chain.name}' has no final policy/RETURN entry", first)
        _check_tail(raw, chain, body[-1])
        chain.tail_entry = body[-1].index
        for e in body[:-1]:
            target = targets[e.index] if e.index in targets else _target(
                e, where[e.index], by_offset, chain_of_jump)
            chain.rules.append(Rule(e.index, ips[e.index], matches[e.index], target))
    return Table(raw.name, family, {starts[i].name: starts[i] for i in sorted(starts)},
                 raw.num_entries)


def _chain_starts(raw: RawTable) -> dict[int, Chain]:
    """Entry index -> chain starting there: each hook entry, and the entry after
    every user chain's ERROR head."""
    by_offset = {e.offset: e.index for e in raw.entries}
    starts: dict[int, Chain] = {}
    for h in range(X.NF_INET_NUMHOOKS):
        if raw.valid_hooks & (1 << h):
            hook = Hook(h)
            starts[by_offset[raw.hook_entry[h]]] = Chain(hook.chain_name, hook=hook)
    for e in raw.entries[:-1]:
        if _is_error(e):
            if e.index + 1 in starts:
                raise _unsupported(f"user chain '{e.target.errorname}' starts at a hook entry",
                                   e.index)
            starts[e.index + 1] = Chain(e.target.errorname)
    return starts


def _chain_spans(starts: dict[int, Chain], count: int) -> dict[int, tuple[int, int]]:
    """Chain start -> (first, end) entry indexes of its body, policy/RETURN included."""
    order = sorted(starts)
    spans = {}
    for pos, first in enumerate(order):
        if pos + 1 == len(order):
            end = count - 1                    # the final ERROR entry
        else:
            end = order[pos + 1]
            if not starts[end].builtin:
                end -= 1                       # the next user chain's ERROR head
        spans[first] = (first, end)
    return spans


def _check_tail(raw: RawTable, chain: Chain, tail: RawEntry) -> None:
    verdict = tail.target.verdict
    if chain.builtin:
        if tail.offset != raw.underflow[chain.hook]:
            raise _unsupported(f"built-in chain {chain.name} does not end at its underflow "
                               "(policy) entry", tail.index)
        chain.policy = Verdict.ACCEPT if verdict == -X.NF_ACCEPT - 1 else Verdict.DROP
    elif not (_unconditional(tail) and tail.target.name == X.XT_STANDARD_TARGET
              and verdict == X.XT_RETURN):
        raise _unsupported(f"user chain '{chain.name}' does not end with an unconditional RETURN",
                           tail.index)


def _target(e: RawEntry, where: str, by_offset, chain_of_jump):
    t = e.target
    if t.name == X.XT_ERROR_TARGET:
        raise _unsupported(f"{where}: ERROR target inside a chain")
    if t.verdict < 0:
        if t.verdict not in _STANDARD_VERDICTS:
            name = "QUEUE" if t.verdict == -X.NF_QUEUE - 1 else f"verdict {t.verdict}"
            raise _unsupported(f"{where}: {name} is not supported by bpfilter")
        return _STANDARD_VERDICTS[t.verdict]
    target_index = by_offset[t.verdict]
    if target_index == e.index + 1:
        return Fallthrough()
    if target_index not in chain_of_jump:
        raise _unsupported(f"{where}: jumps to entry {target_index}, which does not start a "
                           "user-defined chain (iptables never writes such a jump)")
    name = chain_of_jump[target_index]
    return Goto(name) if e.ip.flags & X.IPT_F_GOTO else Jump(name)


# Rules repeat addresses and interfaces (most often "any"), and building a frozen
# dataclass costs a microsecond: equal values are shared, they are immutable.
_prefix = lru_cache(maxsize=4096)(Prefix)
_interface = lru_cache(maxsize=1024)(Interface)


def _ip_header(e: RawEntry) -> IpHeader:
    ip, inv = e.ip, e.ip.invflags
    return IpHeader(
        src=_prefix(ip.src, ip.smsk, bool(inv & X.IPT_INV_SRCIP)),
        dst=_prefix(ip.dst, ip.dmsk, bool(inv & X.IPT_INV_DSTIP)),
        in_iface=_interface(ip.iniface, ip.iniface_mask, bool(inv & X.IPT_INV_VIA_IN)),
        out_iface=_interface(ip.outiface, ip.outiface_mask, bool(inv & X.IPT_INV_VIA_OUT)),
        proto=ip.proto,
        invert_proto=bool(inv & X.IPT_INV_PROTO),
        fragment=bool(ip.flags & X.IPT_F_FRAG),
        invert_fragment=bool(inv & X.IPT_INV_FRAG),
    )
