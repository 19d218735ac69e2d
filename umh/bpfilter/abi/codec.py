"""Parse, validate and rebuild the ipt_replace / ip6t_replace blob of
IPT_SO_SET_REPLACE / IP6T_SO_SET_REPLACE.

parse_replace() refuses what the kernel's do_replace() -> translate_table()
(net/ipv4/netfilter/ip_tables.c, net/ipv6/netfilter/ip6_tables.c, whose checks are
the same but for the entry's layout and flags; net/netfilter/x_tables.c) refuses, with the
same errno, and in the same order, so that the first error reported is the one
the kernel would report.  What it does not do is find_check_entry(): looking
up each extension and running its checkentry belongs to the layer above, which
walks the entries in order and calls check_builtin_target() for the standard
and error targets.
"""
import errno
import gc
import struct
from contextlib import contextmanager
from functools import lru_cache
from itertools import starmap

from ..errors import BpfilterError, invalid
from ..model import Family
from ..tables import kernel_tables
from . import families
from .xtables import (
    CHECKENTRY_WRITES,
    HOOK_NAMES,
    INT_MAX,
    NF_ACCEPT,
    NF_DROP,
    NF_INET_NUMHOOKS,
    NF_QUEUE,
    SIZEOF_IPT_GET_ENTRIES,
    SIZEOF_IPT_GETINFO,
    SIZEOF_IPT_REPLACE,
    SIZEOF_XT_COUNTERS,
    SIZEOF_XT_COUNTERS_INFO,
    SIZEOF_XT_ENTRY_HEADER,
    SIZEOF_XT_ERROR_TARGET,
    SIZEOF_XT_STANDARD_TARGET,
    SIZEOF_XT_TABLE_INFO,
    USERSIZE,
    XT_ALIGN,
    XT_ERROR_TARGET,
    XT_FUNCTION_MAXNAMELEN,
    XT_MAX_TABLE_SIZE,
    XT_RETURN,
    XT_STANDARD_TARGET,
    XT_TABLE_MAXNAMELEN,
    EntryFamily,
    RawEntry,
    RawMatch,
    RawTable,
    RawTarget,
    cstr,
    ipt_get_entries,
    ipt_getinfo,
    ipt_replace,
    name_field,
    xt_counters_info,
    xt_counters_packed,
    xt_entry_match_packed,
    xt_entry_target_packed,
    xt_error_target_packed,
    xt_standard_target_packed,
)

_UNSET = 0xFFFFFFFF
_IN_PROGRESS = 1 << NF_INET_NUMHOOKS  # mark_source_chains' "on the current path" bit

_M_SIZE = xt_entry_match_packed.index("match_size")
_M_NAME = xt_entry_match_packed.index("name")
_M_REVISION = xt_entry_match_packed.index("revision")
_T_SIZE = xt_entry_target_packed.index("target_size")
_T_NAME = xt_entry_target_packed.index("name")
_T_REVISION = xt_entry_target_packed.index("revision")
_MATCH_HEADER = (xt_entry_match_packed, _M_SIZE, _M_NAME, _M_REVISION)
_TARGET_HEADER = (xt_entry_target_packed, _T_SIZE, _T_NAME, _T_REVISION)
# The built-in targets' payloads are read and written alone: build_replace keeps
# the caller's bytes around them.
_VERDICT_AT, _VERDICT = xt_standard_target_packed.field("verdict")
_ERRORNAME_AT, _ERRORNAME = xt_error_target_packed.field("errorname")
# Extension names repeat from rule to rule; bounded, as the blob is the caller's.
_name = lru_cache(maxsize=1024)(cstr)


def _fault(message: str) -> BpfilterError:
    return BpfilterError(errno.EFAULT, message)


@contextmanager
def gc_paused():
    """For decoding a whole table: it allocates objects by the million, none in
    a cycle and all kept, so the cyclic collector would only rescan an ever
    larger heap, again and again (half the time of a 100k-rule table)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ---------------------------------------------------------------- header


def _parse_header(blob: bytes, optlen: "int | None", layout: EntryFamily):
    if optlen is not None and optlen < SIZEOF_IPT_REPLACE:
        raise invalid(f"option length {optlen} is shorter than struct ipt_replace ({SIZEOF_IPT_REPLACE} bytes)")
    if len(blob) < SIZEOF_IPT_REPLACE:
        raise _fault(
            f"only {len(blob)} bytes readable, the kernel would fault copying the "
            f"{SIZEOF_IPT_REPLACE}-byte ipt_replace header"
        )
    hdr = ipt_replace.parse(blob[:SIZEOF_IPT_REPLACE])
    if hdr.num_counters >= INT_MAX // SIZEOF_XT_COUNTERS:
        raise BpfilterError(errno.ENOMEM, f"num_counters {hdr.num_counters} is too large")
    if hdr.num_counters == 0:
        raise invalid("num_counters is 0")
    if optlen is not None and optlen < hdr.size + SIZEOF_IPT_REPLACE:
        raise invalid(
            f"option length {optlen} is shorter than the header plus the {hdr.size} bytes of entries it announces"
        )
    if SIZEOF_XT_TABLE_INFO + hdr.size >= XT_MAX_TABLE_SIZE:
        raise BpfilterError(errno.ENOMEM, f"table size {hdr.size} exceeds the kernel's table size limit")
    if len(blob) < SIZEOF_IPT_REPLACE + hdr.size:
        raise _fault(
            f"size announces {hdr.size} bytes of entries but only {len(blob) - SIZEOF_IPT_REPLACE} "
            "follow the header; the kernel would fault copying them"
        )
    # xt_alloc_entry_offsets() refuses an offsets array larger than the table limit.
    if hdr.num_entries > XT_MAX_TABLE_SIZE // 4:
        raise BpfilterError(errno.ENOMEM, f"num_entries {hdr.num_entries} is too large")
    # The kernel forces the last byte of the name to NUL before using it.
    return RawTable(
        abi=layout,
        name=cstr(hdr.name[: XT_TABLE_MAXNAMELEN - 1]),
        valid_hooks=hdr.valid_hooks,
        hook_entry=list(hdr.hook_entry),
        underflow=list(hdr.underflow),
        num_entries=hdr.num_entries,
        size=hdr.size,
        num_counters=hdr.num_counters,
        counters_ptr=hdr.counters,
    )


# ---------------------------------------------------------------- entries


def _verdict_ok(verdict: int) -> bool:
    if verdict > 0:
        return True
    return verdict in (XT_RETURN, -NF_ACCEPT - 1, -NF_DROP - 1, -NF_QUEUE - 1)


def _check_entry_offsets(raw: bytes, index: int, off: int, target_offset: int, next_offset: int,
                         targets: dict, entry_size: int):
    """xt_check_entry_offsets(): the target and the match chain fit the entry.
    Returns them, decoded: (matches, target). `targets` holds the targets parsed so
    far by their bytes and place in the entry, which decide their checks: most
    entries end in one of a few (ACCEPT, DROP, a jump), parsed once."""
    seen = targets.get((raw[target_offset:], target_offset))
    if seen is not None:
        return _check_entry_match(raw, index, off, target_offset, entry_size), seen
    if target_offset < entry_size:
        raise invalid(f"offset {off}: target_offset {target_offset} points inside the {entry_size}-byte entry header", index)
    if target_offset + SIZEOF_XT_ENTRY_HEADER > next_offset:
        raise invalid(f"offset {off}: target_offset {target_offset} leaves no room for a target before next_offset {next_offset}", index)
    header = xt_entry_target_packed.unpack_from(raw, target_offset)
    target_size = header[_T_SIZE]
    if target_size < SIZEOF_XT_ENTRY_HEADER:
        raise invalid(f"offset {off}: target_size {target_size} is smaller than the target header", index)
    if target_offset + target_size > next_offset:
        raise invalid(f"offset {off}: target (offset {target_offset}, size {target_size}) runs past next_offset {next_offset}", index)
    target = RawTarget(_name(header[_T_NAME]), header[_T_REVISION], target_size,
                       raw[target_offset + SIZEOF_XT_ENTRY_HEADER : target_offset + target_size])
    # The built-in targets' payloads are read where the kernel reads them, even
    # when target_size claims less.
    if target.name == XT_STANDARD_TARGET:
        if XT_ALIGN(target_offset + SIZEOF_XT_STANDARD_TARGET) != next_offset:
            raise invalid(
                f"offset {off}: standard target at {target_offset} needs next_offset "
                f"{XT_ALIGN(target_offset + SIZEOF_XT_STANDARD_TARGET)}, not {next_offset}",
                index,
            )
        target.verdict = _VERDICT.unpack_from(raw, target_offset + _VERDICT_AT)[0]
        if not _verdict_ok(target.verdict):
            raise invalid(f"offset {off}: standard target verdict {target.verdict} is neither a jump nor ACCEPT/DROP/QUEUE/RETURN", index)
    elif target.name == XT_ERROR_TARGET:
        if target_size != SIZEOF_XT_ERROR_TARGET:
            raise invalid(f"offset {off}: ERROR target size {target_size} is not {SIZEOF_XT_ERROR_TARGET}", index)
        errorname = _ERRORNAME.unpack_from(raw, target_offset + _ERRORNAME_AT)[0]
        if b"\0" not in errorname:
            raise invalid(f"offset {off}: ERROR target name is not NUL-terminated", index)
        target.errorname = cstr(errorname)
    targets[raw[target_offset:], target_offset] = target
    return _check_entry_match(raw, index, off, target_offset, entry_size), target


def _check_entry_match(raw: bytes, index: int, off: int, target_offset: int,
                       entry_size: int) -> "list[RawMatch]":
    """xt_check_entry_match(): the matches tile [entry header's end, target_offset)
    exactly. Returns them, decoded."""
    matches = []
    pos = entry_size
    length = target_offset - pos
    while length > 0:
        # The entry itself is 8-byte aligned here, so the in-entry offset decides.
        if pos % 8:
            raise invalid(f"offset {off}: match at {pos}: not 8-byte aligned", index)
        if length < SIZEOF_XT_ENTRY_HEADER:
            raise invalid(f"offset {off}: match at {pos}: only {length} bytes left before the target, less than a match header", index)
        header = xt_entry_match_packed.unpack_from(raw, pos)
        match_size = header[_M_SIZE]
        if match_size < SIZEOF_XT_ENTRY_HEADER:
            raise invalid(f"offset {off}: match at {pos}: match_size {match_size} is smaller than the match header", index)
        if match_size > length:
            raise invalid(f"offset {off}: match at {pos}: match_size {match_size} runs past target_offset {target_offset}", index)
        matches.append(RawMatch(_name(header[_M_NAME]), header[_M_REVISION], match_size,
                                raw[pos + SIZEOF_XT_ENTRY_HEADER : pos + match_size]))
        length -= match_size
        pos += match_size
    return matches


def unconditional(e: RawEntry, layout: EntryFamily) -> bool:
    """The kernel's test for a chain's end: no match, and an ip part all zero bytes
    (padding included: it compares the whole struct)."""
    return (e.target_offset == layout.entry_size
            and e.raw[:layout.ip_size] == layout.unconditional_ip)


def _check_underflow(e: RawEntry, layout: EntryFamily) -> bool:
    """A chain policy: an unconditional standard ACCEPT or DROP."""
    verdict = e.target.verdict
    if not unconditional(e, layout) or verdict is None:
        return False
    return ((-verdict - 1) & 0xFFFFFFFF) in (NF_DROP, NF_ACCEPT)


def _rule_bytes(raw: bytes, layout: EntryFamily) -> bytes:
    """An entry's bytes without comefrom and counters: entries equal in these pass the
    same checks and mean the same rule. The padding between them (ip6t_entry's 4
    bytes) stays: GET_ENTRIES returns the caller's, so an entry that changes only
    there is not the same."""
    comefrom_end = layout.comefrom_at + layout.comefrom_field.size
    return (raw[:layout.comefrom_at] + raw[comefrom_end:layout.counters_at]
            + raw[layout.entry_size:])


def _rule_index(table: RawTable) -> "dict[bytes, RawEntry]":
    if table.by_rule_bytes is None:
        layout = table.abi
        table.by_rule_bytes = {_rule_bytes(e.raw, layout): e for e in table.entries}
    return table.by_rule_bytes


def _walk_entries(table: RawTable, body: bytes, hook_entry: list, underflow: list,
                  previous: "RawTable | None") -> None:
    """translate_table()'s first pass: check_entry_size_and_hooks() on each entry.
    An entry with the bytes of one of `previous` takes that entry's parse, checks
    included: they depend on nothing else (the position-dependent ones are made
    here for every entry)."""
    layout = table.abi
    entry_size = layout.entry_size
    hook_offsets = {table.hook_entry[h] for h in range(NF_INET_NUMHOOKS) if table.valid_hooks & (1 << h)}
    hook_offsets.update(table.underflow[h] for h in range(NF_INET_NUMHOOKS) if table.valid_hooks & (1 << h))
    known = _rule_index(previous) if previous and previous.abi is layout else {}
    # made while looking entries up; a first parse leaves it to the next replace
    by_rule_bytes = table.by_rule_bytes = {} if known else None
    targets: dict = {}
    entries, same_as, size = table.entries, table.same_as, table.size
    volatile = layout.volatile
    next_offset_field, next_offset_at = layout.next_offset_field, layout.next_offset_at
    off = 0
    index = 0
    while off < size:
        # entries[] is 8-byte aligned in the kernel, so only the offset matters.
        if off % 8:
            raise invalid(f"offset {off}: entry is not 8-byte aligned (previous next_offset is not a multiple of 8)", index)
        if off + entry_size >= size:
            raise invalid(f"offset {off}: only {size - off} bytes left, not enough for an entry", index)
        next_offset = next_offset_field.unpack_from(body, off + next_offset_at)[0]
        if off + next_offset > size:
            raise invalid(f"offset {off}: next_offset {next_offset} runs past the end of the table ({size} bytes)", index)
        if next_offset < entry_size + SIZEOF_XT_ENTRY_HEADER:
            raise invalid(f"offset {off}: next_offset {next_offset} is smaller than an entry with a target", index)
        raw = body[off : off + next_offset]
        if known:
            rule_bytes = _rule_bytes(raw, layout)
            same = known.get(rule_bytes)
        else:
            same = None
        if same is None:
            e = _parse_entry(raw, index, off, targets, layout)
        else:
            e = RawEntry(index, off, same.ip, same.nfcache, same.target_offset, next_offset,
                         *volatile(raw), same.matches, same.target, raw)
            same_as[index] = same.index
        if off in hook_offsets:
            _check_hooks(table, e, hook_entry, underflow)
        entries.append(e)
        if by_rule_bytes is not None:
            by_rule_bytes[rule_bytes] = e
        off += next_offset
        index += 1


def _parse_entry(raw: bytes, index: int, off: int, targets: dict, layout: EntryFamily) -> RawEntry:
    """check_entry_size_and_hooks() on one entry, from its flags on."""
    L = layout
    header = L.entry_packed.unpack_from(raw)
    flags, invflags = header[L.E_FLAGS], header[L.E_INVFLAGS]
    if flags & ~L.flags_mask:
        raise invalid(f"offset {off}: unknown ip flags 0x{flags & ~L.flags_mask:02x}", index)
    if invflags & ~L.invflags_mask:
        raise invalid(f"offset {off}: unknown ip invflags 0x{invflags & ~L.invflags_mask:02x}", index)
    target_offset, next_offset = header[L.E_TARGET_OFFSET], header[L.E_NEXT_OFFSET]
    matches, target = _check_entry_offsets(raw, index, off, target_offset, next_offset, targets,
                                           L.entry_size)
    return RawEntry(index, off, L.raw_ip(*header[L.E_IP]), header[L.E_NFCACHE], target_offset,
                    next_offset, header[L.E_COMEFROM], header[L.E_PCNT], header[L.E_BCNT], matches,
                    target, raw)


def _check_hooks(table: RawTable, e: RawEntry, hook_entry: list, underflow: list) -> None:
    """check_entry_size_and_hooks()'s note of the hook entries and underflows at e."""
    for h in range(NF_INET_NUMHOOKS):
        if not table.valid_hooks & (1 << h):
            continue
        if e.offset == table.hook_entry[h]:
            hook_entry[h] = e.offset
        if e.offset == table.underflow[h]:
            if not _check_underflow(e, table.abi):
                raise invalid(
                    f"offset {e.offset}: underflow (policy) of {HOOK_NAMES[h]} is not an unconditional ACCEPT or DROP",
                    e.index,
                )
            underflow[h] = e.offset


def _check_table_hooks(valid_hooks: int, hook_entry: list, underflow: list) -> None:
    """xt_check_table_hooks(): every valid hook set, hooks in ascending order."""
    max_entry = max_uflow = 0
    seen = False
    for h in range(NF_INET_NUMHOOKS):
        if not valid_hooks & (1 << h):
            continue
        name = HOOK_NAMES[h]
        if hook_entry[h] == _UNSET:
            raise invalid(f"hook {name}: hook_entry does not point at the start of an entry")
        if underflow[h] == _UNSET:
            raise invalid(f"hook {name}: underflow does not point at the start of an entry")
        if seen:
            if max_uflow > underflow[h]:
                raise invalid(f"hook {name}: underflow {underflow[h]} is below the previous hook's {max_uflow}")
            if max_uflow == underflow[h]:
                raise invalid(f"hook {name}: underflow {underflow[h]} duplicates the previous hook's")
            if max_entry > hook_entry[h]:
                raise invalid(f"hook {name}: hook_entry {hook_entry[h]} is below the previous hook's {max_entry}")
            if max_entry == hook_entry[h]:
                raise invalid(f"hook {name}: hook_entry {hook_entry[h]} duplicates the previous hook's")
        max_entry, max_uflow = hook_entry[h], underflow[h]
        seen = True


def _eloop(e: RawEntry, message: str) -> BpfilterError:
    return BpfilterError(errno.ELOOP, f"offset {e.offset}: {message}", e.index)


def _mark_source_chains(table: RawTable, hook_entry: list) -> None:
    """mark_source_chains(), step for step: a depth-first walk from every hook
    that keeps its back pointers in the (zeroed) counters and its path marks in
    comefrom, failing on a loop, a jump to no entry start or a fall off the end.
    The comefrom values it leaves are stored as hook_mask."""
    entries, layout = table.entries, table.abi
    by_offset = {e.offset: e.index for e in entries}
    comefrom = [0] * len(entries)
    back = [0] * len(entries)
    for hook in range(NF_INET_NUMHOOKS):
        if not table.valid_hooks & (1 << hook):
            continue
        pos = hook_entry[hook]
        i = by_offset[pos]
        back[i] = pos
        while True:
            e = entries[i]
            visited = comefrom[i] & (1 << hook)
            if comefrom[i] & _IN_PROGRESS:
                raise _eloop(e, f"rule loop: reached again from {HOOK_NAMES[hook]} while still on its path")
            comefrom[i] |= (1 << hook) | _IN_PROGRESS
            verdict = e.target.verdict
            if (verdict is not None and verdict < 0 and unconditional(e, layout)) or visited:
                # A return or a chain's end: unwind to the last jump.
                while True:
                    comefrom[i] ^= _IN_PROGRESS
                    oldpos, pos = pos, back[i]
                    back[i] = 0
                    if pos == oldpos:
                        break
                    i = by_offset[pos]
                    if oldpos != pos + entries[i].next_offset:
                        break
                if pos == oldpos:
                    break
                e = entries[i]
                nxt = pos + e.next_offset
                if nxt >= table.size:
                    raise _eloop(e, f"returning from a jump falls off the end of the table (reached from {HOOK_NAMES[hook]})")
                i = by_offset[nxt]
                back[i] = pos
                pos = nxt
            else:
                if verdict is not None and verdict >= 0:
                    if verdict not in by_offset:
                        raise _eloop(e, f"jump to offset {verdict}, which is not the start of an entry")
                    newpos = verdict
                else:
                    newpos = pos + e.next_offset
                    if newpos >= table.size:
                        raise _eloop(e, f"falls through past the last entry (reached from {HOOK_NAMES[hook]})")
                i = by_offset[newpos]
                back[i] = pos
                pos = newpos
    for e, mask in zip(entries, comefrom):
        e.hook_mask = mask


@gc_paused()
def parse_replace(blob: bytes, optlen: "int | None" = None, previous: "RawTable | None" = None,
                  family: Family = Family.IPV4) -> RawTable:
    """Parse and validate what iptables (ip6tables, for Family.IPV6) passes to
    setsockopt(IPT_SO_SET_REPLACE), as do_replace() and translate_table() do up to
    find_check_entry().

    optlen is the setsockopt option length when known; the kernel answers a
    length shorter than the data it announces with EINVAL.  Without it, blob is
    taken as all the caller's memory that could be read, so data announced but
    missing is the EFAULT the kernel's copy_from_user would hit.

    The kernel then runs, in this order: find_check_entry() on each entry (the
    extensions, and check_builtin_target()), check_do_replace(), and the
    EAGAIN check that num_counters equals the live table's rule count.

    previous, the table this blob replaces, makes the parse of a large table
    that changes little cheap: see _walk_entries and RawTable.same_as.
    """
    blob = bytes(blob)
    table = _parse_header(blob, optlen, families.of(family))
    body = blob[SIZEOF_IPT_REPLACE : SIZEOF_IPT_REPLACE + table.size]
    hook_entry = [_UNSET] * NF_INET_NUMHOOKS
    underflow = [_UNSET] * NF_INET_NUMHOOKS
    _walk_entries(table, body, hook_entry, underflow, previous)
    if len(table.entries) != table.num_entries:
        raise invalid(f"num_entries is {table.num_entries} but the {table.size} bytes hold {len(table.entries)} entries")
    _check_table_hooks(table.valid_hooks, hook_entry, underflow)
    _mark_source_chains(table, hook_entry)
    return table


def replace_name(blob: bytes) -> str:
    """The table an ipt_replace blob names, read as do_replace() reads it, whatever
    else the blob holds (parse_replace judges that)."""
    return cstr(bytes(blob[: XT_TABLE_MAXNAMELEN - 1]))


def check_do_replace(table: RawTable) -> None:
    """__do_replace()'s checks before it swaps tables: room for the old
    counters, a table of the family by that name, and the same valid_hooks."""
    if table.num_counters * SIZEOF_XT_COUNTERS > XT_MAX_TABLE_SIZE:
        raise BpfilterError(errno.ENOMEM, f"num_counters {table.num_counters} is too large")
    known = kernel_tables(table.abi.family).get(table.name)
    if known is None:
        raise BpfilterError(errno.ENOENT, f"no table named {table.name!r}")
    if table.valid_hooks != known.valid_hooks:
        raise invalid(f"valid_hooks 0x{table.valid_hooks:x} differ from table {table.name!r}'s "
                      f"0x{known.valid_hooks:x}")


def check_builtin_target(entry: RawEntry) -> None:
    """find_check_entry()'s xt_check_target() for the two targets ip_tables
    itself registers (revision 0, payload XT_ALIGN(sizeof(int)) and
    XT_ALIGN(XT_FUNCTION_MAXNAMELEN)).  Call it in find_check_entry order:
    after the entry's matches, instead of an extension's target check."""
    t = entry.target
    where = f"offset {entry.offset}: "
    if t.name == XT_STANDARD_TARGET:
        want, what = SIZEOF_XT_STANDARD_TARGET, "standard target"
    elif t.name == XT_ERROR_TARGET:
        want, what = SIZEOF_XT_ERROR_TARGET, "ERROR target"
    else:
        raise ValueError(f"{t.name!r} is not a built-in target")
    if t.revision != 0:
        raise BpfilterError(errno.ENOENT, where + f"{what} has no revision {t.revision}", entry.index)
    if t.size != want:
        raise invalid(where + f"{what} size {t.size} is not {want}", entry.index)


# ---------------------------------------------------------------- building


def _pack_entry_header(out: bytearray, pos: int, e: RawEntry, layout: EntryFamily) -> None:
    L = layout
    values = [0] * L.entry_packed.count
    values[L.E_IP] = L.ip_values(e.ip)
    values[L.E_NFCACHE] = e.nfcache
    values[L.E_TARGET_OFFSET] = e.target_offset
    values[L.E_NEXT_OFFSET] = e.next_offset
    values[L.E_COMEFROM] = e.comefrom
    values[L.E_PCNT] = e.pcnt
    values[L.E_BCNT] = e.bcnt
    L.entry_packed.pack_into(out, pos, *values)


@lru_cache(maxsize=1024)
def _extension_header(layout: tuple, size: int, name: str, revision: int) -> bytes:
    """A match's or target's 32-byte header, the name NUL-padded; rules repeat them."""
    packed, size_at, name_at, revision_at = layout
    values = [0] * packed.count
    values[size_at], values[name_at], values[revision_at] = size, name.encode("latin-1"), revision
    return packed.pack(*values)


def _build_entry(e: RawEntry, layout: EntryFamily) -> bytearray:
    t = e.target
    tpos = layout.entry_size + sum(SIZEOF_XT_ENTRY_HEADER + len(m.data) for m in e.matches)
    end = tpos + SIZEOF_XT_ENTRY_HEADER + len(t.data)
    out = bytearray(max(end, e.next_offset))
    _pack_entry_header(out, 0, e, layout)
    pos = layout.entry_size
    for m in e.matches:
        out[pos : pos + SIZEOF_XT_ENTRY_HEADER] = _extension_header(_MATCH_HEADER, m.size, m.name, m.revision)
        pos += SIZEOF_XT_ENTRY_HEADER
        out[pos : pos + len(m.data)] = m.data
        pos += len(m.data)
    out[tpos : tpos + SIZEOF_XT_ENTRY_HEADER] = _extension_header(_TARGET_HEADER, t.size, t.name, t.revision)
    out[tpos + SIZEOF_XT_ENTRY_HEADER : end] = t.data
    if t.verdict is not None and tpos + _VERDICT_AT + _VERDICT.size <= len(out):
        _VERDICT.pack_into(out, tpos + _VERDICT_AT, t.verdict)
    if t.errorname is not None and tpos + _ERRORNAME_AT + _ERRORNAME.size <= len(out):
        _ERRORNAME.pack_into(out, tpos + _ERRORNAME_AT, t.errorname.encode("latin-1"))
    return out


def build_replace(table: RawTable) -> bytes:
    """The replace blob for table, from its fields (not from entry.raw).

    Bytes nothing reads are written as zeros, as iptables writes them: those
    after a name's NUL and those between an entry's target and next_offset.
    verdict and errorname, when set, override the start of the target payload.
    """
    hdr = ipt_replace.build(
        dict(
            name=name_field(table.name, XT_TABLE_MAXNAMELEN),
            valid_hooks=table.valid_hooks,
            num_entries=table.num_entries,
            size=table.size,
            hook_entry=table.hook_entry,
            underflow=table.underflow,
            num_counters=table.num_counters,
            counters=table.counters_ptr,
        )
    )
    return hdr + b"".join(_build_entry(e, table.abi) for e in table.entries)


def _payload_to_user(kind: str, obj, size: int) -> bytes:
    """xt_data_to_user(): the first usersize bytes, zeros up to the payload end."""
    data = obj.data[: size - SIZEOF_XT_ENTRY_HEADER]
    usersize = USERSIZE.get((kind, obj.name, obj.revision))
    if kind == "target" and obj.name == XT_STANDARD_TARGET:
        usersize = 4
    elif kind == "target" and obj.name == XT_ERROR_TARGET:
        usersize = XT_FUNCTION_MAXNAMELEN
    written = CHECKENTRY_WRITES.get((kind, obj.name, obj.revision))
    if written is not None:
        data = written(data)
    if usersize is not None:
        data = data[:usersize] + bytes(max(0, len(data) - usersize))
    return data


def entries_as_kernel_returns(table: RawTable, counters: "list[tuple[int, int]]") -> bytes:
    """What IPT_SO_GET_ENTRIES returns for table (as accepted by parse_replace)."""
    if len(counters) != len(table.entries):
        raise ValueError(f"{len(counters)} counters for {len(table.entries)} entries")
    return with_counters(table, kernel_entries(table),
                         b"".join(starmap(xt_counters_packed.pack, counters)))


def kernel_entries(table: RawTable, previous: "tuple[RawTable, bytes] | None" = None) -> bytes:
    """What IPT_SO_GET_ENTRIES returns for table with every counter zero: the
    part that changes only with the table (see with_counters). `previous`: the
    table `table` was parsed against (parse_replace) and its kernel_entries, whose
    entries the unchanged ones (RawTable.same_as) take, but for their comefrom.

    copy_entries_to_user() copies each entry header as the caller wrote it (padding
    included) with comefrom as mark_source_chains left it and counters[i] =
    (pcnt, bcnt) put in, then
    rewrites every match and target through xt_match_to_user() /
    xt_target_to_user(): size, the extension's name up to its NUL, revision,
    and the payload with kernel-private bytes (past usersize, and the
    alignment padding of the built-in targets) zeroed.  Bytes the kernel never
    writes keep the caller's buffer, taken here to be zero-filled.
    """
    out = bytearray(table.size)
    old_table, old_entries = previous if previous else (None, b"")
    same_as = table.same_as if previous else {}
    layout = table.abi
    entry_size, counters_at = layout.entry_size, layout.counters_at
    comefrom_field, comefrom_at = layout.comefrom_field, layout.comefrom_at
    for e in table.entries:
        old = same_as.get(e.index)
        if old is not None:
            at = old_table.entries[old].offset
            out[e.offset : e.offset + e.next_offset] = old_entries[at : at + e.next_offset]
            comefrom_field.pack_into(out, e.offset + comefrom_at, e.hook_mask)
            continue
        out[e.offset : e.offset + counters_at] = e.raw[:counters_at]
        comefrom_field.pack_into(out, e.offset + comefrom_at, e.hook_mask)
        pos = e.offset + entry_size
        for m in e.matches:
            out[pos : pos + SIZEOF_XT_ENTRY_HEADER] = _extension_header(_MATCH_HEADER, m.size, m.name, m.revision)
            data = _payload_to_user("match", m, m.size)
            out[pos + SIZEOF_XT_ENTRY_HEADER : pos + SIZEOF_XT_ENTRY_HEADER + len(data)] = data
            pos += m.size
        t = e.target
        tpos = e.offset + e.target_offset
        out[tpos : tpos + SIZEOF_XT_ENTRY_HEADER] = _extension_header(_TARGET_HEADER, t.size, t.name, t.revision)
        data = _payload_to_user("target", t, t.size)
        out[tpos + SIZEOF_XT_ENTRY_HEADER : tpos + SIZEOF_XT_ENTRY_HEADER + len(data)] = data
    return bytes(out)


def with_counters(table: RawTable, entries: bytes, counters: bytes) -> bytes:
    """kernel_entries(table) with each entry's counters put in from `counters`,
    an array of struct xt_counters in entry order."""
    if len(counters) != len(table.entries) * SIZEOF_XT_COUNTERS:
        raise ValueError(f"{len(counters) // SIZEOF_XT_COUNTERS} counters for {len(table.entries)} entries")
    out = bytearray(entries)
    at = 0
    counters_at = table.abi.counters_at
    for e in table.entries:
        pos = e.offset + counters_at
        out[pos : pos + SIZEOF_XT_COUNTERS] = counters[at : at + SIZEOF_XT_COUNTERS]
        at += SIZEOF_XT_COUNTERS
    return bytes(out)


# ---------------------------------------------------------------- getsockopt replies


def getinfo_bytes(table: RawTable) -> bytes:
    """IPT_SO_GET_INFO's reply; hooks the table lacks read 0xFFFFFFFF, as
    translate_table() leaves them."""
    hook_entry = [table.hook_entry[h] if table.valid_hooks & (1 << h) else _UNSET for h in range(NF_INET_NUMHOOKS)]
    underflow = [table.underflow[h] if table.valid_hooks & (1 << h) else _UNSET for h in range(NF_INET_NUMHOOKS)]
    return ipt_getinfo.build(
        dict(
            name=name_field(table.name, XT_TABLE_MAXNAMELEN),
            valid_hooks=table.valid_hooks,
            hook_entry=hook_entry,
            underflow=underflow,
            num_entries=table.num_entries,
            size=table.size,
        )
    )


def parse_getinfo(data: bytes) -> dict:
    if len(data) != SIZEOF_IPT_GETINFO:
        raise invalid(f"ipt_getinfo is {SIZEOF_IPT_GETINFO} bytes, got {len(data)}")
    g = ipt_getinfo.parse(data)
    return dict(
        name=cstr(g.name[: XT_TABLE_MAXNAMELEN - 1]),
        valid_hooks=g.valid_hooks,
        hook_entry=list(g.hook_entry),
        underflow=list(g.underflow),
        num_entries=g.num_entries,
        size=g.size,
    )


def getinfo_request(name: str) -> bytes:
    return name_field(name, SIZEOF_IPT_GETINFO)


def get_entries_request(name: str, size: int) -> bytes:
    """An ipt_get_entries header followed by room for size bytes of entries."""
    return ipt_get_entries.build(dict(name=name_field(name, XT_TABLE_MAXNAMELEN), size=size)) + bytes(size)


def parse_get_entries_header(header: bytes, optlen: int) -> dict:
    """The ipt_get_entries header of a buffer of optlen bytes, as the kernel's
    get_entries() checks it, which reads nothing else of the buffer: optlen must be
    exactly the header plus size."""
    if optlen < SIZEOF_IPT_GET_ENTRIES:
        raise invalid(f"ipt_get_entries is at least {SIZEOF_IPT_GET_ENTRIES} bytes, got {optlen}")
    g = ipt_get_entries.parse(header[:SIZEOF_IPT_GET_ENTRIES])
    if optlen != SIZEOF_IPT_GET_ENTRIES + g.size:
        raise invalid(f"ipt_get_entries announces {g.size} bytes of entries but carries {optlen - SIZEOF_IPT_GET_ENTRIES}")
    return dict(name=cstr(g.name[: XT_TABLE_MAXNAMELEN - 1]), size=g.size)


def parse_get_entries(data: bytes) -> dict:
    """A whole ipt_get_entries (the kernel's answer), checked as get_entries() checks
    its argument."""
    return dict(parse_get_entries_header(data, len(data)), entries=data[SIZEOF_IPT_GET_ENTRIES:])


def build_counters_info(name: str, counters: "list[tuple[int, int]]") -> bytes:
    """The IPT_SO_SET_ADD_COUNTERS payload; counters are (pcnt, bcnt)."""
    hdr = xt_counters_info.build(dict(name=name_field(name, XT_TABLE_MAXNAMELEN), num_counters=len(counters)))
    # (pcnt, bcnt) is xt_counters' order (tests/test_abi_bridge.py holds it so).
    return hdr + b"".join(starmap(xt_counters_packed.pack, counters))


class Counters:
    """The (pcnt, bcnt) pairs of an xt_counters_info, unpacked only when read: up to
    32M of them fit a request, and the kernel compares their number with the
    table's (do_add_counters) before it adds any, so a count the table refuses
    costs nothing here."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed) // SIZEOF_XT_COUNTERS

    def __iter__(self):
        return xt_counters_packed.iter_unpack(self.packed)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def parse_counters_info(data: bytes) -> "tuple[str, Counters]":
    """As xt_copy_counters_from_user() checks it: at least one counter, and
    exactly num_counters of them."""
    if len(data) <= SIZEOF_XT_COUNTERS_INFO:
        raise invalid(f"xt_counters_info needs more than {SIZEOF_XT_COUNTERS_INFO} bytes, got {len(data)}")
    h = xt_counters_info.parse(data[:SIZEOF_XT_COUNTERS_INFO])
    rest = memoryview(data)[SIZEOF_XT_COUNTERS_INFO:]   # not a copy
    if h.num_counters * SIZEOF_XT_COUNTERS != len(rest):
        raise invalid(f"num_counters is {h.num_counters} but {len(rest)} bytes of counters follow")
    return cstr(h.name[: XT_TABLE_MAXNAMELEN - 1]), Counters(rest)


def initial_replace(name: str, family: Family = Family.IPV4) -> bytes:
    """The table the kernel creates when a namespace first uses `name`
    (xt_alloc_initial_table): an unconditional ACCEPT policy per hook, then ERROR."""
    valid_hooks = kernel_tables(family)[name].valid_hooks
    layout = families.of(family)
    no_ip = layout.raw_ip(*layout.ip_packed.unpack_from(layout.unconditional_ip))
    accept = -NF_ACCEPT - 1
    policy = RawTarget(XT_STANDARD_TARGET, 0, SIZEOF_XT_STANDARD_TARGET,
                       struct.pack("<i4x", accept), verdict=accept)
    error = RawTarget(XT_ERROR_TARGET, 0, SIZEOF_XT_ERROR_TARGET,
                      name_field(XT_ERROR_TARGET, SIZEOF_XT_ERROR_TARGET - SIZEOF_XT_ENTRY_HEADER),
                      errorname=XT_ERROR_TARGET)
    hooks = [h for h in range(NF_INET_NUMHOOKS) if valid_hooks & (1 << h)]
    entries, offset = [], 0
    for target in [policy] * len(hooks) + [error]:
        size = layout.entry_size + target.size
        entries.append(RawEntry(len(entries), offset, no_ip, 0, layout.entry_size, size, 0, 0, 0,
                                [], target, b""))
        offset += size
    starts = [_UNSET] * NF_INET_NUMHOOKS
    for position, hook in enumerate(hooks):
        starts[hook] = entries[position].offset
    table = RawTable(layout, name, valid_hooks, starts, list(starts), len(entries), offset,
                     len(entries), 0, entries)
    return build_replace(table)
