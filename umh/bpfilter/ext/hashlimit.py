"""-m hashlimit (struct xt_hashlimit_mtinfo1/2/3: revisions 1 to 3), as
net/netfilter/xt_hashlimit.c has it.

With bpfilter.ko: the kernel's own (ext/xtmatch.py), its buckets listed under
/proc/net/ipt_hashlimit/NAME (ip6t_hashlimit).

Without it (`bpfilter serve`): hashlimit_mt_common() in BPF, on hash tables the service
keeps (hashlimits.py) as the kernel keeps its htables: one per name and family in a
namespace, made by the first rule to name it (hashlimit_mt_check_common(): its
configuration is the table's for good, whatever later rules of that name say),
shared by every table of the namespace, going with the last rule that names it.
A rule's code is compiled against its htable's configuration (HtableConfig, bound by
the service before the table is compiled): what the entry's key holds (mode, masks),
how a new entry starts and how its credit grows (rateinfo_init(), rateinfo_recalc():
the htable's mode, the rule's revision), while what the packet costs and the answer
follow the rule's own mode, as in the kernel. An entry's value is laid out as the
kernel's dsthash_ent's rateinfo, union and all, so that rules of one name that
disagree on --hashlimit-mode's bytes see what the kernel's see. Entries expire as
the kernel's: the service collects those past --hashlimit-htable-expire every
--hashlimit-htable-gcinterval (hashlimits.py), and a full htable
(--hashlimit-htable-max) drops the packet of a new address (hotdrop). Where it
differs: there is no /proc/net/ipt_hashlimit/NAME to read.
"""
from __future__ import annotations

import errno
import hashlib
import os
import struct
from dataclasses import dataclass, replace
from typing import Optional

from construct import Bytes, Int8un, Int32un, Int64un, Padding, Struct

from ..abi.xtables import CHECKENTRY_WRITES
from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B,
                        BPF_DW, BPF_EMIT_CALL, BPF_H, BPF_JMP_A, BPF_JMP_IMM,
                        BPF_JMP_REG, BPF_LD_IMM64, BPF_LD_MAP_FD, BPF_LD_MAP_VALUE,
                        BPF_LDX_MEM, BPF_MOV32_REG, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, MapRef, R0, R1, R2, R3, R4, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Family, Match
from ..packet import facts
from ..packet.ipv6 import WALK, WALK_FOUND
from ..packet.primitives import emit_answer_and_hotdrop, emit_skip_if_decided
from . import BOTH_FAMILIES, register_match
from .limit import kernel_hz
from .xtmatch import ServedKernelMatch, c_string

BPF_FUNC_map_update_elem, BPF_NOEXIST = 2, 1

XT_HASHLIMIT_HASH_DIP, XT_HASHLIMIT_HASH_DPT = 1 << 0, 1 << 1
XT_HASHLIMIT_HASH_SIP, XT_HASHLIMIT_HASH_SPT = 1 << 2, 1 << 3
XT_HASHLIMIT_INVERT, XT_HASHLIMIT_BYTES, XT_HASHLIMIT_RATE_MATCH = 1 << 4, 1 << 5, 1 << 6
XT_HASHLIMIT_ALL = (1 << 7) - 1
XT_HASHLIMIT_SCALE, XT_HASHLIMIT_SCALE_v2 = 10000, 1000000
XT_HASHLIMIT_BYTE_SHIFT = 4
HASHLIMIT_MAX_SIZE = 1048576
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
IFNAMSIZ, NAME_MAX = 16, 255

_CFG1 = ("mode" / Int32un, "avg" / Int32un, "burst" / Int32un, "size" / Int32un,
         "max" / Int32un, "gc_interval" / Int32un, "expire" / Int32un, "srcmask" / Int8un,
         "dstmask" / Int8un)
_CFG2 = ("avg" / Int64un, "burst" / Int64un, "mode" / Int32un, "size" / Int32un,
         "max" / Int32un, "gc_interval" / Int32un, "expire" / Int32un)
xt_hashlimit_mtinfo1 = Struct("name" / Bytes(IFNAMSIZ), *_CFG1, Padding(2), "_hinfo" / Int64un)
xt_hashlimit_mtinfo2 = Struct("name" / Bytes(NAME_MAX), Padding(1), *_CFG2,
                              "srcmask" / Int8un, "dstmask" / Int8un, Padding(6),
                              "_hinfo" / Int64un)
xt_hashlimit_mtinfo3 = Struct("name" / Bytes(NAME_MAX), Padding(1), *_CFG2,
                              "interval" / Int32un, "srcmask" / Int8un, "dstmask" / Int8un,
                              Padding(6), "_hinfo" / Int64un)
_STRUCTS = {1: xt_hashlimit_mtinfo1, 2: xt_hashlimit_mtinfo2, 3: xt_hashlimit_mtinfo3}
# where hashlimit_mt_check_common() writes its truncations back (revision 3 checks the
# payload itself; 1 and 2 a copy): cfg.size and cfg.max
_V3_SIZE_AT = 256 + 20


@dataclass(frozen=True)
class HtableConfig:
    """struct hashlimit_cfg3 of an htable, as htable_create() keeps it (size and max
    with their defaults), and the family it is of."""
    mode: int
    avg: int
    burst: int
    size: int
    max: int
    gc_interval: int
    expire: int
    interval: int
    srcmask: int
    dstmask: int

    PACKED = struct.Struct("<IQQIIIIIBB")

    def pack(self) -> bytes:
        return self.PACKED.pack(self.mode, self.avg, self.burst, self.size, self.max,
                                self.gc_interval, self.expire, self.interval, self.srcmask,
                                self.dstmask)

    @classmethod
    def unpack(cls, data: bytes) -> "HtableConfig":
        return cls(*cls.PACKED.unpack_from(data))


@dataclass(frozen=True)
class ServedHashlimitMatch(Match):
    """hashlimit without bpfilter.ko: the rule's name and configuration (cfg3), and the
    configuration of the htable it uses (None until bound: its own)."""
    table_name: str
    cfg: HtableConfig
    revision: int
    htable: Optional[HtableConfig] = None
    name = "hashlimit"

    @property
    def effective(self) -> HtableConfig:
        return self.htable if self.htable is not None else htable_config(self.cfg)


def totalram_size() -> int:
    """htable_create()'s default number of buckets, from the machine's memory."""
    pages = os.sysconf("SC_PHYS_PAGES")
    page = os.sysconf("SC_PAGE_SIZE")
    size = pages * page // 16384 // 8
    if pages > 1024 * 1024 * 1024 // page:
        size = 8192
    return max(size, 16)


def htable_config(cfg: HtableConfig) -> HtableConfig:
    """htable_create(): the htable's size and max from the rule's."""
    size = cfg.size or totalram_size()
    limit = cfg.max
    if limit == 0:
        limit = 8 * size
    elif limit < size:
        limit = size
    return replace(cfg, size=size, max=limit)


def xt_check_proc_name(raw: bytes, where: str) -> str:
    if raw[:1] == b"\0":
        raise BpfilterError(errno.EINVAL, f"{where}: hashlimit: no --hashlimit-name")
    if b"\0" not in raw:
        raise BpfilterError(errno.ENAMETOOLONG, f"{where}: hashlimit: the name is not "
                                                f"NUL-terminated")
    name = c_string(raw)
    if name in (".", "..") or "/" in name:
        raise BpfilterError(errno.EINVAL, f"{where}: hashlimit: {name!r} cannot name a file "
                                          f"of /proc/net/ipt_hashlimit")
    return name


def _cpj(bits: int, hz: int) -> int:
    """POW2_BELOW{bits}(max / (HZ*60*60*24))."""
    return 1 << (((1 << bits) - 1) // (hz * 60 * 60 * 24)).bit_length() - 1


def user2credits(user: int, revision: int, hz: int) -> int:
    scale = XT_HASHLIMIT_SCALE if revision == 1 else XT_HASHLIMIT_SCALE_v2
    cpj = _cpj(32, hz) if revision == 1 else _cpj(64, hz)
    if scale >= hz * cpj:
        return user // (scale // (hz * cpj)) & U64
    return user * (hz * cpj // scale) & U64


def cpj_bytes(hz: int) -> int:
    return 1 << (U32 // hz).bit_length() - 1


def user2credits_byte(user: int, hz: int) -> int:
    return ((user & U32) * hz * cpj_bytes(hz) & U64) >> 32 & U32


def check(cfg: HtableConfig, revision: int, family: Family, where: str) -> HtableConfig:
    """hashlimit_mt_check_common() but for the htable it finds or makes: the errno of
    what it refuses; the configuration with its truncations."""
    def fail(err: int, why: str):
        raise BpfilterError(err, f"{where}: hashlimit: {why}")

    hz = kernel_hz()
    if cfg.gc_interval == 0 or cfg.expire == 0:
        fail(errno.EINVAL, "--hashlimit-htable-gcinterval and --hashlimit-htable-expire "
                           "must not be 0")
    cfg = replace(cfg, size=min(cfg.size, HASHLIMIT_MAX_SIZE), max=min(cfg.max, HASHLIMIT_MAX_SIZE))
    bits = 32 if family == Family.IPV4 else 128
    if cfg.srcmask > bits or cfg.dstmask > bits:
        fail(errno.EINVAL, f"a mask longer than {bits} bits")
    if cfg.mode & ~XT_HASHLIMIT_ALL:
        fail(errno.EINVAL, f"unknown mode mask {cfg.mode:X}")
    if cfg.mode & XT_HASHLIMIT_RATE_MATCH:
        if revision < 3:
            fail(errno.EINVAL, "--hashlimit-rate-match needs revision 3")
        if cfg.avg == 0 or cfg.avg > U32:
            fail(errno.ERANGE, "invalid rate")
        if cfg.interval == 0:
            fail(errno.EINVAL, "invalid interval")
    elif cfg.mode & XT_HASHLIMIT_BYTES:
        if user2credits_byte(cfg.avg, hz) == 0:
            fail(errno.EINVAL, f"overflow, rate too high: {cfg.avg}")
    elif cfg.burst == 0 or user2credits(cfg.avg * cfg.burst & U64, revision, hz) < \
            user2credits(cfg.avg, revision, hz):
        fail(errno.ERANGE, f"overflow, try lower: {cfg.avg}/{cfg.burst}")
    return cfg


def _truncate_v3(payload: bytes) -> bytes:
    """Revision 3's check truncates size and max in the payload, which GET_ENTRIES
    then shows."""
    size, limit = struct.unpack_from("<II", payload, _V3_SIZE_AT)
    return payload[:_V3_SIZE_AT] + struct.pack("<II", min(size, HASHLIMIT_MAX_SIZE),
                                               min(limit, HASHLIMIT_MAX_SIZE)) + \
        payload[_V3_SIZE_AT + 8:]


CHECKENTRY_WRITES[("match", "hashlimit", 3)] = _truncate_v3


class _Hashlimit(ServedKernelMatch):
    name = "hashlimit"
    families = BOTH_FAMILIES
    why = "whose buckets the kernel lists under /proc/net/ipt_hashlimit"
    environment = ()    # set below, with the maps
    served_model = ServedHashlimitMatch
    served_facts = frozenset({"skb", "hashlimit"})

    def served(self, payload: bytes, where: str) -> ServedHashlimitMatch:
        p = self.struct.parse(payload)
        name = xt_check_proc_name(p.name, where)
        cfg = HtableConfig(p.mode, p.avg, p.burst, p.size, p.max, p.gc_interval, p.expire,
                           p.get("interval", 0), p.srcmask, p.dstmask)
        return ServedHashlimitMatch(name, check(cfg, self.revision, self.family, where),
                                    self.revision)

    def describe(self, m) -> str:
        if isinstance(m, ServedHashlimitMatch):
            mode, avg, burst, name = m.cfg.mode, m.cfg.avg, m.cfg.burst, m.table_name
        else:
            f = dict(m.fields)
            mode, avg, burst, name = f["mode"], f["avg"], f["burst"], c_string(f["name"])
        return f"limit: {'above' if mode & XT_HASHLIMIT_INVERT else 'up to'} {avg} " \
               f"burst {burst} name {name}"

    def emit_served(self, match, asm, out) -> None:
        _emit_served(self.family, match, asm, out)


for _revision in (1, 2, 3):
    register_match(type(f"Hashlimit{_revision}", (_Hashlimit,),
                        dict(revision=_revision, struct=_STRUCTS[_revision])))


def table_id(name: str) -> int:
    """An htable's key part: its name's hash (a name is up to 255 bytes)."""
    return int.from_bytes(hashlib.blake2b(name.encode("latin-1"), digest_size=8).digest(),
                          "little")


def served_htables(table) -> list[tuple[str, HtableConfig]]:
    """(name, htable configuration as its rule would make it) of every hashlimit
    match of `table` run without the module, in rule order: the order the kernel's
    translate_table() checks them, the first to name an htable making it."""
    return [(m.table_name, htable_config(m.cfg)) for chain in table.chains.values()
            for rule in chain.rules for m in rule.matches
            if isinstance(m, ServedHashlimitMatch)]


def bind(table, existing: dict[str, HtableConfig]) -> None:
    """Binds every served hashlimit match of `table` to its htable's configuration:
    `existing`'s (name -> configuration: the htables of the table's namespace and
    family) or that of the first of its rules to name it."""
    found = dict(existing)
    for name, cfg in served_htables(table):
        found.setdefault(name, cfg)
    for chain in table.chains.values():
        for position, rule in enumerate(chain.rules, 1):
            for m in rule.matches:
                # hashlimit_mt_check_common(): a rate match and a token bucket of one
                # htable would read each other's state
                if isinstance(m, ServedHashlimitMatch) and \
                        (m.cfg.mode ^ found[m.table_name].mode) & XT_HASHLIMIT_RATE_MATCH:
                    raise BpfilterError(errno.EINVAL, f"chain {chain.name} rule {position}: "
                                                      f"hashlimit: htable {m.table_name!r} "
                                                      f"is {'not ' if m.cfg.mode & XT_HASHLIMIT_RATE_MATCH else ''}"
                                                      f"a rate match's")
            rule.matches = [replace(m, htable=found[m.table_name])
                            if isinstance(m, ServedHashlimitMatch) else m
                            for m in rule.matches]


# -- without bpfilter.ko ----------------------------------------------------------

_WHY = "hashlimit rules without bpfilter.ko need the service's htables (bpfilter serve has them)"
HASHLIMIT_TABLES = MapRef("hashlimit_tables", _WHY)
HASHLIMIT_BLANK = MapRef("hashlimit_blank", _WHY)     # one zeroed entry, a new one's start
_Hashlimit.environment = (HASHLIMIT_TABLES, HASHLIMIT_BLANK)

# HASHLIMIT_TABLES: key (netns inum, family, name id), value an htable: a hash map of
# key struct dsthash_dst (src, dst, ports), value (lock, expires, then struct
# dsthash_ent's rateinfo: prev and its union)
TABLE_KEY = struct.Struct("<IIQ")
ENTRY_KEY = struct.Struct("<16s16sHH4x")
ENTRY_VALUE = struct.Struct("<I4xQQ32s")
E_EXPIRES, E_PREV = 8, 16
# the union: {credit, credit_cap, cost} or {interval (u32), prev_window (u32),
# current_rate, rate, burst}
U_CREDIT, U_CAP, U_COST = 24, 32, 40
U_INTERVAL, U_PREV_WINDOW, U_CURRENT, U_RATE, U_BURST = 24, 28, 32, 40, 48
# the facts' scratch: the htable's key, then the entry's
_K_DST_HASH = TABLE_KEY.size
_K_SRC, _K_PORTS = _K_DST_HASH, _K_DST_HASH + 32
_KEY = facts.reserve("hashlimit", TABLE_KEY.size + ENTRY_KEY.size)

# proto_ports_offset(): where the ports are in the transport header
_PORTS_AT = {6: 0, 17: 0, 136: 0, 132: 0, 33: 0, 50: 0, 51: 4}


def msecs_to_jiffies(ms: int, hz: int) -> int:
    return -(-ms * hz // 1000)


def _mask_words(bits: int, width: int) -> list[int]:
    """The prefix mask of `bits` over `width` bytes, as u32 words loaded from the wire."""
    mask = ((1 << bits) - 1) << (8 * width - bits) if bits else 0
    raw = mask.to_bytes(width, "big")
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, width, 4)]


def _emit_address(asm, src_off: int, key_off: int, bits: int, width: int) -> None:
    for i, word in enumerate(_mask_words(bits, width)):
        if word:
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, src_off + 4 * i))
            if word != U32:
                asm.emit(*BPF_LD_IMM64(R2, word), BPF_ALU64_REG(I.BPF_AND, R1, R2))
            asm.emit(BPF_STX_MEM(BPF_W, R6, R1, _KEY + key_off + 4 * i))


def _emit_key(family: Family, m: ServedHashlimitMatch, asm, hotdrop) -> None:
    """hashlimit_init_dst() into the scratch: to `hotdrop` where it fails."""
    h = m.effective
    for off in range(0, TABLE_KEY.size + ENTRY_KEY.size, 8):
        asm.emit(BPF_ST_MEM(BPF_DW, R6, _KEY + off, 0))
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.NETNS), BPF_STX_MEM(BPF_W, R6, R1, _KEY),
             BPF_ST_MEM(BPF_W, R6, _KEY + 4, int(family)),
             *BPF_LD_IMM64(R1, table_id(m.table_name)), BPF_STX_MEM(BPF_DW, R6, R1, _KEY + 8))
    width = 4 if family == Family.IPV4 else 16
    # struct dsthash_dst: IPv4's src then dst, IPv6's src[4] then dst[4]
    dst_at = _K_SRC + width
    if h.mode & XT_HASHLIMIT_HASH_DIP:
        _emit_address(asm, facts.DADDR, dst_at, h.dstmask, width)
    if h.mode & XT_HASHLIMIT_HASH_SIP:
        _emit_address(asm, facts.SADDR, _K_SRC, h.srcmask, width)
    if not h.mode & (XT_HASHLIMIT_HASH_DPT | XT_HASHLIMIT_HASH_SPT):
        return
    # later fragments have no ports to hash: -1; so has an IPv6 packet whose headers
    # ipv6_skip_exthdr() cannot walk (or that ends in NEXTHDR_NONE)
    asm.emit(BPF_LDX_MEM(BPF_H, R1, R6, facts.FRAGOFF), BPF_JMP_IMM(I.BPF_JNE, R1, 0, hotdrop))
    if family == Family.IPV6:
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, WALK), BPF_JMP_IMM(I.BPF_JNE, R1, WALK_FOUND, hotdrop),
                 BPF_LDX_MEM(BPF_B, R1, R6, facts.PROTO), BPF_JMP_IMM(I.BPF_JEQ, R1, 59, hotdrop))
    no_ports, read = asm.label("hashlimit_no_ports"), asm.label("hashlimit_read_ports")
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.PROTO), BPF_LDX_MEM(BPF_W, R2, R6, facts.THOFF))
    for proto, at in _PORTS_AT.items():
        skip = asm.label("hashlimit_proto")
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R1, proto, skip))
        if at:
            asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R2, at))
        asm.emit(BPF_JMP_A(read))
        asm.place(skip)
    asm.emit(BPF_JMP_A(no_ports))
    asm.place(read)
    facts.emit_slice(asm, offset_reg=R2, size=4)
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, 0, hotdrop))
    if h.mode & XT_HASHLIMIT_HASH_SPT:
        asm.emit(BPF_LDX_MEM(BPF_H, R1, R0, 0), BPF_STX_MEM(BPF_H, R6, R1, _KEY + _K_PORTS))
    if h.mode & XT_HASHLIMIT_HASH_DPT:
        asm.emit(BPF_LDX_MEM(BPF_H, R1, R0, 2), BPF_STX_MEM(BPF_H, R6, R1, _KEY + _K_PORTS + 2))
    asm.place(no_ports)


def _key_in_r2(at: int):
    return [BPF_MOV64_REG(R2, R6), BPF_ALU64_IMM(I.BPF_ADD, R2, _KEY + at)]


def _emit_served(family: Family, m: ServedHashlimitMatch, asm, out) -> None:
    """hashlimit_mt_common() (see the module's docstring), if every earlier test of
    the rule held. R7 = now (jiffies), R8 = the entry, R9 = the htable, then the
    outcome: bit 0 the match's answer, bit 1 a hotdrop."""
    label = asm.label
    done, outcome, hotdrop, have, locked = (label("hashlimit_done"), label("hashlimit_outcome"),
                                           label("hashlimit_hotdrop"), label("hashlimit_have"),
                                           label("hashlimit_locked"))
    h = m.effective
    out.hotdrops = True
    emit_skip_if_decided(asm, done)
    _emit_key(family, m, asm, hotdrop)
    # the htable (an inner map: its max_entries are the htable's max), its entry
    asm.emit(BPF_EMIT_CALL(I.BPF_FUNC_jiffies64), BPF_MOV64_REG(R7, R0),
             *BPF_LD_MAP_FD(R1, HASHLIMIT_TABLES), *_key_in_r2(0),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, hotdrop), BPF_MOV64_REG(R9, R0),
             BPF_MOV64_REG(R1, R9), *_key_in_r2(_K_DST_HASH),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_MOV64_REG(R8, R0), BPF_JMP_IMM(I.BPF_JNE, R0, 0, have),
             # dsthash_alloc_init(): made blank (its first locker starts it: prev 0, a
             # jiffies value no entry holds); no room (the htable's max): a hotdrop
             BPF_MOV64_REG(R1, R9), *_key_in_r2(_K_DST_HASH),
             BPF_LD_MAP_VALUE(R3, HASHLIMIT_BLANK, 0),
             BPF_MOV64_IMM(R4, BPF_NOEXIST), BPF_EMIT_CALL(BPF_FUNC_map_update_elem),
             BPF_MOV64_REG(R1, R9), *_key_in_r2(_K_DST_HASH),
             BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, hotdrop), BPF_MOV64_REG(R8, R0))
    asm.place(have)
    hz = kernel_hz()
    started = label("hashlimit_started")
    asm.emit(BPF_MOV64_REG(R1, R8), BPF_EMIT_CALL(I.BPF_FUNC_spin_lock),
             BPF_MOV64_REG(R1, R7),
             *BPF_LD_IMM64(R2, msecs_to_jiffies(h.expire, hz)), BPF_ALU64_REG(I.BPF_ADD, R1, R2),
             BPF_STX_MEM(BPF_DW, R8, R1, E_EXPIRES),
             BPF_LDX_MEM(BPF_DW, R1, R8, E_PREV), BPF_JMP_IMM(I.BPF_JNE, R1, 0, started))
    _emit_init(asm, m, h, hz)
    asm.emit(BPF_JMP_A(locked))
    asm.place(started)
    _emit_recalc(asm, m, h, hz)
    asm.place(locked)
    _emit_cost(asm, m, hz)
    asm.emit(BPF_MOV64_REG(R1, R8), BPF_EMIT_CALL(I.BPF_FUNC_spin_unlock), BPF_JMP_A(outcome))
    asm.place(hotdrop)
    asm.emit(BPF_MOV64_IMM(R9, 2))
    asm.place(outcome)
    emit_answer_and_hotdrop(asm, R9)
    asm.place(done)


def _store(asm, off: int, value: int, size=BPF_DW) -> None:
    asm.emit(*BPF_LD_IMM64(R1, value), BPF_STX_MEM(size, R8, R1, off))


def _emit_init(asm, m: ServedHashlimitMatch, h: HtableConfig, hz: int) -> None:
    """rateinfo_init() of the entry R8 (locked), with the htable's configuration and
    the rule's revision."""
    asm.emit(BPF_STX_MEM(BPF_DW, R8, R7, E_PREV))
    if m.revision >= 3 and h.mode & XT_HASHLIMIT_RATE_MATCH:
        if h.mode & XT_HASHLIMIT_BYTES:
            user = h.avg & U32
            rate = ((U32 // user if user else U32) - 1 << XT_HASHLIMIT_BYTE_SHIFT) & U64
            burst = h.burst * rate & U64 if h.burst else rate
        else:
            rate = XT_HASHLIMIT_SCALE_v2 // h.avg if h.avg else 0
            burst = h.burst + rate & U64
        _store(asm, U_INTERVAL, h.interval, BPF_W)
        _store(asm, U_PREV_WINDOW, 0, BPF_W)
        _store(asm, U_CURRENT, 0)
        _store(asm, U_RATE, rate)
        _store(asm, U_BURST, burst)
    elif h.mode & XT_HASHLIMIT_BYTES:
        _store(asm, U_CREDIT, cpj_bytes(hz) * hz)
        _store(asm, U_COST, user2credits_byte(h.avg, hz))
        _store(asm, U_CAP, h.burst)
    else:
        credit = user2credits(h.avg * h.burst & U64, m.revision, hz)
        _store(asm, U_CREDIT, credit)
        _store(asm, U_COST, user2credits(h.avg, m.revision, hz))
        _store(asm, U_CAP, credit)


def _emit_recalc(asm, m: ServedHashlimitMatch, h: HtableConfig, hz: int) -> None:
    """rateinfo_recalc() of the entry R8 (locked) at now (R7): the htable's mode, the
    rule's revision."""
    end = asm.label("hashlimit_recalc_end")
    asm.emit(BPF_MOV64_REG(R2, R7), BPF_LDX_MEM(BPF_DW, R1, R8, E_PREV),
             BPF_ALU64_REG(I.BPF_SUB, R2, R1), BPF_JMP_IMM(I.BPF_JEQ, R2, 0, end))
    # R2 = delta
    if m.revision >= 3 and h.mode & XT_HASHLIMIT_RATE_MATCH:
        window = asm.label("hashlimit_window")
        # (u64)(interval * HZ): a u32 product, as the kernel's
        asm.emit(BPF_LDX_MEM(BPF_W, R3, R8, U_INTERVAL), BPF_ALU32_IMM(I.BPF_MUL, R3, hz),
                 BPF_JMP_REG(I.BPF_JLT, R2, R3, end),
                 BPF_STX_MEM(BPF_DW, R8, R7, E_PREV),
                 # prev_window = current_rate * interval > delta * rate
                 BPF_LDX_MEM(BPF_DW, R1, R8, U_CURRENT), BPF_ALU64_REG(I.BPF_MUL, R3, R1),
                 BPF_LDX_MEM(BPF_DW, R1, R8, U_RATE), BPF_ALU64_REG(I.BPF_MUL, R2, R1),
                 BPF_MOV64_IMM(R1, 1), BPF_JMP_REG(I.BPF_JGT, R3, R2, window),
                 BPF_MOV64_IMM(R1, 0))
        asm.place(window)
        asm.emit(BPF_STX_MEM(BPF_W, R8, R1, U_PREV_WINDOW), BPF_ST_MEM(BPF_DW, R8, U_CURRENT, 0))
        asm.place(end)
        return
    capped = asm.label("hashlimit_capped")
    asm.emit(BPF_STX_MEM(BPF_DW, R8, R7, E_PREV), BPF_LDX_MEM(BPF_DW, R1, R8, U_CREDIT))
    if h.mode & XT_HASHLIMIT_BYTES:
        cap = cpj_bytes(hz) * hz
        overflow = asm.label("hashlimit_overflow")
        asm.emit(BPF_MOV64_REG(R0, R1), *BPF_LD_IMM64(R3, cpj_bytes(hz)),
                 BPF_ALU64_REG(I.BPF_MUL, R2, R3), BPF_ALU64_REG(I.BPF_ADD, R1, R2),
                 BPF_JMP_REG(I.BPF_JGE, R0, R1, overflow),
                 *BPF_LD_IMM64(R3, cap), BPF_JMP_A(capped))
        asm.place(overflow)
        asm.emit(*BPF_LD_IMM64(R1, cap), BPF_STX_MEM(BPF_DW, R8, R1, U_CREDIT), BPF_JMP_A(end))
    else:
        cpj = _cpj(32, hz) if m.revision == 1 else _cpj(64, hz)
        asm.emit(*BPF_LD_IMM64(R3, cpj), BPF_ALU64_REG(I.BPF_MUL, R2, R3),
                 BPF_ALU64_REG(I.BPF_ADD, R1, R2), BPF_LDX_MEM(BPF_DW, R3, R8, U_CAP))
    asm.place(capped)
    # R1 = credit, R3 = cap
    store = asm.label("hashlimit_store")
    asm.emit(BPF_JMP_REG(I.BPF_JLE, R1, R3, store), BPF_MOV64_REG(R1, R3))
    asm.place(store)
    asm.emit(BPF_STX_MEM(BPF_DW, R8, R1, U_CREDIT))
    asm.place(end)


def _emit_cost(asm, m: ServedHashlimitMatch, hz: int) -> None:
    """What the packet costs, by the rule's own mode, and the answer in R9 (locked)."""
    invert = 1 if m.cfg.mode & XT_HASHLIMIT_INVERT else 0
    over, end = asm.label("hashlimit_over"), asm.label("hashlimit_cost_end")
    if m.cfg.mode & XT_HASHLIMIT_RATE_MATCH:
        if m.cfg.mode & XT_HASHLIMIT_BYTES:
            asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, facts.LEN))
        else:
            asm.emit(BPF_MOV64_IMM(R2, 1))
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R8, U_CURRENT), BPF_ALU64_REG(I.BPF_ADD, R1, R2),
                 BPF_STX_MEM(BPF_DW, R8, R1, U_CURRENT),
                 BPF_LDX_MEM(BPF_W, R2, R8, U_PREV_WINDOW), BPF_JMP_IMM(I.BPF_JNE, R2, 0, over),
                 BPF_LDX_MEM(BPF_DW, R2, R8, U_BURST), BPF_JMP_REG(I.BPF_JGT, R1, R2, over))
    else:
        if m.cfg.mode & XT_HASHLIMIT_BYTES:
            # hashlimit_byte_cost()
            cap = cpj_bytes(hz) * hz
            clamped, charged = asm.label("hashlimit_clamped"), asm.label("hashlimit_charged")
            asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, facts.LEN),
                     BPF_ALU32_IMM(I.BPF_RSH, R2, XT_HASHLIMIT_BYTE_SHIFT),
                     BPF_ALU32_IMM(I.BPF_ADD, R2, 1),
                     BPF_LDX_MEM(BPF_DW, R1, R8, U_COST), BPF_ALU64_REG(I.BPF_MUL, R2, R1),
                     *BPF_LD_IMM64(R3, cap), BPF_JMP_REG(I.BPF_JLE, R2, R3, clamped),
                     BPF_MOV64_REG(R2, R3))
            asm.place(clamped)
            asm.emit(BPF_LDX_MEM(BPF_DW, R1, R8, U_CREDIT), BPF_JMP_REG(I.BPF_JGE, R1, R2, charged),
                     BPF_LDX_MEM(BPF_DW, R1, R8, U_CAP), BPF_JMP_IMM(I.BPF_JEQ, R1, 0, charged),
                     BPF_ALU64_IMM(I.BPF_ADD, R1, -1), BPF_STX_MEM(BPF_DW, R8, R1, U_CAP),
                     BPF_STX_MEM(BPF_DW, R8, R3, U_CREDIT))
            asm.place(charged)
            # (u32)tmp
            asm.emit(BPF_MOV32_REG(R2, R2))
        else:
            asm.emit(BPF_LDX_MEM(BPF_DW, R2, R8, U_COST))
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R8, U_CREDIT), BPF_JMP_REG(I.BPF_JLT, R1, R2, over),
                 BPF_ALU64_REG(I.BPF_SUB, R1, R2), BPF_STX_MEM(BPF_DW, R8, R1, U_CREDIT))
    asm.emit(BPF_MOV64_IMM(R9, invert ^ 1), BPF_JMP_A(end))
    asm.place(over)
    asm.emit(BPF_MOV64_IMM(R9, invert))
    asm.place(end)

