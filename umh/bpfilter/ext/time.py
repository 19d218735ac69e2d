"""-m time (struct xt_time_info, revision 0): the wall clock's date, time of day,
weekday and day of the month against ranges and masks, as net/netfilter/xt_time.c
has it (its localtime_1/2/3 and their tables, years past 2039 as it computes them).

With bpfilter.ko: the kernel's own (ext/xtmatch.py). Without it: time_mt() in BPF.
The clock is the kernel's, read as netfilter programs can: bpf_ktime_get_tai_ns(),
less the kernel's TAI offset (0 until a time daemon sets it), and for --kerneltz the
kernel's time zone (settimeofday()'s sys_tz), both of which the service keeps in a map
(wallclock.py). The "time" fact group reads the clock once per packet, as the packet
meets the hook; the kernel reads it as each time rule runs, microseconds later.
"""
from __future__ import annotations

import datetime
import errno
from dataclasses import dataclass

from construct import Int8un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU32_REG, BPF_ALU64_REG, BPF_DW,
                        BPF_EMIT_CALL, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_IMM64,
                        BPF_LD_MAP_VALUE, BPF_LDX_MEM, BPF_MOV32_REG, BPF_MOV64_IMM,
                        BPF_MOV64_REG, BPF_STX_MEM, MapRef, R0, R1, R2, R3, R6)
from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from . import BOTH_FAMILIES, register_match
from .xtmatch import ServedKernelMatch

BPF_FUNC_ktime_get_tai_ns = 208

xt_time_info = Struct("date_start" / Int32un, "date_stop" / Int32un, "daytime_start" / Int32un,
                      "daytime_stop" / Int32un, "monthdays" / Int32un, "weekdays" / Int8un,
                      "flags" / Int8un, Padding(2))
XT_TIME_LOCAL_TZ, XT_TIME_CONTIGUOUS = 1, 2
XT_TIME_ALL_FLAGS = XT_TIME_LOCAL_TZ | XT_TIME_CONTIGUOUS
XT_TIME_ALL_MONTHDAYS = 0xFFFFFFFE
XT_TIME_MAX_DAYTIME = 24 * 60 * 60 - 1
SECONDS_PER_DAY = 86400
DSE_FIRST = 2039

WALLCLOCK = MapRef("wallclock", "time rules without bpfilter.ko need the service's clock "
                                "(bpfilter serve keeps it)")
# WALLCLOCK's one value: the kernel's TAI offset, and its time zone, in seconds (s64)
W_TAI_OFFSET, W_TZ = 0, 8

# the facts: the wall clock's seconds, and the same in the kernel's time zone
_REGION = facts.reserve("time", 16)
STAMP, STAMP_LOCAL = _REGION, _REGION + 8


def _days_since_epoch() -> list[int]:
    """xt_time's days_since_epoch[]: 1 January of DSE_FIRST down to 1970's."""
    epoch = datetime.date(1970, 1, 1)
    return [(datetime.date(year, 1, 1) - epoch).days for year in range(DSE_FIRST, 1969, -1)]


DAYS_SINCE_YEAR = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)
DAYS_SINCE_LEAPYEAR = (0, 31, 60, 91, 121, 152, 182, 213, 244, 274, 305, 335)


def is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _read_clock(asm, k: facts.KernelOffsets) -> None:
    """The prologue's part: ktime_get_real_seconds() and its --kerneltz shift."""
    asm.emit(BPF_EMIT_CALL(BPF_FUNC_ktime_get_tai_ns),
             *BPF_LD_IMM64(R1, 1000000000), BPF_ALU64_REG(I.BPF_DIV, R0, R1),
             BPF_LD_MAP_VALUE(R2, WALLCLOCK, 0),
             BPF_LDX_MEM(BPF_DW, R1, R2, W_TAI_OFFSET), BPF_ALU64_REG(I.BPF_SUB, R0, R1),
             BPF_STX_MEM(BPF_DW, R6, R0, STAMP),
             BPF_LDX_MEM(BPF_DW, R1, R2, W_TZ), BPF_ALU64_REG(I.BPF_SUB, R0, R1),
             BPF_STX_MEM(BPF_DW, R6, R0, STAMP_LOCAL))


facts.OPTIONAL["time"] = _read_clock


@dataclass(frozen=True)
class ServedTimeMatch(Match):
    date_start: int
    date_stop: int
    daytime_start: int
    daytime_stop: int
    monthdays: int
    weekdays: int
    flags: int
    name = "time"
    revision = 0


@register_match
class Time(ServedKernelMatch):
    name = "time"
    revision = 0
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_time_info
    why = "which reads the kernel's clock"
    served_model = ServedTimeMatch
    served_facts = frozenset({"time"})
    environment = (WALLCLOCK,)

    def served(self, payload: bytes, where: str) -> ServedTimeMatch:
        p = self.struct.parse(payload)
        # time_mt_check()
        if p.daytime_start > XT_TIME_MAX_DAYTIME or p.daytime_stop > XT_TIME_MAX_DAYTIME:
            raise BpfilterError(errno.EDOM, f"{where}: time: start or stop time greater "
                                            f"than 23:59:59")
        if p.flags & ~XT_TIME_ALL_FLAGS:
            raise BpfilterError(errno.EINVAL, f"{where}: time: unknown flags "
                                              f"0x{p.flags & ~XT_TIME_ALL_FLAGS:x}")
        return ServedTimeMatch(p.date_start, p.date_stop, p.daytime_start, p.daytime_stop,
                               p.monthdays, p.weekdays, p.flags)

    def describe(self, m) -> str:
        f = self.fields_of(m)
        return f"TIME from {f['daytime_start']} to {f['daytime_stop']}"

    def emit_served(self, m: ServedTimeMatch, asm, out) -> None:
        _emit_served(m, asm, out)


def _emit_served(m: ServedTimeMatch, asm, out) -> None:
    """time_mt() on the facts: R0 = stamp (s64), R1 = 1 until every test held."""
    done = asm.label("time_done")
    asm.emit(BPF_MOV64_IMM(R1, 1),
             BPF_LDX_MEM(BPF_DW, R0, R6, STAMP_LOCAL if m.flags & XT_TIME_LOCAL_TZ else STAMP),
             # stamp < date_start || stamp > date_stop, signed against the u32 bounds
             *BPF_LD_IMM64(R2, m.date_start), BPF_JMP_REG(I.BPF_JSLT, R0, R2, done),
             *BPF_LD_IMM64(R2, m.date_stop), BPF_JMP_REG(I.BPF_JSGT, R0, R2, done),
             # localtime_1(): the time of day, div_u64_rem()'s unsigned remainder
             BPF_MOV64_REG(R2, R0), *BPF_LD_IMM64(R3, SECONDS_PER_DAY),
             BPF_ALU64_REG(I.BPF_MOD, R2, R3))
    start, stop = m.daytime_start, m.daytime_stop
    if start < stop:
        asm.emit(BPF_JMP_IMM(I.BPF_JLT, R2, start, done), BPF_JMP_IMM(I.BPF_JGT, R2, stop, done))
    else:
        inside = asm.label("time_inside")
        asm.emit(BPF_JMP_IMM(I.BPF_JGE, R2, start, inside), BPF_JMP_IMM(I.BPF_JGT, R2, stop, done))
        asm.place(inside)
        if m.flags & XT_TIME_CONTIGUOUS:
            # the hours after midnight count as the day before's
            today = asm.label("time_today")
            asm.emit(BPF_JMP_IMM(I.BPF_JGT, R2, stop, today),
                     *BPF_LD_IMM64(R3, SECONDS_PER_DAY), BPF_ALU64_REG(I.BPF_SUB, R0, R3))
            asm.place(today)
    # localtime_2(): days since the epoch (a u32), the weekday, 1 (Monday) to 7
    asm.emit(*BPF_LD_IMM64(R3, SECONDS_PER_DAY), BPF_ALU64_REG(I.BPF_DIV, R0, R3),
             BPF_MOV32_REG(R0, R0),
             BPF_MOV32_REG(R2, R0), BPF_ALU32_IMM(I.BPF_ADD, R2, 3),
             BPF_ALU32_IMM(I.BPF_MOD, R2, 7), BPF_ALU32_IMM(I.BPF_ADD, R2, 1),
             BPF_MOV64_IMM(R3, 1), BPF_ALU32_REG(I.BPF_LSH, R3, R2),
             BPF_ALU32_IMM(I.BPF_AND, R3, m.weekdays), BPF_JMP_IMM(I.BPF_JEQ, R3, 0, done))
    if m.monthdays != XT_TIME_ALL_MONTHDAYS:
        _emit_monthday(m, asm, done)
    asm.emit(BPF_MOV64_IMM(R1, 0))
    asm.place(done)
    out.mismatch(R1)


def _emit_monthday(m: ServedTimeMatch, asm, done) -> None:
    """localtime_3() of the days since the epoch in R0: the day of the month in R2,
    tested against the mask (R1 stays 1)."""
    found = asm.label("time_year")
    leap, plain = asm.label("time_leap"), asm.label("time_plain")
    for i, days in enumerate(_days_since_epoch()):
        below = asm.label("time_year_below")
        asm.emit(BPF_JMP_IMM(I.BPF_JLT, R0, days, below),
                 BPF_ALU32_IMM(I.BPF_SUB, R0, days),
                 BPF_JMP_A(leap if is_leap(DSE_FIRST - i) else plain))
        asm.place(below)
    for label, table in ((leap, DAYS_SINCE_LEAPYEAR), (plain, DAYS_SINCE_YEAR)):
        asm.place(label)
        for since in reversed(table[1:]):
            earlier = asm.label("time_month_earlier")
            asm.emit(BPF_JMP_IMM(I.BPF_JLT, R0, since, earlier),
                     BPF_ALU32_IMM(I.BPF_SUB, R0, since), BPF_JMP_A(found))
            asm.place(earlier)
        asm.emit(BPF_JMP_A(found))
    asm.place(found)
    # monthday = w - days_since[i] + 1; 1U << monthday, the shift as x86 takes it
    asm.emit(BPF_ALU32_IMM(I.BPF_ADD, R0, 1), BPF_ALU32_IMM(I.BPF_AND, R0, 31),
             BPF_MOV64_IMM(R3, 1), BPF_ALU32_REG(I.BPF_LSH, R3, R0),
             *BPF_LD_IMM64(R2, m.monthdays), BPF_ALU64_REG(I.BPF_AND, R3, R2),
             BPF_JMP_IMM(I.BPF_JEQ, R3, 0, done))
