"""-m recent (struct xt_recent_mtinfo, revision 0; xt_recent_mtinfo_v1 with --mask,
revision 1).

With bpfilter.ko: the kernel's xt_recent, run by the module (ext/xtmatch.py), so that
its lists are the kernel's: /proc/net/xt_recent/NAME, shared by name with every other
rule of the namespace (ip_tables' too), surviving a replace as they do in the kernel.

Without it (`bpfilter serve`): recent_mt() in BPF, on lists the service keeps
(recentlists.py) in two maps shared by every table of every namespace, as the
kernel's lists are shared by name within a namespace across tables and families:
RECENT_LISTS, a list's mask (its first rule's, as recent_mt_check() keeps), its entry
count and an LRU clock; RECENT_ENTRIES, an entry per (list, family, masked address):
its timestamps (jiffies, a ring of 32 as the kernel's default
roundup_pow_of_two(ip_pkt_list_tot) keeps), its index and count, and its place in
the list's LRU order. A list holds at most ip_list_tot (100) entries: a new one
evicts the least recently set or updated, --reap removes the list's least recent
when it is older than --seconds, as the kernel's LRU list does. An entry keeps the TTL
its last --set or --update saw (the packet's, one more where it leaves by forwarding
or comes from no socket of the namespace, as recent_mt() counts it), which --rttl
lookups must meet (either being 0 meets any). Refused without the module: a
--hitcount above the 32 stamps an entry keeps. Where it differs: the
kernel serialises every list operation under one lock, here each step (a lookup, an
entry's stamps under its own lock, the count under the list's) is atomic, so two
CPUs setting new addresses into a full list at once may both evict; and there is
no /proc/net/xt_recent/NAME to read or write (README).
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional

from construct import Bytes, Int8un, Int32ul, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_ATOMIC_OP, BPF_B, BPF_DW, BPF_EMIT_CALL,
                        BPF_EXIT_INSN, BPF_FETCH, BPF_H, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG,
                        BPF_LD_FUNC, BPF_LD_IMM64, BPF_LD_MAP_FD, BPF_LD_MAP_VALUE,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, MapRef, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.primitives import emit_answer_and_hotdrop, emit_skip_if_decided
from . import BOTH_FAMILIES, missing_kfunc, register_match
from .limit import kernel_hz
from .owner import sock_offsets
from .reject import NF_STATE
from .xtmatch import XT_MATCH_KFUNC, KernelMatchModel, ServedKernelMatch, c_string

BPF_FUNC_map_update_elem, BPF_FUNC_map_delete_elem = 2, 3
BPF_FUNC_for_each_map_elem, BPF_NOEXIST = 164, 1

XT_RECENT_NAME_LEN = 200
XT_RECENT_CHECK, XT_RECENT_SET, XT_RECENT_UPDATE, XT_RECENT_REMOVE = 1, 2, 4, 8
XT_RECENT_TTL, XT_RECENT_REAP = 16, 32
XT_RECENT_VALID_FLAGS = 63
XT_RECENT_DEST = 1

_V0_FIELDS = (
    "seconds" / Int32ul,
    "hit_count" / Int32ul,
    "check_set" / Int8un,
    "invert" / Int8un,
    "name" / Bytes(XT_RECENT_NAME_LEN),
    "side" / Int8un,
    Padding(1),
)
xt_recent_mtinfo = Struct(*_V0_FIELDS)
xt_recent_mtinfo_v1 = Struct(*_V0_FIELDS, "mask" / Bytes(16))


IP_LIST_TOT = 100     # xt_recent's module parameter, its default
NSTAMPS = 32          # roundup_pow_of_two(ip_pkt_list_tot), the default 0: 32
_WHY = "recent rules without bpfilter.ko need the service's lists (bpfilter serve has them)"
RECENT_LISTS = MapRef("recent_lists", _WHY)
RECENT_ENTRIES = MapRef("recent_entries", _WHY)
RECENT_BLANK = MapRef("recent_blank", _WHY)     # one zeroed entry, a new one's start

@dataclass(frozen=True)
class RecentMatch(KernelMatchModel):
    seconds: int
    hit_count: int
    check_set: int
    invert: int
    list_name: str
    side: int
    mask: bytes
    revision: int = 1
    name = "recent"


@dataclass(frozen=True)
class ServedRecentMatch(Match):
    """recent without bpfilter.ko: the same fields, run in BPF (see the docstring)."""
    seconds: int
    hit_count: int
    check_set: int
    invert: int
    list_name: str
    side: int
    mask: bytes
    revision: int = 1
    name = "recent"


class _Recent(ServedKernelMatch):
    name = "recent"
    families = BOTH_FAMILIES
    model = RecentMatch
    environment = (RECENT_LISTS, RECENT_ENTRIES, RECENT_BLANK)
    served_model = ServedRecentMatch
    served_facts = frozenset({"skb", "recent", "nf_state"})

    def served(self, payload: bytes, where: str) -> ServedRecentMatch:
        return ServedRecentMatch(revision=self.revision, **self.decode_fields(payload, where))

    def served_unsupported(self, match) -> Optional[str]:
        why = None
        if match.hit_count > NSTAMPS:
            why = f"a --hitcount above {NSTAMPS}, the timestamps an entry keeps here"
        if why is None:
            return None
        return (f"needs bpfilter.ko (kernel module mode) for {why}: the kernel's own "
                f"xt_recent ({missing_kfunc(XT_MATCH_KFUNC)})")

    def emit_served(self, match, asm, out) -> None:
        _emit_served(self.family, match, asm, out)

    def decode_fields(self, payload: bytes, where: str) -> dict:
        p = self.struct.parse(payload)
        # recent_mt_check()'s tests of the flags, which no kernel changed (the limit on
        # --hitcount did: the kernel's own check, run when the table is loaded, has it)
        modes = p.check_set & (XT_RECENT_SET | XT_RECENT_REMOVE | XT_RECENT_CHECK |
                               XT_RECENT_UPDATE)
        if p.check_set & ~XT_RECENT_VALID_FLAGS or bin(modes).count("1") != 1 or \
                (p.check_set & (XT_RECENT_SET | XT_RECENT_REMOVE) and
                 (p.seconds or p.hit_count or p.check_set & (XT_RECENT_TTL | XT_RECENT_REAP))) \
                or (p.check_set & XT_RECENT_REAP and not p.seconds):
            raise BpfilterError(errno.EINVAL, f"{where}: recent: invalid options "
                                              f"(flags {p.check_set:#x}, seconds {p.seconds}, "
                                              f"hitcount {p.hit_count})")
        # the ip_tables default of revision 0, which has no mask: every bit
        mask = p.mask if self.revision == 1 else b"\xff" * 16
        return dict(seconds=p.seconds, hit_count=p.hit_count, check_set=p.check_set,
                    invert=p.invert, list_name=c_string(p.name), side=p.side, mask=mask)

    def describe(self, m) -> str:
        # libxt_recent's recent_print()
        out = ["!"] if m.invert else []
        out.append("recent:")
        out += [word for flag, word in ((XT_RECENT_SET, "SET"), (XT_RECENT_CHECK, "CHECK"),
                                        (XT_RECENT_UPDATE, "UPDATE"), (XT_RECENT_REMOVE, "REMOVE"))
                if m.check_set & flag]
        if m.seconds:
            out.append(f"seconds: {m.seconds}")
        if m.check_set & XT_RECENT_REAP:
            out.append("reap")
        if m.hit_count:
            out.append(f"hit_count: {m.hit_count}")
        if m.check_set & XT_RECENT_TTL:
            out.append("TTL-Match")
        out.append(f"name: {m.list_name}")
        out.append("side: dest" if m.side == XT_RECENT_DEST else "side: source")
        if self.revision == 1:
            mask = m.mask[:4] if self.family is Family.IPV4 else m.mask
            out.append(f"mask: {ipaddress.ip_address(mask)}")
        return " ".join(out)


@register_match
class Recent0(_Recent):
    revision = 0
    struct = xt_recent_mtinfo


@register_match
class Recent1(_Recent):
    revision = 1
    struct = xt_recent_mtinfo_v1


# -- without bpfilter.ko ----------------------------------------------------------

# RECENT_LISTS: key (netns inum, 0, list id), value (lock, entries, LRU clock, mask)
LIST_KEY = struct.Struct("<IIQ")
LIST_VALUE = struct.Struct("<IIQ16s")
L_ENTRIES, L_CLOCK, L_MASK = 4, 8, 16
# RECENT_ENTRIES: key (netns inum, family, list id, the masked address), value (lock,
# index, nstamps, ttl, LRU stamp, NSTAMPS jiffies)
ENTRY_KEY = struct.Struct("<IIQ16s")
ENTRY_VALUE = struct.Struct(f"<IHBBQ{NSTAMPS}Q")
E_INDEX, E_NSTAMPS, E_TTL, E_LRU, E_STAMPS = 4, 6, 7, 8, 16

# the facts' scratch (the stack is short: user chains' frames sit on it too): the
# entry's key, whose first 16 bytes with a 0 family are the list's; now; the walks'
# findings, the list's least LRU stamp (all ones once the second walk removed it)
# and that entry's newest timestamp. The walks' context is the scratch itself.
_SCRATCH = facts.reserve("recent", 64)
_KEY, _NOW = _SCRATCH, _SCRATCH + 32
C_LRU, C_LAST = 40, 48
_TTL = _SCRATCH + 56      # u8: the TTL recent_mt() counts


def list_id(name: str) -> int:
    """The list's key part: its name's hash (a name is up to 200 bytes)."""
    return int.from_bytes(hashlib.blake2b(name.encode("latin-1"), digest_size=8).digest(),
                          "little")


def served_lists(table) -> list[tuple[str, bytes]]:
    """(name, mask) of every recent match of `table` run without the module, in rule
    order: what recent_mt_check() makes or references, in that order."""
    return [(m.list_name, m.mask) for chain in table.chains.values()
            for rule in chain.rules for m in rule.matches if isinstance(m, ServedRecentMatch)]


def _emit_served(family: int, m: ServedRecentMatch, asm, out) -> None:
    """recent_mt() (see the module's docstring), if every earlier test of the rule held.
    R8 = the entry, R9 = the list; R7, the outcome: bit 0, the kernel's `ret`; bit 1,
    a hotdrop (no list, or no room for an entry)."""
    label = asm.label
    done, outcome, missing, update, finish = (label("recent_done"), label("recent_outcome"),
                                              label("recent_missing"), label("recent_update"),
                                              label("recent_finish"))
    ret0 = 1 if m.invert else 0
    out.hotdrops = True
    emit_skip_if_decided(asm, done)
    # the list: RECENT_LISTS[(inum, 0, id)], the entry's key's first 16 bytes
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.NETNS), BPF_STX_MEM(BPF_W, R6, R1, _KEY),
             BPF_ST_MEM(BPF_W, R6, _KEY + 4, 0),
             *BPF_LD_IMM64(R1, list_id(m.list_name)), BPF_STX_MEM(BPF_DW, R6, R1, _KEY + 8),
             *BPF_LD_MAP_FD(R1, RECENT_LISTS), *_key_in_r2(),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_MOV64_IMM(R7, 2), BPF_JMP_IMM(I.BPF_JEQ, R0, 0, outcome),
             BPF_MOV64_REG(R9, R0))
    # then the address under the list's mask, and the family
    size = 4 if family == Family.IPV4 else 16
    address = facts.DADDR if m.side == XT_RECENT_DEST else facts.SADDR
    for off in range(0, 16, 4):
        if off < size:
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, address + off),
                     BPF_LDX_MEM(BPF_W, R2, R9, L_MASK + off),
                     BPF_ALU64_REG(I.BPF_AND, R1, R2),
                     BPF_STX_MEM(BPF_W, R6, R1, _KEY + 16 + off))
        else:
            asm.emit(BPF_ST_MEM(BPF_W, R6, _KEY + 16 + off, 0))
    asm.emit(BPF_ST_MEM(BPF_W, R6, _KEY + 4, family),
             BPF_EMIT_CALL(I.BPF_FUNC_jiffies64), BPF_STX_MEM(BPF_DW, R6, R0, _NOW),
             *BPF_LD_MAP_FD(R1, RECENT_ENTRIES), *_key_in_r2(),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, missing),
             BPF_MOV64_REG(R8, R0))
    _emit_ttl(asm)
    if m.check_set & XT_RECENT_TTL:
        # recent_entry_lookup(): ttl == e->ttl || ttl == 0 || e->ttl == 0
        met = label("recent_ttl_met")
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _TTL), BPF_JMP_IMM(I.BPF_JEQ, R1, 0, met),
                 BPF_LDX_MEM(BPF_B, R2, R8, E_TTL), BPF_JMP_IMM(I.BPF_JEQ, R2, 0, met),
                 BPF_JMP_REG(I.BPF_JNE, R1, R2, missing))
        asm.place(met)
    if m.check_set & XT_RECENT_SET:
        asm.emit(BPF_MOV64_IMM(R7, ret0 ^ 1), BPF_JMP_A(update))
    elif m.check_set & XT_RECENT_REMOVE:
        gone = label("recent_not_removed")
        asm.emit(*BPF_LD_MAP_FD(R1, RECENT_ENTRIES), *_key_in_r2(),
                 BPF_EMIT_CALL(BPF_FUNC_map_delete_elem),
                 BPF_JMP_IMM(I.BPF_JNE, R0, 0, gone),
                 BPF_MOV64_IMM(R1, -1), BPF_ATOMIC_OP(BPF_W, I.BPF_ADD, R9, R1, L_ENTRIES))
        asm.place(gone)
        asm.emit(BPF_MOV64_IMM(R7, ret0 ^ 1), BPF_JMP_A(outcome))
    else:
        _emit_hits(asm, m, ret0)
        if m.check_set & XT_RECENT_REAP:
            _emit_reap(asm, m)
        if m.check_set & XT_RECENT_UPDATE:
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, R7, 0, update))
        asm.emit(BPF_JMP_A(outcome))
    # no entry: only --set makes one (at the list's tail, evicting its head when full)
    asm.place(missing)
    if not m.check_set & XT_RECENT_SET:
        asm.emit(BPF_MOV64_IMM(R7, ret0), BPF_JMP_A(outcome))
    else:
        _emit_ttl(asm)
        _emit_new_entry(asm, outcome)
        asm.emit(BPF_MOV64_IMM(R7, ret0 ^ 1))
    # recent_entry_update(): the next stamp, the list's tail
    asm.place(update)
    asm.emit(BPF_MOV64_IMM(R1, 1), BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD | BPF_FETCH, R9, R1, L_CLOCK),
             BPF_ALU64_IMM(I.BPF_ADD, R1, 1), BPF_STX_MEM(BPF_DW, R6, R1, _SCRATCH + C_LRU),
             BPF_MOV64_REG(R1, R8), BPF_EMIT_CALL(I.BPF_FUNC_spin_lock),
             BPF_LDX_MEM(BPF_H, R1, R8, E_INDEX), BPF_ALU64_IMM(I.BPF_AND, R1, NSTAMPS - 1),
             BPF_MOV64_REG(R2, R1), BPF_ALU64_IMM(I.BPF_LSH, R2, 3),
             BPF_ALU64_REG(I.BPF_ADD, R2, R8),
             BPF_LDX_MEM(BPF_DW, R3, R6, _NOW), BPF_STX_MEM(BPF_DW, R2, R3, E_STAMPS),
             BPF_ALU64_IMM(I.BPF_ADD, R1, 1), BPF_STX_MEM(BPF_H, R8, R1, E_INDEX),
             BPF_LDX_MEM(BPF_B, R2, R8, E_NSTAMPS),
             BPF_JMP_REG(I.BPF_JLE, R1, R2, finish),
             BPF_STX_MEM(BPF_B, R8, R1, E_NSTAMPS))
    asm.place(finish)
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _TTL), BPF_STX_MEM(BPF_B, R8, R1, E_TTL),
             BPF_LDX_MEM(BPF_DW, R1, R6, _SCRATCH + C_LRU), BPF_STX_MEM(BPF_DW, R8, R1, E_LRU),
             BPF_MOV64_REG(R1, R8), BPF_EMIT_CALL(I.BPF_FUNC_spin_unlock))
    asm.place(outcome)
    emit_answer_and_hotdrop(asm, R7)
    asm.place(done)


def _emit_ttl(asm) -> None:
    """_TTL = the packet's TTL (hop limit), one more (a u8's wrap) where it leaves
    (an output device) and comes from no socket of the hook's namespace: the TTL
    before forwarding, as recent_mt() counts it. (C_LAST, which only the walks after
    it fill, holds the socket's namespace on the way.)"""
    o = sock_offsets()
    keep, more = asm.label("recent_ttl_kept"), asm.label("recent_ttl_more")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.TTL), BPF_STX_MEM(BPF_B, R6, R1, _TTL),
             BPF_LDX_MEM(BPF_B, R1, R6, facts.OUT_NAME), BPF_JMP_IMM(I.BPF_JEQ, R1, 0, keep),
             BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R1, R1, o.skb_sk),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, more),
             BPF_ALU64_IMM(I.BPF_ADD, R1, o.sk_net), BPF_MOV64_REG(R3, R1),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _SCRATCH + C_LAST),
             BPF_MOV64_IMM(R2, 8), BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
             BPF_LDX_MEM(BPF_DW, R1, R6, _SCRATCH + C_LAST), BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
             BPF_LDX_MEM(BPF_DW, R2, R2, o.state_net), BPF_JMP_REG(I.BPF_JEQ, R1, R2, keep))
    asm.place(more)
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _TTL), BPF_ALU64_IMM(I.BPF_ADD, R1, 1),
             BPF_STX_MEM(BPF_B, R6, R1, _TTL))
    asm.place(keep)


def _key_in_r2():
    return [BPF_MOV64_REG(R2, R6), BPF_ALU64_IMM(I.BPF_ADD, R2, _KEY)]


def _emit_hits(asm, m: ServedRecentMatch, ret0: int) -> None:
    """--rcheck / --update: R7 = ret, flipped once --hitcount stamps (all, with no
    --hitcount: one) are within --seconds (any, with none)."""
    end, hit = asm.label("recent_hits_end"), asm.label("recent_hit")
    asm.emit(BPF_MOV64_REG(R1, R8), BPF_EMIT_CALL(I.BPF_FUNC_spin_lock),
             BPF_MOV64_IMM(R7, ret0), BPF_MOV64_IMM(R4, 0),
             BPF_LDX_MEM(BPF_B, R2, R8, E_NSTAMPS))
    _emit_time(asm, m, R3)
    for i in range(NSTAMPS):
        skip = asm.label("recent_stamp_skip")
        asm.emit(BPF_JMP_IMM(I.BPF_JLE, R2, i, end))
        if m.seconds:
            # time_after(time, stamp): (long)(stamp - time) < 0
            asm.emit(BPF_LDX_MEM(BPF_DW, R1, R8, E_STAMPS + 8 * i),
                     BPF_ALU64_REG(I.BPF_SUB, R1, R3),
                     BPF_JMP_IMM(I.BPF_JSLT, R1, 0, skip))
        if not m.hit_count:
            asm.emit(BPF_JMP_A(hit))
        else:
            asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R4, 1),
                     BPF_JMP_IMM(I.BPF_JGE, R4, m.hit_count, hit))
        asm.place(skip)
    asm.emit(BPF_JMP_A(end))
    asm.place(hit)
    asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R7, 1))
    asm.place(end)
    asm.emit(BPF_MOV64_REG(R1, R8), BPF_EMIT_CALL(I.BPF_FUNC_spin_unlock))


def _emit_time(asm, m: ServedRecentMatch, reg: int) -> None:
    """reg = jiffies - --seconds * HZ, the bound recent_mt() compares stamps with."""
    asm.emit(BPF_LDX_MEM(BPF_DW, reg, R6, _NOW))
    if m.seconds:
        asm.emit(*BPF_LD_IMM64(R0, m.seconds * kernel_hz()), BPF_ALU64_REG(I.BPF_SUB, reg, R0))


def _emit_walk(asm, name: str, step) -> None:
    """bpf_for_each_map_elem() over RECENT_ENTRIES, the scratch as the context."""
    callback = asm.subprogram(name, lambda: step(asm))
    asm.emit(*BPF_LD_MAP_FD(R1, RECENT_ENTRIES), *BPF_LD_FUNC(R2, callback),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, _SCRATCH), BPF_MOV64_IMM(R4, 0),
             BPF_EMIT_CALL(BPF_FUNC_for_each_map_elem))


def _emit_same_list(asm, other) -> None:
    """In a walk's step (R2 the key, R4 the context): to `other` unless the entry is
    of the context's list."""
    asm.emit(BPF_LDX_MEM(BPF_W, R0, R2, 0), BPF_LDX_MEM(BPF_W, R5, R4, 0),
             BPF_JMP_REG(I.BPF_JNE, R0, R5, other),
             BPF_LDX_MEM(BPF_DW, R0, R2, 8), BPF_LDX_MEM(BPF_DW, R5, R4, 8),
             BPF_JMP_REG(I.BPF_JNE, R0, R5, other))


def _emit_oldest(asm) -> None:
    """The list's least recently set or updated entry (the kernel's LRU head): its LRU
    stamp at C_LRU (all ones: the list has none) and its newest timestamp at C_LAST."""
    asm.emit(BPF_MOV64_IMM(R1, -1), BPF_STX_MEM(BPF_DW, R6, R1, _SCRATCH + C_LRU))
    _emit_walk(asm, "recent_oldest", _emit_oldest_step)


def _emit_oldest_step(asm) -> None:
    next_ = asm.label("recent_oldest_next")
    _emit_same_list(asm, next_)
    asm.emit(BPF_LDX_MEM(BPF_DW, R0, R3, E_LRU), BPF_LDX_MEM(BPF_DW, R5, R4, C_LRU),
             BPF_JMP_REG(I.BPF_JGE, R0, R5, next_),
             BPF_STX_MEM(BPF_DW, R4, R0, C_LRU),
             # its newest stamp: stamps[(index - 1) % NSTAMPS]
             BPF_LDX_MEM(BPF_H, R0, R3, E_INDEX), BPF_ALU64_IMM(I.BPF_ADD, R0, -1),
             BPF_ALU64_IMM(I.BPF_AND, R0, NSTAMPS - 1), BPF_ALU64_IMM(I.BPF_LSH, R0, 3),
             BPF_ALU64_REG(I.BPF_ADD, R3, R0),
             BPF_LDX_MEM(BPF_DW, R0, R3, E_STAMPS), BPF_STX_MEM(BPF_DW, R4, R0, C_LAST))
    asm.place(next_)
    asm.emit(BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())


def _emit_remove_oldest(asm) -> None:
    """recent_entry_remove() of the entry _emit_oldest() found (its LRU stamp is its
    own): a second walk deletes it; the list (R9) counts one fewer."""
    kept = asm.label("recent_oldest_kept")
    _emit_walk(asm, "recent_remove_oldest", _emit_remove_step)
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, _SCRATCH + C_LRU), BPF_JMP_IMM(I.BPF_JNE, R1, -1, kept),
             BPF_MOV64_IMM(R1, -1), BPF_ATOMIC_OP(BPF_W, I.BPF_ADD, R9, R1, L_ENTRIES))
    asm.place(kept)


def _emit_remove_step(asm) -> None:
    next_ = asm.label("recent_remove_next")
    _emit_same_list(asm, next_)
    asm.emit(BPF_LDX_MEM(BPF_DW, R0, R3, E_LRU), BPF_LDX_MEM(BPF_DW, R5, R4, C_LRU),
             BPF_JMP_REG(I.BPF_JNE, R0, R5, next_),
             BPF_MOV64_REG(R7, R4),
             BPF_EMIT_CALL(BPF_FUNC_map_delete_elem),      # (R1, the map; R2, the key)
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, next_),
             BPF_ST_MEM(BPF_DW, R7, C_LRU, -1),
             BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())        # done: one entry has it
    asm.place(next_)
    asm.emit(BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())


def _emit_reap(asm, m: ServedRecentMatch) -> None:
    """recent_entry_reap(): the list's head goes if its newest stamp is before `time`,
    unless it is this entry (R8) about to be updated (--update, ret in R7)."""
    keep = asm.label("recent_reap_keep")
    _emit_oldest(asm)      # (R7 survives the calls: callee-saved)
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, _SCRATCH + C_LRU),
             BPF_JMP_IMM(I.BPF_JEQ, R1, -1, keep))
    if m.check_set & XT_RECENT_UPDATE:
        # the head is this entry when its LRU stamp is this entry's
        other = asm.label("recent_reap_other")
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R7, 0, other),
                 BPF_LDX_MEM(BPF_DW, R2, R8, E_LRU),
                 BPF_JMP_REG(I.BPF_JEQ, R1, R2, keep))
        asm.place(other)
    _emit_time(asm, m, R2)
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, _SCRATCH + C_LAST),
             BPF_ALU64_REG(I.BPF_SUB, R1, R2),
             BPF_JMP_IMM(I.BPF_JSGE, R1, 0, keep))
    _emit_remove_oldest(asm)
    asm.place(keep)


def _emit_new_entry(asm, outcome) -> None:
    """recent_entry_init(): room made (the list's head evicted when it holds
    IP_LIST_TOT), then the entry from the blank one (its stamps set by the update
    that follows). R8 = it; to `outcome` with a hotdrop if it cannot be made."""
    room, made, counted = (asm.label("recent_room"), asm.label("recent_made"),
                           asm.label("recent_counted"))
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R9, L_ENTRIES),
             BPF_JMP_IMM(I.BPF_JLT, R1, IP_LIST_TOT, room))
    _emit_oldest(asm)
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, _SCRATCH + C_LRU), BPF_JMP_IMM(I.BPF_JEQ, R1, -1, room))
    _emit_remove_oldest(asm)
    asm.place(room)
    asm.emit(*BPF_LD_MAP_FD(R1, RECENT_ENTRIES), *_key_in_r2(),
             BPF_LD_MAP_VALUE(R3, RECENT_BLANK, 0),
             BPF_MOV64_IMM(R4, BPF_NOEXIST), BPF_EMIT_CALL(BPF_FUNC_map_update_elem),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, counted),      # another CPU made it: not counted
             BPF_MOV64_IMM(R1, 1), BPF_ATOMIC_OP(BPF_W, I.BPF_ADD, R9, R1, L_ENTRIES))
    asm.place(counted)
    asm.emit(*BPF_LD_MAP_FD(R1, RECENT_ENTRIES), *_key_in_r2(),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JNE, R0, 0, made),
             BPF_MOV64_IMM(R7, 2), BPF_JMP_A(outcome))      # the map is full: hotdrop
    asm.place(made)
    asm.emit(BPF_MOV64_REG(R8, R0))
