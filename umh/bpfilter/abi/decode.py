"""From a validated raw table (codec.parse_replace) to the neutral model.

The kernel accepts any entry layout that passes translate_table(); libiptc only ever
writes one: built-in chains in hook order, each ending in its policy, then user
chains, each an ERROR head naming it, its rules and an unconditional RETURN, then a
final ERROR entry. bpfilter models chains, so it requires that layout and refuses
anything else (e.g. a jump into the middle of a chain) with a message, never a guess.
"""
from __future__ import annotations

import errno

from .. import ext
from ..errors import BpfilterError
from ..model import (Accept, Chain, Drop, Fallthrough, Family, Goto, Hook, Interface, IpHeader,
                     Jump, Prefix, Return, Rule, Table, Verdict)
from . import xtables as X
from .xtables import RawEntry, RawTable

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


def table_from_raw(raw: RawTable, family: Family = Family.IPV4) -> Table:
    entries = raw.entries
    by_offset = {e.offset: e.index for e in entries}
    hooks = [Hook(h) for h in range(X.NF_INET_NUMHOOKS) if raw.valid_hooks & (1 << h)]

    # Chain starts: each hook entry, and the entry after every user chain's ERROR head.
    starts: dict[int, Chain] = {}
    for hook in hooks:
        starts[by_offset[raw.hook_entry[hook]]] = Chain(hook.chain_name, hook=hook)
    for e in entries[:-1]:
        if _is_error(e):
            name = e.target.errorname
            if e.index + 1 in starts:
                raise _unsupported(f"user chain '{name}' starts at a hook entry", e.index)
            starts[e.index + 1] = Chain(name)
    if not _is_error(entries[-1]):
        raise _unsupported("the table does not end with an ERROR entry", entries[-1].index)

    chains = {starts[index].name: starts[index] for index in sorted(starts)}
    chain_of_jump = {index: c.name for index, c in starts.items() if not c.builtin}

    order = sorted(starts)
    for pos, first in enumerate(order):
        chain = starts[first]
        if pos + 1 == len(order):
            end = len(entries) - 1             # the final ERROR entry
        else:
            end = order[pos + 1]
            if not starts[end].builtin:
                end -= 1                       # the next user chain's ERROR head
        body = entries[first:end]
        if not body:
            raise _unsupported(f"chain '{chain.name}' has no final policy/RETURN entry", first)
        tail = body[-1]
        _check_tail(raw, chain, tail)
        chain.tail_entry = tail.index
        for e in body[:-1]:
            chain.rules.append(_rule(e, chain, e.index - first + 1, by_offset, chain_of_jump,
                                     family))
    return Table(raw.name, family, chains, raw.num_entries)


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


def _rule(e: RawEntry, chain: Chain, position: int, by_offset, chain_of_jump,
          family: Family) -> Rule:
    where = f"chain {chain.name} rule {position} (entry {e.index})"
    ip = _ip_header(e)
    matches = [ext.decode_match(m.name, m.revision, m.data, ip, family, where) for m in e.matches]
    return Rule(e.index, ip, matches, _target(e, where, by_offset, chain_of_jump))


def _target(e: RawEntry, where: str, by_offset, chain_of_jump):
    t = e.target
    if t.name == X.XT_ERROR_TARGET:
        raise _unsupported(f"{where}: ERROR target inside a chain")
    if t.name != X.XT_STANDARD_TARGET:
        raise _unsupported(f"{where}: target '{t.name}' revision {t.revision} is not supported "
                           "by bpfilter")
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


def _ip_header(e: RawEntry) -> IpHeader:
    ip, inv = e.ip, e.ip.invflags
    return IpHeader(
        src=Prefix(ip.src, ip.smsk, bool(inv & X.IPT_INV_SRCIP)),
        dst=Prefix(ip.dst, ip.dmsk, bool(inv & X.IPT_INV_DSTIP)),
        in_iface=Interface(ip.iniface, ip.iniface_mask, bool(inv & X.IPT_INV_VIA_IN)),
        out_iface=Interface(ip.outiface, ip.outiface_mask, bool(inv & X.IPT_INV_VIA_OUT)),
        proto=ip.proto,
        invert_proto=bool(inv & X.IPT_INV_PROTO),
        fragment=bool(ip.flags & X.IPT_F_FRAG),
        invert_fragment=bool(inv & X.IPT_INV_FRAG),
    )
