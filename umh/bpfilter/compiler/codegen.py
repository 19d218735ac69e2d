"""Code generation: one BPF program per hook, walking the rules exactly as the
kernel's ipt_do_table() does.

Shape of a hook's program:
  main       prologue (packet facts), the built-in chain's rules, its policy
  subprogs   one per user chain reachable from this hook, called with R1 = &facts

User chains are BPF subprograms because iptables' jump stack is a call stack: `-j X`
calls X and continues with the next rule when X returns; `-g X` calls X and then
returns whatever X returned, which is exactly the kernel's "goto does not push".
A subprogram answers DROP (0) or ACCEPT (1), final verdicts that unwind every frame,
or CONTINUE when it ran off its end or hit RETURN. RETURN in a built-in chain, and a
goto'd chain returning to a built-in one, go to the policy, as the kernel's
underflow does.

Counters: every entry (rule, policy, implicit RETURN of a user chain) has a slot in a
per-CPU array, bumped with skb->len when the entry is reached and its matches hold,
before its target runs, as ipt_do_table() does. A match that "hotdrops" drops the
packet without counting the rule.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from .. import ext
from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.insn import (BPF_ATOMIC_OP, BPF_DW, BPF_CALL_REL, BPF_EMIT_CALL, BPF_EXIT_INSN,
                        BPF_JMP_A, BPF_JMP_IMM, BPF_LD_MAP_FD, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_MOV64_REG, BPF_ALU64_IMM, BPF_ST_MEM, BPF_W, FP, R0, R1, R2, R6, MapRef)
from ..errors import BpfilterError
from ..model import (Accept, Chain, Drop, Fallthrough, Goto, Hook, IpHeader, Jump, Return, Rule,
                     Table, Verdict)
from . import facts
from .primitives import emit_masked_equal, emit_name_equal, emit_nonzero

NF_DROP, NF_ACCEPT = 0, 1
CONTINUE = 2

COUNTERS = MapRef("counters")
PROG_ARRAY = MapRef("prog_array")

# BPF allows 8 frames; the main program is one of them.
MAX_CALL_FRAMES = 8

_MAIN_KEY_FP = facts.SLICE_FP - 8
_SUBPROG_KEY_FP = -8


@dataclass
class HookProgram:
    hook: Hook
    name: str
    asm: Assembler


def compile_table(table: Table, offsets: facts.KernelOffsets) -> list[HookProgram]:
    return [HookProgram(chain.hook, f"{table.name}_{chain.name}"[:15],
                        _HookCompiler(table, offsets).compile(chain))
            for chain in table.hook_chains()]


def dispatcher() -> Assembler:
    """The program attached at a hook: a tail call into the current ruleset's program.

    Replacing a ruleset is then one prog-array update, atomic for every packet. The
    slot is filled before the link exists, so the fall-through (fail closed) is only
    reachable if the array were emptied under a live link.
    """
    asm = Assembler()
    asm.emit(BPF_LD_MAP_FD(R2, PROG_ARRAY), BPF_MOV64_IMM(I.R3, 0),
             BPF_EMIT_CALL(I.BPF_FUNC_tail_call), BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
    return asm


def call_depth(table: Table, chain: Chain) -> int:
    """Frames needed to run `chain`: 1 plus the deepest chain it calls."""
    callees = {r.target.chain for r in chain.rules if isinstance(r.target, (Jump, Goto))}
    return 1 + max((call_depth(table, table.chains[c]) for c in callees), default=0)


class _HookCompiler:
    def __init__(self, table: Table, offsets: facts.KernelOffsets):
        self.table = table
        self.offsets = offsets
        self.asm = Assembler()
        self.entries: dict[str, object] = {}   # user chain name -> its subprogram label

    def compile(self, chain: Chain) -> Assembler:
        depth = call_depth(self.table, chain)
        if depth > MAX_CALL_FRAMES:
            raise BpfilterError(errno.EOPNOTSUPP,
                                f"chain {chain.name}: user chains nest {depth - 1} deep; bpfilter "
                                f"supports at most {MAX_CALL_FRAMES - 1} (BPF call frames)")
        asm = self.asm
        drop = asm.label("drop")
        facts.emit_prologue(asm, self.offsets, drop)
        policy = asm.label("policy")
        self._emit_rules(chain, policy=policy, drop=drop, key_fp=_MAIN_KEY_FP)
        asm.place(policy)
        self._emit_count(chain.tail_entry, _MAIN_KEY_FP)
        asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT if chain.policy is Verdict.ACCEPT else NF_DROP),
                 BPF_EXIT_INSN())
        asm.place(drop)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        # Subprograms are laid out after main, each emitted once however often called.
        done: set[str] = set()
        while len(done) < len(self.entries):
            for name in [n for n in self.entries if n not in done]:
                done.add(name)
                self._emit_subprog(self.table.chains[name])
        return asm

    def _subprog(self, name: str):
        if name not in self.entries:
            self.entries[name] = self.asm.label(f"chain_{name}")
        return self.entries[name]

    def _emit_subprog(self, chain: Chain) -> None:
        asm = self.asm
        asm.place(self.entries[chain.name])
        asm.emit(BPF_MOV64_REG(R6, R1))
        drop = asm.label("drop")
        self._emit_rules(chain, policy=None, drop=drop, key_fp=_SUBPROG_KEY_FP)
        self._emit_count(chain.tail_entry, _SUBPROG_KEY_FP)
        asm.emit(BPF_MOV64_IMM(R0, CONTINUE), BPF_EXIT_INSN())
        asm.place(drop)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())

    def _emit_rules(self, chain: Chain, policy, drop, key_fp: int) -> None:
        for rule in chain.rules:
            next_rule = self.asm.label(f"e{rule.entry}_next")
            self._emit_ip(rule.ip, next_rule)
            for match in rule.matches:
                ext.emit_match(match, self.table.family, self.asm, next_rule, drop)
            self._emit_count(rule.entry, key_fp)
            self._emit_target(rule, policy, next_rule)
            self.asm.place(next_rule)

    def _emit_ip(self, ip: IpHeader, fail) -> None:
        asm = self.asm
        for prefix, off in ((ip.src, facts.SADDR), (ip.dst, facts.DADDR)):
            if not prefix.is_any:
                emit_masked_equal(asm, off, 4, int.from_bytes(prefix.mask, "little"),
                                  int.from_bytes(prefix.addr, "little"), prefix.invert, fail)
        for iface, off in ((ip.in_iface, facts.IN_NAME), (ip.out_iface, facts.OUT_NAME)):
            if not iface.is_any:
                emit_name_equal(asm, off, iface.name, iface.mask, iface.invert, fail)
        if ip.proto:
            emit_masked_equal(asm, facts.PROTO, 1, 0xFF, ip.proto, ip.invert_proto, fail)
        # NF_INVF(IPT_INV_FRAG, (flags & IPT_F_FRAG) && !isfrag) must be false
        if ip.fragment:
            emit_nonzero(asm, facts.FRAGOFF, 2, ip.invert_fragment, fail)
        elif ip.invert_fragment:
            asm.emit(BPF_JMP_A(fail))

    def _emit_target(self, rule: Rule, policy, next_rule) -> None:
        asm = self.asm
        target = rule.target
        if isinstance(target, (Accept, Drop)):
            asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT if isinstance(target, Accept) else NF_DROP),
                     BPF_EXIT_INSN())
        elif isinstance(target, Return):
            if policy is not None:
                asm.emit(BPF_JMP_A(policy))
            else:
                asm.emit(BPF_MOV64_IMM(R0, CONTINUE), BPF_EXIT_INSN())
        elif isinstance(target, Fallthrough):
            pass
        elif isinstance(target, (Jump, Goto)):
            asm.emit(BPF_MOV64_REG(R1, R6), BPF_CALL_REL(self._subprog(target.chain)))
            if isinstance(target, Jump):
                asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, CONTINUE, next_rule))
            elif policy is not None:
                asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R0, CONTINUE, policy))
            asm.emit(BPF_EXIT_INSN())
        else:
            raise BpfilterError(errno.EOPNOTSUPP, f"entry {rule.entry}: target "
                                                  f"'{target.name}' has no code generator")

    def _emit_count(self, entry: int, key_fp: int) -> None:
        asm = self.asm
        skip = asm.label("uncounted")
        asm.emit(
            BPF_ST_MEM(BPF_W, FP, key_fp, entry),
            BPF_LD_MAP_FD(R1, COUNTERS),
            BPF_MOV64_REG(R2, FP), BPF_ALU64_IMM(I.BPF_ADD, R2, key_fp),
            BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
            BPF_JMP_IMM(I.BPF_JEQ, R0, 0, skip),
            BPF_MOV64_IMM(R1, 1),
            BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD, R0, R1, 0),
            BPF_LDX_MEM(BPF_W, R1, R6, facts.LEN),
            BPF_ATOMIC_OP(BPF_DW, I.BPF_ADD, R0, R1, 8),
        )
        asm.place(skip)
