"""-m limit: --limit RATE --limit-burst N (struct xt_rateinfo, revision 0).

net/netfilter/xt_limit.c's token bucket, done as the kernel does it:

* limit_mt_check() turns the rate into credits with user2credits(), whose result
  depends on the kernel's HZ (read from its build configuration: a guess would be a
  different rate), and starts every bucket full (credit = user2credits(avg * burst),
  prev = jiffies). When the payload's cost is not zero the kernel keeps the payload's
  credit_cap and cost as given; the starting credit is computed all the same.
* limit_mt() adds (now - prev) * CREDITS_PER_JIFFY credits, in u32 arithmetic that
  wraps as the kernel's does, caps them at credit_cap, and takes `cost` if there are
  that many. Its fast path (too few credits and no jiffy elapsed) writes nothing,
  which matters when credit exceeds credit_cap, so it is kept.

Each limit match has its own bucket (the kernel's xt_limit_priv) in a hash map the
loader creates with every table load: replacing a table re-runs checkentry in the
kernel, which starts every bucket afresh, and so does a new map. The kernel updates
a bucket with a cmpxchg loop; here a bpf_spin_lock in the bucket serialises the
update, which gives one of the outcomes the kernel's loop can give.

The rule's earlier tests gate the bucket: ipt_do_table() stops at the first match
that fails (or hotdrops), so a packet an earlier test rejects takes no token.
"""
from __future__ import annotations

import errno
import functools
import gzip
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Optional

from construct import Int32ul, Int64ul, Padding, Struct

from ..bpf import insn as I
from ..bpf import syscall as bpf
from ..bpf.asm import Assembler
from ..bpf.btfgen import BtfBuilder
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_DW,
                        BPF_EMIT_CALL, BPF_EXIT_INSN, BPF_JMP32_IMM, BPF_JMP_IMM,
                        BPF_JMP_REG, BPF_LD_MAP_VALUE, BPF_LDX_MEM,
                        BPF_MOV32_IMM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_STX_MEM, BPF_W, MapRef,
                        R0, R1, R2, R3, R8, R9)
from ..packet import facts
from ..packet.primitives import HOTDROP, MISMATCH, emit_skip_if_decided, emit_state_lookup
from ..errors import BpfilterError
from ..model import Match, Table
from . import BOTH_FAMILIES, MatchExtension, keyed_matches, match_key, register_match

XT_LIMIT_SCALE = 10000
U32 = 0xFFFFFFFF

xt_rateinfo = Struct(
    "avg" / Int32ul,
    "burst" / Int32ul,
    # kernel-private: prev and credit moved to xt_limit_priv; master is its pointer
    "prev" / Int64ul,
    "credit" / Int32ul,
    "credit_cap" / Int32ul,
    "cost" / Int32ul,
    Padding(4),
    "master" / Int64ul,
)

LIMITS = MapRef("limits")

# The bucket (value of the LIMITS map) and its BTF, which a value holding a
# bpf_spin_lock needs: struct { struct bpf_spin_lock lock; u32 credit; u64 prev; }
B_CREDIT, B_PREV = 4, 8
BUCKET = struct.Struct("<IIQ")
KEY = struct.Struct("<Q")          # entry << 32 | the match's position in the rule

# The bucket's key, written where helpers can read it from any frame.
_KEY = facts.reserve("limit", KEY.size)


# the values Kconfig lets CONFIG_HZ take (kernel/Kconfig.hz)
HZ_CHOICES = (100, 250, 300, 1000)


@functools.lru_cache(maxsize=1)
def kernel_hz() -> int:
    """CONFIG_HZ of the running kernel, on which every credit count depends: from
    /proc/config.gz, or from /boot/config-RELEASE where distributions whose kernels
    lack the former (Debian's) install the running kernel's build configuration; else
    measured: jiffies counted over half a second, which tells the Kconfig choices
    apart."""
    found = None
    for path, opener in (("/proc/config.gz", gzip.open),
                         (f"/boot/config-{os.uname().release}", open)):
        try:
            with opener(path, "rt") as config:
                found = re.search(r"^CONFIG_HZ=(\d+)$", config.read(), re.M)
        except OSError:
            continue
        if found:
            return int(found.group(1))
    return measured_hz()


def measured_hz(seconds: float = 0.5) -> int:
    """The HZ_CHOICES value nearest jiffies' rate against CLOCK_MONOTONIC."""
    try:
        (t0, j0), (t1, j1) = jiffies(2, seconds)
    except OSError as err:
        raise BpfilterError(errno.EOPNOTSUPP, f"limit: the kernel's HZ is unknown (no "
                                              f"CONFIG_HZ in /proc/config.gz or "
                                              f"/boot/config-RELEASE, and jiffies cannot be "
                                              f"read: {err}), and xt_limit's credits depend "
                                              f"on it; the whole table is refused") from None
    rate = (j1 - j0) / (t1 - t0)
    return min(HZ_CHOICES, key=lambda hz: abs(hz - rate))


def credits_per_jiffy(hz: int) -> int:
    """CREDITS_PER_JIFFY: the power of two at or below 0xFFFFFFFF / (HZ*60*60*24)."""
    return 1 << ((U32 // (hz * 60 * 60 * 24)).bit_length() - 1)


def user2credits(user: int, hz: int) -> int:
    """xt_limit's user2credits(), in its u32 arithmetic."""
    cpj = credits_per_jiffy(hz)
    if user > U32 // (hz * cpj):
        return (user // XT_LIMIT_SCALE) * hz * cpj & U32
    return (user * hz * cpj & U32) // XT_LIMIT_SCALE


@dataclass(frozen=True)
class LimitMatch(Match):
    avg: int
    burst: int
    credit: int        # the full bucket every table load starts with
    credit_cap: int
    cost: int
    shift: int         # log2(CREDITS_PER_JIFFY)
    name = "limit"
    revision = 0


@register_match
class Limit(MatchExtension):
    name = "limit"
    families = BOTH_FAMILIES
    family_independent = True   # xt_limit registers for NFPROTO_UNSPEC
    struct = xt_rateinfo
    facts = frozenset({"limit"})   # its region: where helpers find the bucket key

    def table_maps(self, table: Table) -> dict[MapRef, int]:
        # fresh buckets with every load, as the kernel's checkentry makes them
        fd = create_buckets(table)
        return {} if fd is None else {LIMITS: fd}

    def decode(self, payload: bytes, where: str) -> LimitMatch:
        avg, burst, _prev, _credit, credit_cap, cost, _master = self.packed.unpack_from(payload)
        hz = kernel_hz()
        full = user2credits(avg * burst & U32, hz)
        # limit_mt_check()
        if burst == 0 or full < user2credits(avg, hz):
            raise BpfilterError(errno.ERANGE, f"{where}: limit: rate {avg}/{burst} overflows "
                                              f"(the kernel says: Overflow, try lower)")
        if cost == 0:
            credit_cap, cost = full, user2credits(avg, hz)
        return LimitMatch(avg, burst, full, credit_cap, cost,
                          credits_per_jiffy(hz).bit_length() - 1)

    def describe(self, m: LimitMatch) -> str:
        return f"limit: avg {_rate(m.avg)} burst {m.burst}"

    def emit(self, m: LimitMatch, asm, out) -> None:
        """limit_mt() on the rule's bucket, if every earlier test of the rule held;
        its answer folds into the outcome. R8 carries it across the helper calls:
        0 a token was taken, 1 none, 2 no bucket (the loader makes one for every
        limit match, so never; failing closed, it drops the packet)."""
        done, outcome = asm.label("limit_done"), asm.label("limit_outcome")
        update, capped = asm.label("limit_update"), asm.label("limit_capped")
        store, unlock = asm.label("limit_store"), asm.label("limit_unlock")
        out.hotdrops = True
        emit_skip_if_decided(asm, done)
        emit_state_lookup(asm, LIMITS, match_key(out.rule, m), _KEY)
        asm.emit(BPF_MOV64_IMM(R8, 2), BPF_JMP_IMM(I.BPF_JEQ, R0, 0, outcome),
                 BPF_MOV64_REG(R9, R0),
                 BPF_EMIT_CALL(I.BPF_FUNC_jiffies64), BPF_MOV64_REG(R8, R0),
                 BPF_MOV64_REG(R1, R9), BPF_EMIT_CALL(I.BPF_FUNC_spin_lock),
                 # R1 = credit, R2 = prev, R3 = now; R8 = 1 until a token is taken
                 BPF_LDX_MEM(BPF_W, R1, R9, B_CREDIT), BPF_LDX_MEM(BPF_DW, R2, R9, B_PREV),
                 BPF_MOV64_REG(R3, R8), BPF_MOV64_IMM(R8, 1),
                 # the fast path: too few credits and no jiffy elapsed, nothing written
                 BPF_JMP32_IMM(I.BPF_JGE, R1, m.cost, update),
                 BPF_JMP_REG(I.BPF_JEQ, R2, R3, unlock))
        asm.place(update)
        # credit += (now - xchg(&prev, now)) * CREDITS_PER_JIFFY, all in u32
        asm.emit(BPF_STX_MEM(BPF_DW, R9, R3, B_PREV),
                 BPF_ALU64_REG(I.BPF_SUB, R3, R2), BPF_ALU64_IMM(I.BPF_LSH, R3, m.shift),
                 BPF_ALU32_REG(I.BPF_ADD, R1, R3),
                 BPF_JMP32_IMM(I.BPF_JLE, R1, m.credit_cap, capped),
                 BPF_MOV32_IMM(R1, m.credit_cap))
        asm.place(capped)
        asm.emit(BPF_JMP32_IMM(I.BPF_JLT, R1, m.cost, store),
                 BPF_ALU32_IMM(I.BPF_SUB, R1, m.cost), BPF_MOV64_IMM(R8, 0))
        asm.place(store)
        asm.emit(BPF_STX_MEM(BPF_W, R9, R1, B_CREDIT))
        asm.place(unlock)
        asm.emit(BPF_MOV64_REG(R1, R9), BPF_EMIT_CALL(I.BPF_FUNC_spin_unlock))
        asm.place(outcome)
        asm.emit(BPF_MOV64_REG(MISMATCH, R8), BPF_ALU64_IMM(I.BPF_AND, MISMATCH, 1),
                 BPF_MOV64_REG(HOTDROP, R8), BPF_ALU64_IMM(I.BPF_RSH, HOTDROP, 1))
        asm.place(done)


def create_buckets(table: Table) -> Optional[int]:
    """The LIMITS map for `table`, every bucket full and stamped with the current
    jiffies as limit_mt_check() leaves it; None when the table has no limit match."""
    found = keyed_matches(table, LimitMatch)
    if not found:
        return None
    now = jiffies()
    return create_locked_state(f"{table.name}_limit", _BUCKET_BTF,
                               [(key, BUCKET.pack(0, m.credit, now)) for key, m in found])


def create_locked_state(name: str, btf: tuple[bytes, int, int],
                        values: list[tuple[int, bytes]]) -> int:
    """A hash map of per-match state whose value holds a bpf_spin_lock (first), its
    `btf` (blob, key type id, value type id), keyed by match_key() (a u64), filled with
    `values`."""
    blob, key_type, value_type = btf
    btf_fd = bpf.btf_load(blob)
    try:
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_HASH, KEY.size, len(values[0][1]), len(values),
                            name, btf=(btf_fd, key_type, value_type))
    finally:
        os.close(btf_fd)
    try:
        bpf.map_update_batch(fd, b"".join(KEY.pack(key) for key, _ in values),
                             b"".join(value for _, value in values), len(values))
    except BaseException:
        os.close(fd)
        raise
    return fd


def locked_value_btf(name: str, size: int,
                     fields: list[tuple[str, int, int]]) -> tuple[bytes, int, int]:
    """Raw BTF for a u64 key and a value struct `name` of `size` bytes: a bpf_spin_lock
    at 0, then `fields` (name, byte offset, size 4 or 8, unsigned)."""
    b = BtfBuilder()
    widths = {4: b.integer("unsigned int", 4, False)}
    int32 = b.integer("int", 4, True)
    lock = b.struct("bpf_spin_lock", 4, [("val", int32, 0)])
    widths[8] = b.integer("unsigned long long", 8, False)
    value = b.struct(name, size, [("lock", lock, 0),
                                  *((f, widths[width], 8 * at) for f, at, width in fields)])
    return b.blob(), widths[8], value


_BUCKET_BTF = locked_value_btf("limit_bucket", BUCKET.size,
                               [("credit", B_CREDIT, 4), ("prev", B_PREV, 8)])
_JIFFIES = MapRef("jiffies")


def jiffies(samples: int = 1, between: float = 0.0) -> "int | list[tuple[float, int]]":
    """The kernel's jiffies now, as limit_mt_check() reads it: a two-instruction
    program run once writes bpf_jiffies64() where this can read it. With `samples`
    above 1: (CLOCK_MONOTONIC, jiffies) that many times, `between` seconds apart, from
    one load of the program."""
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 1, "limit_jiffies")
    try:
        code = _jiffies_program().assemble(map_fd={_JIFFIES: fd}.__getitem__)
        prog = bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, code, "limit_jiffies",
                             expected_attach_type=bpf.BPF_NETFILTER)
        taken = []
        try:
            for i in range(samples):
                if i:
                    time.sleep(between)
                now = time.monotonic()
                bpf.nf_test_run(prog, bpf.NF_INET_LOCAL_OUT, b"\x45" + bytes(19))
                taken.append((now, struct.unpack("<Q", bpf.map_lookup(fd, bytes(4), 8))[0]))
        finally:
            os.close(prog)
        return taken[0][1] if samples == 1 else taken
    finally:
        os.close(fd)


def _jiffies_program():
    asm = Assembler()
    asm.emit(BPF_EMIT_CALL(I.BPF_FUNC_jiffies64), BPF_LD_MAP_VALUE(R1, _JIFFIES, 0),
             BPF_STX_MEM(BPF_DW, R1, R0, 0), BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    return asm


def _rate(avg: int) -> str:
    """libxt_limit's print_rate(): the coarsest unit the period divides well."""
    if avg == 0:
        return "inf"
    rates = (("day", XT_LIMIT_SCALE * 24 * 60 * 60), ("hour", XT_LIMIT_SCALE * 60 * 60),
             ("min", XT_LIMIT_SCALE * 60), ("sec", XT_LIMIT_SCALE))
    i = 1
    while i < len(rates) and not (avg > rates[i][1] or rates[i][1] // avg < rates[i][1] % avg):
        i += 1
    name, mult = rates[i - 1]
    return f"{mult // avg}/{name}"
