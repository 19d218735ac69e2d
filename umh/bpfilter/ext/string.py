"""-m string (struct xt_string_info, revision 1, both families): string_mt(), the
pattern searched in the packet from its network header, between --from and --to, with
the kernel's textsearch: skb_find_text() over skb_seq_read()'s blocks.

With bpfilter.ko: the kernel's own (ext/xtmatch.py). Without it: the same search in
BPF, a bpf_loop() per rule whose callback is written for the rule's pattern:
  - bm (lib/ts_bm.c): Boyer-Moore with the kernel's own tables (bad_shift indexed by
    the text's byte as it is, with --icase the pattern's upper and lower case of each
    byte; good_shift), so its answers are the kernel's, the cases where --icase skips
    a match (bytes whose upper case lowers to another, as the kernel's Latin-1
    toupper() has them) included; each of skb_seq_read()'s blocks searched on its own,
    as bm_find() does: the linear part, each page fragment, then each skb of the
    frag_list (its linear part, its fragments), read through BTF offsets, so a match
    across two blocks is missed as the kernel misses it;
  - kmp (lib/ts_kmp.c): the first occurrence in the whole range, across blocks, which
    is what kmp_find()'s automaton finds (searched with correct shift tables);
  - the first occurrence must end within --to (skb_find_text()'s last test); blocks
    from --to on are not read.
--icase compares the kernel's toupper() of both. --algo fsm, which takes a token
program rather than a string, is refused (after the kernel's own checks of it).
"""
from __future__ import annotations

import errno
import functools
import hashlib
from dataclasses import dataclass
from typing import Optional

from construct import Bytes, Int8un, Int16un, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL, BPF_EXIT_INSN,
                        BPF_JMP32_IMM, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_FUNC, BPF_LDX_MEM,
                        BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Match
from ..packet import facts
from ..packet.primitives import emit_answer_and_hotdrop, emit_skip_if_decided
from . import BOTH_FAMILIES, register_match
from .xtmatch import ServedKernelMatch, c_string

ALGO_SIZE, PATTERN_SIZE = 16, 128
xt_string_info = Struct("from_offset" / Int16un, "to_offset" / Int16un, "algo" / Bytes(ALGO_SIZE),
                        "pattern" / Bytes(PATTERN_SIZE), "patlen" / Int8un, "flags" / Int8un,
                        Padding(10))
XT_STRING_FLAG_INVERT, XT_STRING_FLAG_IGNORECASE = 0x01, 0x02
# ts_fsm's token: u16 type, u8 recur, u8 value
TS_FSM_TYPE_MAX, TS_FSM_RECUR_MAX, TS_FSM_HEAD_IGNORE = 13, 5, 5
MAX_LOOPS = 1 << 23

# The "string" region: the window's bytes, then the walk's state.
_REGION = facts.reserve("string", PATTERN_SIZE + 64)
_BUF = _REGION
_STATE = _REGION + PATTERN_SIZE          # u8: what the next turn does, or how it ended
_WSTART, _WLEN, _SHIFT = _STATE + 4, _STATE + 8, _STATE + 12     # u32
_NEXT, _FRAG, _NFRAGS = _STATE + 16, _STATE + 20, _STATE + 24    # u32: blocks
_CUR, _SHINFO, _TMP = _STATE + 32, _STATE + 40, _STATE + 48      # u64
_SEARCH, _NEED_BLOCK, _FOUND, _NONE = 1, 2, 3, 4
_HEAD = 0xFFFFFFFF                      # _FRAG before the skb's linear part


def kernel_toupper(c: int) -> int:
    """include/linux/ctype.h's toupper() on lib/ctype.c's table: ASCII and Latin-1
    lower case (0xdf to 0xff but 0xf7) less 32."""
    return c - 32 if 0x61 <= c <= 0x7a or (c >= 0xdf and c != 0xf7) else c


def kernel_tolower(c: int) -> int:
    return c + 32 if 0x41 <= c <= 0x5a or (0xc0 <= c <= 0xde and c != 0xd7) else c


def _subpattern(p: bytes, i: int, j: int, g: int) -> bool:
    x, y = i + g - 1, j + g - 1
    while True:
        equal = p[x] == p[y]
        x, y = x - 1, y - 1
        if not equal:
            return False
        if y < 0:
            return True
        g -= 1
        if g == 0:
            return p[i - 1] != p[j - 1]


def bm_tables(pattern: bytes, icase: bool) -> tuple[list[int], list[int]]:
    """ts_bm.c's compute_prefix_tbl() for the pattern bm_init() keeps (upper case
    with --icase): bad_shift (by the text's byte) and good_shift."""
    m = len(pattern)
    bad = [m] * 256
    for i in range(m - 1):
        bad[pattern[i]] = m - 1 - i
        if icase:
            bad[kernel_tolower(pattern[i])] = m - 1 - i
    good = [1] + [m] * (m - 1)
    i, g = m - 1, 1
    while i > 0:
        for j in range(i - 1, -g, -1):
            if _subpattern(pattern, i, j, g):
                good[g] = m - j - g
                break
        g, i = g + 1, i - 1
    return bad, good


@dataclass(frozen=True)
class ServedStringMatch(Match):
    from_: int
    to: int
    algo: str
    pattern: bytes         # as the search compares it (upper case with --icase)
    flags: int
    name = "string"
    revision = 1

    @property
    def icase(self) -> bool:
        return bool(self.flags & XT_STRING_FLAG_IGNORECASE)

    def tables(self) -> tuple[list[int], list[int]]:
        bad, good = bm_tables(self.pattern, self.icase)
        if self.algo == "kmp":
            # any correct search finds kmp_find()'s first occurrence: bad_shift by
            # the byte as compared
            m = len(self.pattern)
            last = {c: m - 1 - i for i, c in enumerate(self.pattern[:-1])}
            fold = kernel_toupper if self.icase else (lambda c: c)
            bad = [last.get(fold(c), m) for c in range(256)]
        return bad, good


@functools.lru_cache(maxsize=1)
def _offsets() -> dict[str, int]:
    try:
        b = Btf.vmlinux()
        try:
            frag_len = b.member("skb_frag", "len")[0]
        except BtfError:
            frag_len = b.member("bio_vec", "bv_len")[0]
        return dict(len=b.member("sk_buff", "len")[0],
                    data_len=b.member("sk_buff", "data_len")[0],
                    head=b.member("sk_buff", "head")[0], end=b.member("sk_buff", "end")[0],
                    next=b.member("sk_buff", "next")[0],
                    nr_frags=b.member("skb_shared_info", "nr_frags")[0],
                    frag_list=b.member("skb_shared_info", "frag_list")[0],
                    frags=b.member("skb_shared_info", "frags")[0],
                    frag_size=b.struct_size("skb_frag" if frag_len == 8 else "bio_vec"),
                    frag_len=frag_len)
    except BtfError as err:
        raise BpfilterError(errno.EOPNOTSUPP, f"string needs the skb's layout in the kernel's "
                                              f"BTF ({err}); the whole table is refused") from None


def _fsm_check(pattern: bytes, icase: bool, where: str) -> None:
    """fsm_init()'s checks of its token program (EINVAL)."""
    def bad(why: str):
        return BpfilterError(errno.EINVAL, f"{where}: string: --algo fsm: {why}")
    if len(pattern) % 4:
        raise bad("the pattern is not a list of 4-byte tokens")
    if icase:
        raise bad("no --icase")
    tokens = [pattern[k:k + 4] for k in range(0, len(pattern), 4)]
    for i, t in enumerate(tokens):
        kind, recur = int.from_bytes(t[:2], "little"), t[2]
        if kind > TS_FSM_TYPE_MAX or recur > TS_FSM_RECUR_MAX:
            raise bad(f"token {i} is unknown")
        if recur == TS_FSM_HEAD_IGNORE and (i != 0 or i == len(tokens) - 1):
            raise bad(f"token {i}'s head-ignore is misplaced")


@register_match
class String(ServedKernelMatch):
    name = "string"
    revision = 1
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_string_info
    why = "which only the kernel's code can run"
    served_model = ServedStringMatch
    served_facts = frozenset({"skb", "string"})

    def served(self, payload: bytes, where: str) -> ServedStringMatch:
        p = self.struct.parse(payload)
        # string_mt_check(), textsearch_prepare()
        def invalid(why: str):
            return BpfilterError(errno.EINVAL, f"{where}: string: {why}")
        if p.from_offset > p.to_offset:
            raise invalid(f"--from {p.from_offset} is past --to {p.to_offset}")
        if p.algo[-1]:
            raise invalid("the algorithm's name is not NUL-terminated")
        if p.patlen > PATTERN_SIZE:
            raise invalid(f"a pattern of {p.patlen} bytes")
        if p.flags & ~(XT_STRING_FLAG_IGNORECASE | XT_STRING_FLAG_INVERT):
            raise invalid(f"unknown flags {p.flags:#x}")
        if p.patlen == 0:
            raise invalid("an empty pattern")
        algo = c_string(p.algo)
        pattern = p.pattern[:p.patlen]
        icase = bool(p.flags & XT_STRING_FLAG_IGNORECASE)
        if algo == "fsm":
            _fsm_check(pattern, icase, where)
        elif algo not in ("bm", "kmp"):
            raise BpfilterError(errno.ENOENT, f"{where}: string: no search algorithm "
                                              f"{algo!r} (the kernel has bm, kmp and fsm)")
        if icase:
            pattern = bytes(map(kernel_toupper, pattern))
        return ServedStringMatch(p.from_offset, p.to_offset, algo, pattern, p.flags)

    def served_unsupported(self, m: ServedStringMatch) -> Optional[str]:
        if m.algo == "fsm":
            return "--algo fsm (a token program) is not supported by bpfilter without the module"
        _offsets()
        return None

    def frames(self, m) -> int:
        return 1 if isinstance(m, ServedStringMatch) else 0

    def describe(self, m) -> str:
        if isinstance(m, ServedStringMatch):
            flags, algo, text = m.flags, m.algo, m.pattern
        else:
            f = dict(m.fields)
            flags, algo, text = f["flags"], c_string(f["algo"]), f["pattern"][:f["patlen"]]
        return f"STRING match {'!' if flags & XT_STRING_FLAG_INVERT else ''}{text!r} " \
               f"ALGO name {algo}"

    def emit_served(self, m: ServedStringMatch, asm, out) -> None:
        """R9: the answer (a walk that never ended, which the loop's bound rules out,
        fails closed: a hotdrop)."""
        done = asm.label("string_done")
        emit_skip_if_decided(asm, done)
        m_len = len(m.pattern)
        if m.algo == "kmp":
            # one window, [from, min(skb->len, to))
            short, len_ok = asm.label("string_short"), asm.label("string_len")
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN),
                     BPF_JMP_IMM(I.BPF_JLE, R1, m.to, short), BPF_MOV64_IMM(R1, m.to))
            asm.place(short)
            asm.emit(BPF_ALU64_IMM(I.BPF_SUB, R1, m.from_),
                     BPF_JMP_IMM(I.BPF_JSGT, R1, 0, len_ok), BPF_MOV64_IMM(R1, 0))
            asm.place(len_ok)
            asm.emit(BPF_STX_MEM(BPF_W, R6, R1, _WLEN),
                     BPF_ST_MEM(BPF_W, R6, _WSTART, m.from_),
                     BPF_ST_MEM(BPF_W, R6, _SHIFT, m_len - 1),
                     BPF_ST_MEM(BPF_B, R6, _STATE, _SEARCH))
        else:
            asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_STX_MEM(BPF_DW, R6, R1, _CUR),
                     BPF_ST_MEM(BPF_W, R6, _FRAG, -1), BPF_ST_MEM(BPF_W, R6, _NEXT, 0),
                     BPF_ST_MEM(BPF_B, R6, _STATE, _NEED_BLOCK))
        digest = hashlib.sha1(repr((m.algo, m.pattern, m.flags, m.from_, m.to)).encode()) \
            .hexdigest()[:16]
        callback = asm.subprogram(f"string_{digest}", lambda: _emit_turn(asm, m))
        # each turn moves an alignment or a block on: twice the length is more
        bounded = asm.label("string_bounded")
        asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN), BPF_ALU64_IMM(I.BPF_LSH, R1, 1),
                 BPF_ALU64_IMM(I.BPF_ADD, R1, 64),
                 BPF_JMP_IMM(I.BPF_JLE, R1, MAX_LOOPS, bounded), BPF_MOV64_IMM(R1, MAX_LOOPS))
        asm.place(bounded)
        asm.emit(*BPF_LD_FUNC(R2, callback), BPF_MOV64_REG(R3, R6), BPF_MOV64_IMM(R4, 0),
                 BPF_EMIT_CALL(I.BPF_FUNC_loop))
        # R9 = found ^ invert, or 2 (a hotdrop) if the walk did not end
        ended, answer = asm.label("string_ended"), asm.label("string_answer")
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _STATE), BPF_MOV64_IMM(R9, 1),
                 BPF_JMP_IMM(I.BPF_JEQ, R1, _FOUND, ended), BPF_MOV64_IMM(R9, 0),
                 BPF_JMP_IMM(I.BPF_JEQ, R1, _NONE, ended), BPF_MOV64_IMM(R9, 2),
                 BPF_JMP_A(answer))
        asm.place(ended)
        if m.flags & XT_STRING_FLAG_INVERT:
            asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R9, 1))
        asm.place(answer)
        emit_answer_and_hotdrop(asm, R9)
        asm.place(done)


def _ret(value: int) -> list:
    return [BPF_MOV64_IMM(R0, value), BPF_EXIT_INSN()]


def _end(state: int) -> list:
    return [BPF_ST_MEM(BPF_B, R6, _STATE, state), *_ret(1)]


def _probe(asm, size: int) -> None:
    """_TMP = *(R3) (size bytes), read with bpf_probe_read_kernel(); R3 kept in R7."""
    asm.emit(BPF_MOV64_REG(R7, R3), BPF_ST_MEM(BPF_DW, R6, _TMP, 0),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _TMP), BPF_MOV64_IMM(R2, size),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel))


def _emit_turn(asm, m: ServedStringMatch) -> None:
    """One turn of the search, R2 = &facts: 0 to go on, 1 once _STATE says how it
    ended."""
    search = asm.label("string_search")
    asm.emit(BPF_MOV64_REG(R6, R2), BPF_LDX_MEM(BPF_B, R1, R6, _STATE),
             BPF_JMP_IMM(I.BPF_JEQ, R1, _SEARCH, search))
    if m.algo == "bm":
        _emit_next_block(asm, m)
    else:
        asm.emit(*_end(_NONE))
    asm.place(search)
    _emit_alignment(asm, m)


def _emit_next_block(asm, m: ServedStringMatch) -> None:
    """skb_seq_read()'s next block: the current skb's linear part, then its page
    fragments, then the next skb of the root's frag_list; its window, clipped to
    [from, to)."""
    o = _offsets()
    more, frags, next_skb, have = (asm.label("string_more"), asm.label("string_frags"),
                                   asm.label("string_next_skb"), asm.label("string_block"))
    asm.emit(BPF_LDX_MEM(BPF_DW, R3, R6, _CUR), BPF_JMP_IMM(I.BPF_JNE, R3, 0, more),
             *_end(_NONE))
    asm.place(more)
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, _FRAG), BPF_JMP32_IMM(I.BPF_JNE, R1, -1, frags))
    # the linear part: skb_headlen() = len - data_len; the fragments' shinfo
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, o["len"]))
    _probe(asm, 4)
    asm.emit(BPF_LDX_MEM(BPF_W, R8, R6, _TMP), BPF_MOV64_REG(R3, R7),
             BPF_ALU64_IMM(I.BPF_ADD, R3, o["data_len"] - o["len"]))
    _probe(asm, 4)
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, _TMP), BPF_ALU64_REG(I.BPF_SUB, R8, R1),
             BPF_MOV64_REG(R3, R7), BPF_ALU64_IMM(I.BPF_ADD, R3, o["head"] - o["data_len"]))
    _probe(asm, 8)
    asm.emit(BPF_LDX_MEM(BPF_DW, R9, R6, _TMP), BPF_MOV64_REG(R3, R7),
             BPF_ALU64_IMM(I.BPF_ADD, R3, o["end"] - o["head"]))
    _probe(asm, 4)
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, _TMP), BPF_ALU64_REG(I.BPF_ADD, R9, R1),
             BPF_STX_MEM(BPF_DW, R6, R9, _SHINFO),
             BPF_MOV64_REG(R3, R9), BPF_ALU64_IMM(I.BPF_ADD, R3, o["nr_frags"]))
    _probe(asm, 1)
    asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, _TMP), BPF_STX_MEM(BPF_W, R6, R1, _NFRAGS),
             BPF_ST_MEM(BPF_W, R6, _FRAG, 0), BPF_JMP_A(have))
    asm.place(frags)
    asm.emit(BPF_LDX_MEM(BPF_W, R2, R6, _NFRAGS), BPF_JMP_REG(I.BPF_JGE, R1, R2, next_skb),
             BPF_MOV64_REG(R3, R1), BPF_ALU64_IMM(I.BPF_MUL, R3, o["frag_size"]),
             BPF_LDX_MEM(BPF_DW, R2, R6, _SHINFO), BPF_ALU64_REG(I.BPF_ADD, R3, R2),
             BPF_ALU64_IMM(I.BPF_ADD, R3, o["frags"] + o["frag_len"]),
             BPF_ALU64_IMM(I.BPF_ADD, R1, 1), BPF_STX_MEM(BPF_W, R6, R1, _FRAG))
    _probe(asm, 4)
    asm.emit(BPF_LDX_MEM(BPF_W, R8, R6, _TMP), BPF_JMP_A(have))
    asm.place(next_skb)
    # the root's frag_list, then each skb's next (the root's shinfo: still _SHINFO)
    root, moved = asm.label("string_root"), asm.label("string_moved")
    asm.emit(BPF_LDX_MEM(BPF_DW, R3, R6, _CUR), BPF_LDX_MEM(BPF_DW, R2, R6, facts.SKB),
             BPF_JMP_REG(I.BPF_JEQ, R3, R2, root),
             BPF_ALU64_IMM(I.BPF_ADD, R3, o["next"]), BPF_JMP_A(moved))
    asm.place(root)
    asm.emit(BPF_LDX_MEM(BPF_DW, R3, R6, _SHINFO), BPF_ALU64_IMM(I.BPF_ADD, R3, o["frag_list"]))
    asm.place(moved)
    _probe(asm, 8)
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, _TMP), BPF_STX_MEM(BPF_DW, R6, R1, _CUR),
             BPF_ST_MEM(BPF_W, R6, _FRAG, -1), *_ret(0))
    asm.place(have)
    # R8 = the block's length: [next, next + R8)
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, _NEXT), BPF_MOV64_REG(R2, R1),
             BPF_ALU64_REG(I.BPF_ADD, R2, R8), BPF_STX_MEM(BPF_W, R6, R2, _NEXT))
    past, start_ok, end_ok, nonempty = (asm.label("string_past"), asm.label("string_start"),
                                        asm.label("string_end"), asm.label("string_nonempty"))
    asm.emit(BPF_JMP_IMM(I.BPF_JLT, R1, m.to, past), *_end(_NONE))
    asm.place(past)
    asm.emit(BPF_JMP_IMM(I.BPF_JGE, R1, m.from_, start_ok), BPF_MOV64_IMM(R1, m.from_))
    asm.place(start_ok)
    asm.emit(BPF_JMP_IMM(I.BPF_JLE, R2, m.to, end_ok), BPF_MOV64_IMM(R2, m.to))
    asm.place(end_ok)
    asm.emit(BPF_STX_MEM(BPF_W, R6, R1, _WSTART), BPF_ALU64_REG(I.BPF_SUB, R2, R1),
             BPF_JMP_IMM(I.BPF_JSGT, R2, 0, nonempty), BPF_MOV64_IMM(R2, 0))
    asm.place(nonempty)
    asm.emit(BPF_STX_MEM(BPF_W, R6, R2, _WLEN), BPF_ST_MEM(BPF_W, R6, _SHIFT, len(m.pattern) - 1),
             BPF_ST_MEM(BPF_B, R6, _STATE, _SEARCH), *_ret(0))


def _emit_toupper(asm, reg: int) -> None:
    done, high = asm.label("toupper_done"), asm.label("toupper_high")
    asm.emit(BPF_JMP_IMM(I.BPF_JGE, reg, 0xDF, high),
             BPF_JMP_IMM(I.BPF_JLT, reg, ord("a"), done), BPF_JMP_IMM(I.BPF_JGT, reg, ord("z"), done),
             BPF_ALU64_IMM(I.BPF_SUB, reg, 32), BPF_JMP_A(done))
    asm.place(high)
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, reg, 0xF7, done), BPF_ALU64_IMM(I.BPF_SUB, reg, 32))
    asm.place(done)


def _emit_alignment(asm, m: ServedStringMatch) -> None:
    """bm_find()'s loop body: the alignment ending at _SHIFT compared from its end;
    found, or the shift moves on by max(bad_shift, good_shift). R7 = shift, R9 = the
    index of the mismatch, R2 = the text's byte there, R3 = good_shift[i]."""
    p = m.pattern
    size = len(p)
    bad, good = m.tables()
    inside, read, common = (asm.label("string_inside"), asm.label("string_read"),
                            asm.label("string_common"))
    asm.emit(BPF_LDX_MEM(BPF_W, R7, R6, _SHIFT), BPF_LDX_MEM(BPF_W, R8, R6, _WLEN),
             BPF_JMP_REG(I.BPF_JLT, R7, R8, inside))
    if m.algo == "bm":
        asm.emit(BPF_ST_MEM(BPF_B, R6, _STATE, _NEED_BLOCK), *_ret(0))
    else:
        asm.emit(*_end(_NONE))
    asm.place(inside)
    asm.emit(BPF_LDX_MEM(BPF_W, R4, R6, _WSTART), BPF_ALU64_REG(I.BPF_ADD, R4, R7),
             BPF_ALU64_IMM(I.BPF_SUB, R4, size - 1),
             BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, _BUF), BPF_MOV64_IMM(R2, size),
             BPF_MOV64_REG(R3, R6), BPF_ALU64_IMM(I.BPF_ADD, R3, facts.DYNPTR_FROM_FACTS),
             BPF_MOV64_IMM(R5, 0), BPF_EMIT_CALL(I.BPF_FUNC_dynptr_read),
             BPF_JMP_IMM(I.BPF_JEQ, R0, 0, read), *_end(_NONE))
    asm.place(read)
    mismatches = []
    for i in range(size):
        at = asm.label("string_mismatch")
        mismatches.append(at)
        asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, _BUF + (size - 1 - i)), BPF_MOV64_REG(R3, R2))
        if m.icase:
            _emit_toupper(asm, R3)
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R3, p[size - 1 - i], at))
    asm.emit(*_end(_FOUND))
    for i, at in enumerate(mismatches):
        asm.place(at)
        asm.emit(BPF_MOV64_IMM(R9, i), BPF_MOV64_IMM(R3, good[i]), BPF_JMP_A(common))
    asm.place(common)
    # R1 = bad_shift[R2]
    chosen = asm.label("string_bad")
    asm.emit(BPF_MOV64_IMM(R1, size))
    for byte, shift in enumerate(bad):
        if shift != size:
            other = asm.label("string_other")
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, R2, byte, other), BPF_MOV64_IMM(R1, shift),
                     BPF_JMP_A(chosen))
            asm.place(other)
    asm.place(chosen)
    # shift = max(shift - i + bs, shift + good_shift[i])
    larger = asm.label("string_larger")
    asm.emit(BPF_MOV64_REG(R4, R7), BPF_ALU64_REG(I.BPF_SUB, R4, R9), BPF_ALU64_REG(I.BPF_ADD, R4, R1),
             BPF_ALU64_REG(I.BPF_ADD, R3, R7),
             BPF_JMP_REG(I.BPF_JSGE, R4, R3, larger), BPF_MOV64_REG(R4, R3))
    asm.place(larger)
    asm.emit(BPF_STX_MEM(BPF_W, R6, R4, _SHIFT), *_ret(0))
