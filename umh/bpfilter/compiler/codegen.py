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

A chain called from one place only is inlined there instead (its RETURN a jump to
where the call would have returned): BPF allows a program MAX_SUBPROGRAMS
subprograms, and rulesets such as kube-proxy's have a chain per service and per
endpoint, each jumped to from one rule. Chains called from many places are inlined,
smallest first, only as far as needed to stay within that limit; the verifier walks a
called chain anew at every call site anyway, so inlining costs it nothing more. Chains
of one shape are one subprogram, a template taking an instance number (templates.py);
a classified run of jumps calls its dispatch, a subprogram that runs the chain the
lookup named (classifier.py).

Counters: every entry (rule, policy, implicit RETURN of a user chain) has a slot in a
per-CPU array, bumped with skb->len when the entry is reached and its matches hold,
before its target runs, as ipt_do_table() does. A match that "hotdrops" drops the
packet without counting the rule.
"""
from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from .. import ext
from ..abi.codec import gc_paused
from ..bpf import insn as I
from ..bpf.asm import MAX_INSNS, Assembler, TooLarge
from ..bpf.insn import (BPF_ALU32_IMM, BPF_ALU64_IMM, BPF_ALU64_REG, BPF_ATOMIC_OP, BPF_B,
                        BPF_CALL_REL, BPF_DW, BPF_EMIT_CALL, BPF_EXIT_INSN, BPF_H, BPF_JMP32_IMM,
                        BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_MAP_FD, BPF_LDX_MEM,
                        BPF_MOV32_IMM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM,
                        BPF_W, FP, R0, R1, R2, R3, R6, R7, R8, R9, MapRef)
from ..errors import BpfilterError
from ..ext.tcp import EVIL_FRAGMENT_OFFSET, IPPROTO_TCP
from ..ext.udp import IPPROTO_UDP
from ..model import (Accept, Chain, Drop, ExtensionTarget, Fallthrough, Family, Goto, Hook, Jump,
                     Return, Rule, Table, Verdict)
from ..packet import facts, flavour
from ..packet.ipv6 import WALK, WALK_FOUND
from ..packet.primitives import RECORD_FP, Hole, RuleOutcome, emit_hole
from . import classifier, multifield, reroute, templates, trace
from .runs import (CALLS, CASE_BITS, INF, VERDICT_ACCEPT, VERDICT_DROP, VERDICT_HOTDROP,
                   Classified, TemplateCase, TupleSpace)

MAX_CASE = (1 << CASE_BITS) - 1
NF_DROP, NF_ACCEPT = 0, 1
CONTINUE = 2
# A run's dispatch, after a -g that returned: the run's chain returns.
RUN_RETURN = 3

COUNTERS = MapRef("counters")
CLASSIFIER = classifier.MAP
CLASSIFIER_RECORDS = multifield.RECORDS
PROG_ARRAY = MapRef("prog_array")

# BPF allows 8 frames; the main program is one of them.
MAX_CALL_FRAMES = 8
# BPF_MAX_SUBPROGS is 256, the main program one of them; chains are called subprograms
# up to this many, which leaves room for the callbacks of matches' loops.
MAX_SUBPROGRAMS = 256 - 16

# The instructions the verifier may walk for one hook's program beyond the program
# itself, counted as it walks them: a user chain's code once for each path of calls
# reaching it (it verifies a call of a static subprogram anew at each call site), so
# a few hundred rules can expand to billions. Its own limit is 1,000,000 processed
# instructions (BPF_COMPLEXITY_LIMIT_INSNS), reached only after tens of seconds in
# the caller's bpf(): a table whose calls expand beyond this budget is refused at
# once rather than left to it (200k: under a second of verification). Real tables'
# calls add a few thousand.
VERIFIER_BUDGET = 200_000

# The counters' key, in each frame (a run's scratch until it decides). A run's lookup
# key goes below the main frame's, which has room for the largest, IPv6's (within
# facts.SCRATCH): every frame builds it there, through R6, so that runs in user chains
# take no stack of their own for it (BPF's 512 bytes are shared by every frame).
_MAIN_KEY_FP = facts.KEYS_FP - 8
_SUBPROG_KEY_FP = -8
_LOOKUP_KEY_FP = {family: _MAIN_KEY_FP - key.size for family, key in classifier.KEYS.items()}
assert min(_LOOKUP_KEY_FP.values()) >= -facts.SCRATCH


@dataclass
class HookProgram:
    hook: Hook
    name: str
    asm: Assembler
    slots: dict      # where the fact regions it reads are (packet.facts.layout)

    def assemble(self, map_fd, kfunc_id) -> bytes:
        return self.asm.assemble(map_fd=map_fd, kfunc_id=kfunc_id, slots=self.slots)


@dataclass
class CompiledTable:
    programs: list[HookProgram]
    space: TupleSpace      # where its runs' keys and records are
    runs: list[Classified]  # what the CLASSIFIER maps must hold for it
    needs: frozenset                   # the optional fact groups its programs read
    templates: templates.Templates = None   # what the INSTANCES map must hold for it
    trace_info: "bytes | None" = None       # what the TRACE_INFO map must hold, if it traces


@gc_paused()
def compile_table(table: Table, offsets: facts.KernelOffsets,
                  previous: "CompiledTable | None" = None, traced: bool = False) -> CompiledTable:
    """The table's programs; `traced`: they log the rules a traced packet passes
    (compiler/trace.py). With `previous`, the table it replaces, runs whose rules
    are there again are taken over rather than classified anew (classifier.EarlierRuns),
    in previous's tuple space, unless that space holds more slots of runs gone than
    of runs in use."""
    check_frames(table)   # before any classification: a refusal costs one walk
    earlier = None
    if previous is not None and previous.runs and not previous.space.wasteful(
            sum(run.record_count for run in previous.runs)):
        space, earlier = previous.space, classifier.EarlierRuns(previous.runs)
    else:
        space = TupleSpace(table.family)
    planned = templates.plan(table)
    space.instances = planned.instance_of
    # Entries no hook reaches never run: they are compiled into nothing. A template's
    # chains are its code (its exemplar's rules, never classified: too few).
    segments = {key: classifier.segments([r for r in chain.rules if r.reachable], space, earlier)
                for key, chain in table.chains.items() if key not in planned.instance_of}
    runs = {s.serial: s for chain in segments.values() for s in chain
            if isinstance(s, Classified)}
    needs = facts_needed(table, {**segments, **{t.exemplar.key: t.exemplar.rules
                                                for t in planned.templates}})
    if reroute.rerouted(table):
        needs |= reroute.FACTS
    trace_info = trace.table_info(table, traced)
    if trace_info is not None:
        needs |= trace.FACTS
    check_stale(table, needs)
    slots = facts.layout(needs)
    programs = [HookProgram(chain.hook, f"{table.name}_{chain.name}"[:15],
                            _compile_hook(table, offsets, segments, needs, planned, chain,
                                          trace_info), slots)
                for chain in table.hook_chains()]
    return CompiledTable(programs, space, list(runs.values()), needs, planned, trace_info)


def _compile_hook(table: Table, offsets: facts.KernelOffsets, segments, needs: frozenset,
                  planned: templates.Templates, chain: Chain,
                  trace_info: "bytes | None") -> Assembler:
    try:
        return _HookCompiler(table, offsets, segments, needs, planned,
                             trace_info).compile(chain)
    except TooLarge:
        raise BpfilterError(
            errno.E2BIG, f"chain {chain.name}: its program, with the user chains it reaches, "
            f"passes the {MAX_INSNS} instructions BPF allows a program") from None


def facts_needed(table: Table, segments: "dict | None" = None) -> frozenset:
    """The optional fact groups the table's matches read (facts.OPTIONAL). Given its
    segments, only their plain rules are asked: classified ones read none
    (runs.eligible)."""
    rules = (chain.rules for chain in table.chains.values()) if segments is None \
        else segments.values()
    return frozenset().union(*(ext.facts_needed(rule, table.family)
                               for chain in rules for rule in chain if isinstance(rule, Rule)))


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


def call_frames(table: Table) -> dict[str, tuple[int, int]]:
    """Chain key -> (frames needed to run it, frames of its calls alone): 1 plus the
    deepest chain it calls or, in the first, the frames its matches' loops open
    (ext.frames), if more. One post-order walk of the call graph, each chain once
    (a table of a few hundred rules can hold more paths than atoms in the universe);
    without recursion, however deep the nesting. Only reached rules are edges:
    mark_source_chains refused every loop among them."""
    callees, loops = {}, {}
    for key, chain in table.chains.items():
        reached = [r for r in chain.rules if r.reachable]
        callees[key] = {r.target.chain for r in reached if isinstance(r.target, (Jump, Goto))}
        loops[key] = max((ext.frames(r, table.family) for r in reached), default=0)
    frames: dict[str, tuple[int, int]] = {}
    for root in table.chains:
        if root in frames:
            continue
        path, on_path = [(root, iter(callees[root]))], {root}
        while path:
            key, todo = path[-1]
            for callee in todo:
                if callee not in frames:
                    if callee in on_path:
                        raise BpfilterError(errno.ELOOP, f"chain {table.chains[callee].name} "
                                            "calls itself")
                    on_path.add(callee)
                    path.append((callee, iter(callees[callee])))
                    break
            else:
                path.pop()
                on_path.discard(key)
                below = [frames[c] for c in callees[key]]
                frames[key] = (1 + max([f for f, _ in below] + [loops[key]]),
                               1 + max((c for _, c in below), default=0))
    return frames


def check_stale(table: Table, needs: frozenset) -> None:
    """Refuse a table where a target's write would leave facts its rules read stale
    (TargetExtension.stale): the prologue reads them once, the kernel reads the
    packet as each rule meets it."""
    for chain in table.chains.values():
        for rule in chain.rules:
            if isinstance(rule.target, ExtensionTarget):
                stale = ext.stale_facts(rule.target, table.family) & needs
                if stale:
                    raise BpfilterError(
                        errno.EOPNOTSUPP, f"chain {chain.name}: target '{rule.target.name}' "
                        f"of the rule at entry {rule.entry} changes what other rules of the "
                        f"table read ({', '.join(sorted(stale))}), which bpfilter reads once "
                        f"per packet; the whole table is refused")


def check_frames(table: Table) -> None:
    """Refuse a table whose hooks would nest more BPF call frames than BPF allows."""
    frames = call_frames(table)
    for chain in table.hook_chains():
        depth, chains = frames[chain.key]
        if depth > MAX_CALL_FRAMES:
            loop = "" if chains == depth else " and a match loops in a frame below them"
            raise BpfilterError(errno.EOPNOTSUPP,
                                f"chain {chain.name}: user chains nest {chains - 1} deep{loop}; "
                                f"bpfilter supports at most {MAX_CALL_FRAMES - 1} (BPF call frames)")


def _jump_tuples(run: Classified, family: Family) -> dict[int, tuple]:
    """Tuple id -> (the first entry of its keys that jumps, or None; its last entry)."""
    at = classifier.KEYS[family].tuple
    tuples: dict[int, tuple] = {}
    for key, (entry, value) in run.keys.items():
        tid = int.from_bytes(key[at:at + 4], "little")
        first, last = tuples.get(tid, (None, -1))
        if value >= CALLS and (first is None or entry < first):
            first = entry
        tuples[tid] = (first, max(last, entry))
    return tuples


class _InRegister(NamedTuple):
    """A template's instance number held in a register (a dispatch's)."""

    reg: int


class _HookCompiler:
    def __init__(self, table: Table, offsets: facts.KernelOffsets, segments, needs: frozenset,
                 planned: templates.Templates, trace_info: "bytes | None" = None):
        self.table = table
        # every count is followed by the entry's trace, if the packet is traced
        self.trace_size = len(trace_info) if trace_info is not None else None
        self.templates = planned
        self.offsets = offsets
        self.segments = segments
        self.needs = needs   # the optional fact groups the prologue reads
        self.flavour = flavour(table.family)
        # the lookup key, from R6 (&facts): in the main frame's scratch above the facts
        self.lookup_key = _LOOKUP_KEY_FP[table.family] - facts.facts_fp(facts.layout(needs))
        self.asm = Assembler()
        self.entries: dict[str, object] = {}   # user chain key -> its subprogram label
        self.called: list[str] = []            # those keys, in the order first called
        self.size: dict[str, int] = {}         # chain key -> its code's instructions
        self.calls: dict[str, list[str]] = {}  # chain key -> the key each call site calls
        self.dispatches: dict[str, Classified] = {}   # subprogram key -> its run of jumps
        self.template_keys: dict[str, templates.Template] = {}   # subprogram key -> template

    def compile(self, chain: Chain) -> Assembler:
        """The hook program of `chain` (check_frames passed)."""
        asm = self.asm
        self.inlined = self._chains_to_inline(chain)
        drop = asm.label("drop")
        facts.emit_prologue(asm, self.offsets, drop, self.flavour, self.needs)
        rerouted = chain.hook in reroute.rerouted(self.table)
        if rerouted:
            reroute.emit_snapshot(asm)
            rules_start = len(asm.items)
        policy = asm.label("policy")
        self._emit_rules(chain, chain.key, ret=policy, drop=drop, key_fp=_MAIN_KEY_FP)
        asm.place(policy)
        self._emit_count(chain.tail_entry, _MAIN_KEY_FP)
        asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT if chain.policy is Verdict.ACCEPT else NF_DROP),
                 BPF_EXIT_INSN())
        asm.place(drop)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        if rerouted:
            reroute.emit_epilogue(asm, rules_start)
        self.size[chain.key] = len(asm.items)
        # Subprograms are laid out after main, each emitted once however often called;
        # emitting one may ask for more (self.entries grows, in order).
        emitted = 0
        while emitted < len(self.called):
            key = self.called[emitted]
            if key in self.dispatches:
                self._emit_dispatch(key, self.dispatches[key])
            elif key in self.template_keys:
                self._emit_template(key, self.template_keys[key])
            else:
                self._emit_subprog(self.table.chains[key])
            emitted += 1
        self._check_expansion(chain)
        asm.emit_subprograms()
        return asm

    def _chains_to_inline(self, hook_chain: Chain) -> set[str]:
        """The user chains reached from `hook_chain` to inline at their call sites:
        those called from one place, and the smallest of the others as far as needed
        to call no more than MAX_SUBPROGRAMS, dispatches included. (A run of jumps'
        dispatch inlines its chains whatever this says: it is a frame of its own, and
        inlined there a chain takes no frame more than a call from plain code does.)"""
        chains = self.table.chains
        instance_of = self.templates.instance_of
        sites: dict[str, int] = {}
        others = 0   # dispatches' and templates' subprograms
        reached, todo = {hook_chain.key}, [hook_chain.key]
        shaped: set[int] = set()   # templates reached: their code is their first chain's
        while todo:
            key = todo.pop()
            if key in instance_of:
                index = instance_of[key][0]
                if index in shaped:
                    continue
                shaped.add(index)
                others += 1
            for rule in chains[key].rules:
                if rule.reachable and isinstance(rule.target, (Jump, Goto)):
                    callee = rule.target.chain
                    sites[callee] = sites.get(callee, 0) + 1
                    if callee not in reached:
                        reached.add(callee)
                        todo.append(callee)
            for segment in self.segments.get(key, ()):
                if isinstance(segment, Classified) and segment.calls:
                    others += 1
                    # (a chain only dispatches call needs no subprogram)
                    for target, count in Counter(rule.target for rule in segment.rules).items():
                        if isinstance(target, (Jump, Goto)) and target.chain not in instance_of:
                            sites[target.chain] -= count
        for key in instance_of:   # called as their template
            sites.pop(key, None)
        inline = {key for key, count in sites.items() if count <= 1}
        called = sorted((key for key in sites if key not in inline),
                        key=lambda key: (len(chains[key].rules) * sites[key], key), reverse=True)
        while called and len(called) + others > MAX_SUBPROGRAMS:
            inline.add(called.pop())
        return inline

    def _check_expansion(self, chain: Chain) -> None:
        """Refuse a program the verifier would walk beyond VERIFIER_BUDGET (its
        calls expanded): each chain's expansion once, in a memo, so counting costs
        what emitting did. Recursion is bounded: check_frames passed."""
        expanded: dict[str, int] = {}

        def walk(key: str) -> int:
            if key not in expanded:
                expanded[key] = self.size[key] + sum(walk(c) for c in self.calls.get(key, ()))
            return expanded[key]
        total = walk(chain.key)
        if total - sum(self.size.values()) > VERIFIER_BUDGET:
            widest = max(self.called, key=lambda k: len(self.calls.get(k, ())), default=chain.key)
            if widest in self.table.chains:
                name = f"chain {self.table.chains[widest].name}"
            elif widest in self.dispatches:
                name = f"the run of jumps from entry {self.dispatches[widest].rules[0].entry}"
            else:
                name = f"the template of chain {self.template_keys[widest].exemplar.name}"
            raise BpfilterError(
                errno.EOPNOTSUPP,
                f"chain {chain.name}: its calls of user chains expand to {total} instructions "
                f"for the BPF verifier, which checks a user chain anew at every call site "
                f"({name} alone makes "
                f"{len(self.calls.get(widest, ()))} calls); bpfilter refuses more than "
                f"{VERIFIER_BUDGET} beyond the program's own")

    def _subprog(self, key: str):
        if key not in self.entries:
            self.entries[key] = self.asm.label(f"chain_{self.table.chains[key].name}")
            self.called.append(key)
        return self.entries[key]

    def _emit_subprog(self, chain: Chain) -> None:
        asm = self.asm
        start = len(asm.items)
        asm.place(self.entries[chain.key])
        asm.emit(BPF_MOV64_REG(R6, R1))
        drop, ret = asm.label("drop"), asm.label("return")
        self._emit_rules(chain, chain.key, ret=ret, drop=drop, key_fp=_SUBPROG_KEY_FP)
        self._emit_count(chain.tail_entry, _SUBPROG_KEY_FP)
        asm.place(ret)
        asm.emit(BPF_MOV64_IMM(R0, CONTINUE), BPF_EXIT_INSN())
        asm.place(drop)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        self.size[chain.key] = len(asm.items) - start

    def _emit_rules(self, chain: Chain, owner: str, ret, drop, key_fp: int) -> None:
        """The chain's rules in the code of `owner` (the hook's chain or the
        subprogram's), RETURN going to `ret`: the policy, the subprogram's CONTINUE,
        or for an inlined chain where its call returns to."""
        for segment in self.segments[chain.key]:
            if isinstance(segment, Classified):
                self._emit_run(segment, owner, ret, drop, key_fp)
                continue
            self._emit_rule(segment, owner, ret, drop, key_fp,
                            lambda entry=segment.entry: self._emit_count(entry, key_fp))

    def _emit_rule(self, rule: Rule, owner: str, ret, drop, key_fp: int, count) -> None:
        """One rule as code: its tests, then `count()` (its counter), then its target."""
        next_rule = self.asm.label(f"e{rule.entry}_next")
        out = RuleOutcome(self.asm, rule)
        self.flavour.emit_ip_match(self.asm, rule.ip, out)
        for match in rule.matches:
            ext.emit_match(match, self.table.family, self.asm, out)
        out.finish(next_rule, drop)
        count()
        self._emit_target(rule, owner, ret, next_rule, drop, key_fp)
        self.asm.place(next_rule)

    def _emit_target(self, rule: Rule, owner: str, ret, next_rule, drop, key_fp: int) -> None:
        asm = self.asm
        target = rule.target
        if isinstance(target, (Accept, Drop)):
            asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT if isinstance(target, Accept) else NF_DROP),
                     BPF_EXIT_INSN())
        elif isinstance(target, Return):
            asm.emit(BPF_JMP_A(ret))
        elif isinstance(target, Fallthrough):
            pass
        elif isinstance(target, (Jump, Goto)):
            # -g X returns where this chain's RETURN would
            back = next_rule if isinstance(target, Jump) else ret
            self._emit_jump(target.chain, owner, back, drop, key_fp)
        elif isinstance(target, templates.TemplateCall):
            self._emit_template_call(target.index, owner, ret if target.goto else next_rule,
                                     target.instance)
        else:
            ext.emit_target(rule, self.table.family, asm, next_rule)

    def _emit_jump(self, key: str, owner: str, back, drop, key_fp: int,
                   inline: bool = False) -> None:
        """Run user chain `key`, on to `back` if it returns: inlined (if `inline` or
        chosen to be), or called."""
        asm = self.asm
        if key in self.templates.instance_of:
            index, instance = self.templates.instance_of[key]
            self._emit_template_call(index, owner, back, instance)
            return
        if inline or key in self.inlined:
            callee = self.table.chains[key]
            self._emit_rules(callee, owner, ret=back, drop=drop, key_fp=key_fp)
            self._emit_count(callee.tail_entry, key_fp)
            asm.emit(BPF_JMP_A(back))
            return
        asm.emit(BPF_MOV64_REG(R1, R6), BPF_CALL_REL(self._subprog(key)),
                 BPF_JMP_IMM(I.BPF_JEQ, R0, CONTINUE, back), BPF_EXIT_INSN())
        self.calls.setdefault(owner, []).append(key)

    def _emit_template_call(self, index: int, owner: str, back, instance) -> None:
        """Run the instance of template `index` (a number, a Hole of this template's
        record, or a register holding it), on to `back` if it returns."""
        asm = self.asm
        key = f"template {index}"
        if key not in self.entries:
            self.entries[key] = asm.label(f"template_{index}")
            self.called.append(key)
            self.template_keys[key] = self.templates.templates[index]
        asm.emit(BPF_MOV64_REG(R1, R6))
        if isinstance(instance, Hole):
            emit_hole(asm, R2, instance)
        elif isinstance(instance, _InRegister):
            asm.emit(BPF_MOV64_REG(R2, instance.reg))
        else:
            asm.emit(BPF_MOV64_IMM(R2, instance))
        asm.emit(BPF_CALL_REL(self.entries[key]), BPF_JMP_IMM(I.BPF_JEQ, R0, CONTINUE, back),
                 BPF_EXIT_INSN())
        self.calls.setdefault(owner, []).append(key)

    def _emit_template(self, key: str, template: templates.Template) -> None:
        """A template's subprogram (R1 = &facts, R2 = the instance): its record found,
        then its exemplar's rules, their constants read from the record, each rule
        counted at the record's first entry + its position."""
        asm = self.asm
        start = len(asm.items)
        key_fp = _SUBPROG_KEY_FP
        asm.place(self.entries[key])
        drop, ret = asm.label("drop"), asm.label("return")
        asm.emit(BPF_MOV64_REG(R6, R1), BPF_STX_MEM(BPF_W, FP, R2, key_fp),
                 BPF_LD_MAP_FD(R1, templates.INSTANCES),
                 BPF_MOV64_REG(R2, FP), BPF_ALU64_IMM(I.BPF_ADD, R2, key_fp),
                 BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
                 BPF_JMP_IMM(I.BPF_JEQ, R0, 0, ret),   # (every instance has its record)
                 BPF_STX_MEM(BPF_DW, FP, R0, RECORD_FP))

        def count(position: int) -> None:
            asm.emit(BPF_LDX_MEM(BPF_DW, I.R1, FP, RECORD_FP), BPF_LDX_MEM(BPF_W, I.R1, I.R1, 0))
            if position:
                asm.emit(BPF_ALU64_IMM(I.BPF_ADD, I.R1, position))
            self._emit_count(I.R1, key_fp, entry_in_register=True)
        for position, rule in enumerate(template.rules):
            self._emit_rule(rule, key, ret, drop, key_fp, lambda at=position: count(at))
        count(len(template.rules))
        asm.place(ret)
        asm.emit(BPF_MOV64_IMM(R0, CONTINUE), BPF_EXIT_INSN())
        asm.place(drop)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        self.size[key] = len(asm.items) - start

    def _emit_run(self, run, owner: str, ret, drop, key_fp: int) -> None:
        """The first match of a run: the smallest entry any tuple's lookup finds
        (R7, with its verdict in R8), or nothing and on to the code after the run.
        Tuple space runs look their entries up, multifield runs search buckets."""
        asm = self.asm
        after, projected, lookups = asm.label("run_end"), asm.label("ip_only"), asm.label("run")
        decide, unwalked = asm.label("run_decide"), asm.label("unwalked")
        if run.calls:
            asm.emit(BPF_MOV64_IMM(R9, 0))   # the rounds' floor (_emit_rounds)
        # Which lookups: IPv6's projection for packets whose extension headers cannot
        # be walked (ip6_packet_match() decides those before any match), the ip
        # projection for packets a port match would hotdrop.
        if self.table.family is Family.IPV6:
            asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, WALK),
                     BPF_JMP_IMM(I.BPF_JNE, R1, WALK_FOUND, unwalked))
        asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, facts.PROTO),
                 BPF_LDX_MEM(BPF_H, R2, R6, facts.FRAGOFF),
                 BPF_LDX_MEM(BPF_B, R3, R6, facts.L4_AVAIL))
        for proto, header in ((IPPROTO_TCP, facts.TCP_HEADER), (IPPROTO_UDP, facts.SMALL_HEADER)):
            other = asm.label("not_proto")
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, R1, proto, other))
            if proto == IPPROTO_TCP:
                asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R2, EVIL_FRAGMENT_OFFSET, projected))
            asm.emit(BPF_JMP_IMM(I.BPF_JNE, R2, 0, lookups),
                     BPF_JMP_IMM(I.BPF_JLT, R3, header, projected),
                     BPF_JMP_A(lookups))
            asm.place(other)
        asm.place(lookups)
        if isinstance(run, multifield.MultiFieldRun):
            multifield.emit_search(asm, run.tuples, key_fp, decide)
            asm.place(projected)
            multifield.emit_search(asm, run.ip_tuples, key_fp, decide)
        else:
            # the l4 bit: port matches may look at this packet (first fragments only)
            l4_known = asm.label("l4_known")
            asm.emit(BPF_MOV64_IMM(R9, 0), BPF_JMP_IMM(I.BPF_JNE, R2, 0, l4_known),
                     BPF_MOV64_IMM(R9, 1))
            asm.place(l4_known)
            main_lookups = asm.label("main_lookups")
            asm.place(main_lookups)
            # each structure's lookups, from where the checks above go for it
            structures = [(None, run.tuples), (projected, run.ip_tuples)]
            if self.table.family is Family.IPV6:
                structures.append((unwalked, run.unwalked_tuples))
            calling = _jump_tuples(run, self.table.family) if run.calls else None
            main = [t.tid for t in run.tuples]
            for entry, tuples in structures:
                if entry is not None:
                    asm.place(entry)
                    if calling is not None and [t.tid for t in tuples] == main:
                        # the main tuples' twins (no ports, no -p, so no l4 bit in
                        # their keys): their rounds
                        asm.emit(BPF_JMP_A(main_lookups))
                        continue
                if calling is None:
                    self._emit_lookups(tuples, key_fp, decide)
                else:
                    self._emit_rounds(run, tuples, calling, owner, ret, drop, key_fp, after)
            if calling is not None:
                asm.place(after)
                return
        asm.place(decide)
        accept = asm.label("run_accept")
        self._emit_first_match(run, key_fp, after, drop, accept)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        asm.place(accept)
        asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT), BPF_EXIT_INSN())
        asm.place(after)

    def _emit_first_match(self, run, key_fp: int, after, drop, accept) -> None:
        """The run's first match, R7 (its entry, INF for none) and R8 (its value): on
        to `after` if none, to `drop` on a hotdrop; else it is counted, and to `accept`
        if it accepts. (R7 is kept: a run of jumps looks past it.)"""
        asm = self.asm
        asm.emit(BPF_JMP32_IMM(I.BPF_JEQ, R7, INF, after),
                 BPF_JMP_IMM(I.BPF_JEQ, R8, VERDICT_HOTDROP, drop),
                 BPF_MOV64_REG(R1, R7))
        if run.base:   # the run's entries count from its first rule
            asm.emit(BPF_ALU32_IMM(I.BPF_ADD, R1, run.base))
        self._emit_count(R1, key_fp, entry_in_register=True)
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R8, VERDICT_ACCEPT, accept))

    def _emit_rounds(self, run, tuples, calling: dict, owner: str, ret, drop, key_fp: int,
                     after) -> None:
        """A run of jumps' lookups of one structure, then the first rule found: its
        verdict, or its jump through the run's dispatch. A jump that returns (-j)
        makes the next round look again for entries past its own: R9 holds that
        floor, plus one, above the l4 bit. A tuple gives at most one rule a packet
        (classifier.segments), so as many rounds as tuples find them all; a structure
        whose keys jump nowhere takes one, and one whose tuples hold no rule after its
        first jump's takes one."""
        asm = self.asm
        accept = asm.label("run_accept")
        first_jump = min((calling[t.tid][0] for t in tuples if calling[t.tid][0] is not None),
                         default=None)
        jumps = first_jump is not None
        # a round past the first finds a rule after the first jump, each in a tuple of
        # its own
        later = sum(1 for t in tuples if jumps and calling[t.tid][1] > first_jump)
        rounds = min(len(tuples), 1 + later)
        for round_ in range(rounds):
            decide = asm.label("run_decide")
            self._emit_lookups(tuples, key_fp, decide, floor=round_ > 0, floored=True)
            asm.place(decide)
            self._emit_first_match(run, key_fp, after, drop, accept)
            asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R8, VERDICT_DROP, drop))
            if not jumps:
                continue
            asm.emit(BPF_MOV64_REG(R1, R6), BPF_MOV64_REG(R2, R8),
                     BPF_CALL_REL(self._dispatch(run, owner)),
                     BPF_JMP_IMM(I.BPF_JEQ, R0, RUN_RETURN, ret),
                     BPF_JMP_IMM(I.BPF_JEQ, R0, CONTINUE, after if round_ == rounds - 1
                                 else (next_round := asm.label("run_round"))),
                     BPF_EXIT_INSN())
            if round_ < rounds - 1:
                asm.place(next_round)
                asm.emit(BPF_MOV64_REG(R1, R9), BPF_ALU64_IMM(I.BPF_AND, R1, 1),
                         BPF_MOV64_REG(R9, R7), BPF_ALU64_IMM(I.BPF_ADD, R9, 1),
                         BPF_ALU64_IMM(I.BPF_LSH, R9, 1), BPF_ALU64_REG(I.BPF_OR, R9, R1))
        asm.emit(BPF_JMP_A(after))
        asm.place(accept)
        asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT), BPF_EXIT_INSN())

    def _dispatch(self, run, owner: str):
        """The label of the run's dispatch subprogram, one call site more."""
        key = f"dispatch {run.serial}"
        if key not in self.entries:
            self.entries[key] = self.asm.label(f"dispatch_{run.serial}")
            self.called.append(key)
            self.dispatches[key] = run
        self.calls.setdefault(owner, []).append(key)
        return self.entries[key]

    def _emit_dispatch(self, key: str, run) -> None:
        """R2 (a key's value, CALLS + the index of a jump in run.calls) -> that jump:
        CONTINUE if its chain returned to a -j, RUN_RETURN to a -g, or the verdict.
        A binary search over the indexes; each chain inlined at its leaf."""
        asm = self.asm
        start = len(asm.items)
        asm.place(self.entries[key])
        # R7: the case; R8: a template's instance
        asm.emit(BPF_MOV64_REG(R6, R1),
                 BPF_MOV64_REG(R7, R2), BPF_ALU64_IMM(I.BPF_AND, R7, MAX_CASE),
                 BPF_MOV64_REG(R8, R2), BPF_ALU64_IMM(I.BPF_RSH, R8, CASE_BITS))
        drop, returned, goto_returned = asm.label("drop"), asm.label("return"), asm.label("gone")

        def search(lo: int, hi: int) -> None:
            while hi - lo > 1:
                mid, upper = (lo + hi) // 2, asm.label("upper")
                asm.emit(BPF_JMP_IMM(I.BPF_JGE, R7, CALLS + mid, upper))
                search(lo, mid)
                asm.place(upper)
                lo = mid
            target = run.calls[lo]
            if isinstance(target, TemplateCase):
                self._emit_template_call(target.index, key,
                                         goto_returned if target.goto else returned,
                                         _InRegister(R8))
                return
            self._emit_jump(target.chain, key, returned if isinstance(target, Jump)
                            else goto_returned, drop, _SUBPROG_KEY_FP, inline=True)
        search(0, len(run.calls))
        asm.place(returned)
        asm.emit(BPF_MOV64_IMM(R0, CONTINUE), BPF_EXIT_INSN())
        asm.place(goto_returned)
        asm.emit(BPF_MOV64_IMM(R0, RUN_RETURN), BPF_EXIT_INSN())
        asm.place(drop)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        self.size[key] = len(asm.items) - start

    def _emit_lookups(self, tuples, key_fp: int, decide, floor: bool = False,
                      floored: bool = False) -> None:
        """R7/R8 = the smallest (entry, verdict) over the tuples' lookups, then to
        `decide`. R9 holds the packet's l4 bit, and in a run of jumps (`floored`) the
        entry past which to look above it, heeded with `floor` (_emit_rounds). The
        counter's key (key_fp) is the filters' scratch."""
        asm = self.asm
        layout, key = classifier.KEYS[self.table.family], self.lookup_key
        asm.emit(BPF_MOV32_IMM(R7, INF), BPF_MOV64_IMM(R8, 0))
        for t in tuples:
            missed = asm.label("miss")
            classifier.emit_key(asm, layout, key, t.tid, t.masks, l4_bit_only=floored)
            classifier.emit_filter_check(asm, layout, key, key_fp, t, missed)
            asm.emit(BPF_LD_MAP_FD(R1, CLASSIFIER),
                     BPF_MOV64_REG(R2, R6), BPF_ALU64_IMM(I.BPF_ADD, R2, key),
                     BPF_EMIT_CALL(I.BPF_FUNC_map_lookup_elem),
                     BPF_JMP_IMM(I.BPF_JEQ, R0, 0, missed),
                     BPF_LDX_MEM(BPF_W, R1, R0, 0),
                     BPF_JMP_REG(I.BPF_JGE, R1, R7, missed))
            if floor:
                asm.emit(BPF_MOV64_REG(R2, R9), BPF_ALU64_IMM(I.BPF_RSH, R2, 1),
                         BPF_JMP_REG(I.BPF_JLT, R1, R2, missed))
            asm.emit(BPF_MOV64_REG(R7, R1),
                     BPF_LDX_MEM(BPF_W, R8, R0, 4))
            asm.place(missed)
        asm.emit(BPF_JMP_A(decide))

    def _emit_count(self, entry: int, key_fp: int, entry_in_register: bool = False) -> None:
        """Count the packet for `entry`, an entry index or (entry_in_register) the
        register holding one."""
        asm = self.asm
        skip = asm.label("uncounted")
        asm.emit(
            BPF_STX_MEM(BPF_W, FP, entry, key_fp) if entry_in_register
            else BPF_ST_MEM(BPF_W, FP, key_fp, entry),
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
        if self.trace_size is not None:
            trace.emit_call(asm, key_fp, self.trace_size)
