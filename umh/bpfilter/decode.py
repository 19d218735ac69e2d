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

import bisect
import errno

from . import ext, packet
from .errors import BpfilterError
from .model import (Accept, AnyIpHeader, Chain, Drop, ExtensionTarget, Fallthrough, Family, Goto,
                    Hook, Jump, Match, Return, Rule, Stray, Table, Verdict)
from .abi import xtables as X
from .abi.codec import (check_builtin_target, check_do_replace, gc_paused, parse_replace,
                        unconditional)
from .abi.xtables import RawEntry, RawTable
from .ext.linux import QUEUE_WHY
from .tables import implemented

_STANDARD_VERDICTS = {-X.NF_ACCEPT - 1: Accept(), -X.NF_DROP - 1: Drop(), X.XT_RETURN: Return()}


def _unsupported(message: str, entry: "int | None" = None) -> BpfilterError:
    return BpfilterError(errno.EOPNOTSUPP, message + "; the whole table is refused", entry)


def _is_error(entry: RawEntry) -> bool:
    return entry.target.name == X.XT_ERROR_TARGET


@gc_paused()
def table_from_raw(raw: RawTable, previous: "tuple[RawTable, Table] | None" = None) -> Table:
    """The model of `raw`. `previous` is the table it replaces, as parsed (the one
    codec.parse_replace compared it with) and as decoded: the rules of entries that
    did not change (RawTable.same_as) are taken over from it."""
    entries, layout = raw.entries, raw.abi
    family, decode_ip = layout.family, layout.decode_ip
    starts = _chain_starts(raw)
    spans = _chain_spans(starts, len(entries))
    where = _Places(starts, spans)
    reused = _reused_rules(raw, previous)
    ips: list[AnyIpHeader] = []
    matches: list[list[Match]] = []
    targets: dict[int, ExtensionTarget] = {}
    # A match decodes, checks included, from its bytes, the rule's protocol and the
    # hooks the rule is reachable from: rules repeating one share its model (immutable).
    decoded: dict[tuple, Match] = {}
    # Rules repeat their ip part too (every rule of a per-port list has the same one),
    # and the parse shares equal targets, checked once.
    ip_parts: dict[bytes, AnyIpHeader] = {}
    builtin_checked: set[int] = set()
    for e in entries:
        rule = reused.get(e.index)
        if rule is not None:
            ips.append(rule.ip)
            matches.append(rule.matches)
            if isinstance(rule.target, ExtensionTarget):
                targets[e.index] = rule.target
            continue
        ip_bytes = e.raw[:layout.ip_size]   # as parsed: the entry's ip part
        ip = ip_parts.get(ip_bytes)
        if ip is None:
            ip = ip_parts[ip_bytes] = decode_ip(e.ip)
        ips.append(ip)
        place = _Place(where, e.index)
        rule_matches = []
        for m in e.matches:
            context = (m.name, m.revision, m.data, ip.proto, ip.invert_proto, e.hook_mask)
            match = decoded.get(context)
            if match is None:
                match = decoded[context] = ext.decode_match(m.name, m.revision, m.data, ip,
                                                            family, place, e.hook_mask, raw.name)
            rule_matches.append(match)
        matches.append(rule_matches)
        t = e.target
        if t.name in (X.XT_STANDARD_TARGET, X.XT_ERROR_TARGET):
            if id(t) not in builtin_checked:
                check_builtin_target(e)
                builtin_checked.add(id(t))
        else:
            targets[e.index] = ext.decode_target(t.name, t.revision, t.data, ip, family, place,
                                                 e.hook_mask, raw.name, e.raw[:e.target_offset])
    check_do_replace(raw)
    supported = implemented(family)
    if raw.name not in supported:
        raise _unsupported(f"{layout.command} table '{raw.name}' is not supported by bpfilter "
                           f"yet (supported: {', '.join(supported)})")
    flavour = packet.flavour(family)
    for e, rule_matches in zip(entries, matches):
        reason = flavour.unsupported_ip(ips[e.index], ext.reads_transport(rule_matches, family))
        if reason:
            raise _unsupported(f"{where[e.index]}: {reason}")
        for match in rule_matches:
            reason = ext.unsupported_match(match, family)
            if reason:
                raise _unsupported(f"{where[e.index]}: match "
                                   f"'{match.name}' {reason}")
    for index, target in targets.items():
        reason = ext.unsupported_target(target, family)
        if reason:
            raise _unsupported(f"{where[index]}: target '{target.name}' "
                               f"{reason}")

    if not _is_error(entries[-1]):
        raise _unsupported("the table does not end with an ERROR entry", entries[-1].index)
    by_offset = {e.offset: e.index for e in entries}
    chain_of_jump = {index: c.key for index, c in starts.items() if not c.builtin}
    for first, (start, end) in spans.items():
        chain = starts[first]
        body = entries[start:end]
        if not body:
            raise _unsupported(f"chain '{chain.name}' has no final policy/RETURN entry", first)
        _check_tail(raw, chain, body[-1])
        chain.tail_entry = body[-1].index
        for e in body[:-1]:
            target = targets[e.index] if e.index in targets else _target(
                e, where, by_offset, chain_of_jump, layout.goto_flag)
            chain.rules.append(Rule(e.index, ips[e.index], matches[e.index], target,
                                    _reached(e), unconditional(e, layout)))
    return Table(raw.name, family, {starts[i].key: starts[i] for i in sorted(starts)},
                 raw.num_entries)


def table_from_blob(blob: bytes, family: Family, optlen: "int | None" = None,
                    previous: "tuple[RawTable, Table] | None" = None) -> tuple[RawTable, Table]:
    """The pipeline's first half, for every user of a replace blob (the service's
    requests and recovery, check, show): parsed and checked as the kernel's
    translate_table() does (codec.parse_replace), then modelled and checked as its
    find_check_entry() and __do_replace() do (table_from_raw)."""
    raw = parse_replace(blob, optlen=optlen, previous=previous and previous[0], family=family)
    return raw, table_from_raw(raw, previous)


def _reused_rules(raw: RawTable, previous: "tuple[RawTable, Table] | None") -> dict[int, Rule]:
    """Entry index -> the rule of `previous` whose decoding it can take over. How an
    entry decodes, checks included, depends on its bytes, on the hooks it is
    reachable from (extensions' checkentry sees them) and on the table, nothing
    else; `previous` passed every check."""
    if previous is None or not raw.same_as:
        return {}
    old_raw, old_table = previous
    old_rules = {r.entry: r for chain in old_table.chains.values() for r in chain.rules}
    reused = {}
    for index, old in raw.same_as.items():
        rule = old_rules.get(old)
        if rule is not None and old_raw.entries[old].hook_mask == raw.entries[index].hook_mask:
            reused[index] = rule
    return reused


class _Places:
    """Where each entry is, as error messages say it: entry index -> text, made
    when asked for (a message, or a rule decoded afresh)."""

    def __init__(self, starts: dict[int, Chain], spans: dict[int, tuple[int, int]]):
        self.starts, self.spans, self.firsts = starts, spans, sorted(spans)

    def __getitem__(self, index: int) -> str:
        at = bisect.bisect_right(self.firsts, index) - 1
        if at >= 0:
            first, end = self.spans[self.firsts[at]]
            if index < end:
                chain = self.starts[first]
                what = f"rule {index - first + 1}" if index < end - 1 else (
                    "policy" if chain.builtin else "final RETURN")
                return f"chain {chain.name} {what} (entry {index})"
        return f"entry {index}"


class _Place:
    """One entry's place, for the messages its decoding may raise: made into text
    only then (formatting it for each of 100k entries would cost a tenth of a
    second)."""

    __slots__ = ("places", "index")

    def __init__(self, places: _Places, index: int):
        self.places, self.index = places, index

    def __str__(self) -> str:
        return self.places[self.index]


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
    _key_chains(starts)
    return starts


def _key_chains(starts: dict[int, Chain]) -> None:
    """Give every chain a key of its own (Chain.key). The kernel knows chains by
    offset only: it accepts two user chains of one name, and one named like a
    built-in chain, and runs each as written; keyed by name, they would merge. A
    built-in chain, then the first user chain of a name, keep the name; another
    is keyed by name and entry index."""
    taken = {c.name for c in starts.values() if c.builtin}
    names = {c.name for c in starts.values()}
    for first in sorted(starts):
        chain = starts[first]
        if chain.builtin:
            continue
        if chain.name in taken:
            key = f"{chain.name}@{first}"
            while key in taken or key in names:
                key += "'"
            chain.key = key
        taken.add(chain.key)


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
    elif not (unconditional(tail, raw.abi) and tail.target.name == X.XT_STANDARD_TARGET
              and verdict == X.XT_RETURN):
        raise _unsupported(f"user chain '{chain.name}' does not end with an unconditional RETURN",
                           tail.index)


def _reached(e: RawEntry) -> bool:
    return bool(e.hook_mask & ((1 << X.NF_INET_NUMHOOKS) - 1))


def _target(e: RawEntry, where: _Places, by_offset, chain_of_jump, goto_flag: int):
    t = e.target
    if t.name == X.XT_ERROR_TARGET:
        raise _unsupported(f"{where[e.index]}: ERROR target inside a chain")
    if t.verdict < 0:
        if t.verdict not in _STANDARD_VERDICTS:
            if t.verdict == -X.NF_QUEUE - 1:
                raise _unsupported(f"{where[e.index]}: QUEUE is refused: {QUEUE_WHY}")
            raise _unsupported(f"{where[e.index]}: verdict {t.verdict} is not supported by "
                               "bpfilter")
        return _STANDARD_VERDICTS[t.verdict]
    target_index = by_offset.get(t.verdict)
    if target_index == e.index + 1:
        return Fallthrough()
    if target_index not in chain_of_jump and not _reached(e):
        return Stray(t.verdict)
    if target_index not in chain_of_jump:
        raise _unsupported(f"{where[e.index]}: jumps to entry {target_index}, which does not "
                           "start a user-defined chain (iptables never writes such a jump)")
    name = chain_of_jump[target_index]
    return Goto(name) if e.ip.flags & goto_flag else Jump(name)
