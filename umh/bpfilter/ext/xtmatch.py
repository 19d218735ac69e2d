"""Matches and targets the kernel runs itself: its own x_tables extension, through
bpfilter.ko.

Some matches are state the kernel keeps and shows elsewhere: recent's address lists
(/proc/net/xt_recent/NAME, which the administrator reads and writes, and which the
rules of every table of the namespace share by name), nfacct's objects (nfnetlink's
accounting). A copy in BPF maps would be another list, not the kernel's. So for such
a rule bpfilter.ko makes what ip_tables makes (kmod/xtmatch.c): the extension found by
(family, name, revision), the payload checked and set up by its checkentry in the
rule's namespace, table and hooks, an instance the programs name when they call
bpfilter_xt_match() to run its ->match. What checkentry refuses, the kernel's errno
refuses, naming the rule. Without the module (`bpfilter serve`) such a table is
refused.

An extension is only run this way when its ->match needs nothing more than what the
table walk gives it (the packet, the hook state, the fragment and transport offsets),
and does not write the packet.

Targets that write the packet or its conntrack template (TOS, TTL, TCPMSS, CT, ...)
are the kernel's own the same way (bpfilter_xt_target()): what they write, checksums
included, is what ip_tables' rule writes, because it is the same function. A target
either goes on with the next rule (XT_CONTINUE) or ends the walk with its verdict.
What the prologue read once and the target changes is read again after it (the
packet's length), or kept as the target left it (TTL's arithmetic, ttl.py); a table
reading facts a target leaves stale otherwise (`stale`) is refused.

Lifetimes, as the kernel's: every load of a table makes its instances afresh (the
kernel's replace runs every checkentry of the new table before the old table's
destroy, so recent's lists carry over, being found by name), the instance numbers in
an INSTANCES map the programs read (key: match_key()). That map outlives the load:
the table's generation (store.py) pins it and gives the instances back when it goes;
a load that never got that far gives them back itself (HeldInstances.release), and a
helper that died in between leaves them to the next one, which gives back every
instance no pinned generation names (release_unnamed) before it serves.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import ClassVar, Optional

from ..bpf import insn as I
from ..bpf import syscall as bpf
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU64_IMM, BPF_CALL_KFUNC, BPF_DW, BPF_EXIT_INSN, BPF_JMP32_IMM,
                        BPF_JMP_IMM, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_STX_MEM,
                        BPF_W, Kfunc, MapRef, R0, R1, R2, R3, R6)
from ..errors import BpfilterError
from ..model import ExtensionTarget, Match, Table
from ..packet import facts
from ..packet.primitives import HOTDROP, MISMATCH, emit_skip_if_decided, emit_state_lookup
from .. import kmodule, netns, proto
from . import (MODULE, MatchExtension, TargetExtension, match_key, missing_kfunc, register_match,
               register_target)
from .reject import NF_STATE

XT_MATCH_KFUNC = Kfunc("bpfilter_xt_match", MODULE)
XT_TARGET_KFUNC = Kfunc("bpfilter_xt_target", MODULE)
XT_CONTINUE = 0xFFFFFFFF
NF_DROP, NF_ACCEPT = 0, 1
INSTANCES = MapRef("xt_instances")
INSTANCES_SUFFIX = "_xt"   # its kernel name, after its table's
# key: match_key() of the rule's match; value: its instance number
KEY, VALUE = struct.Struct("<Q"), struct.Struct("<I")
PIN = "xt_instances"    # its name in a generation's directory

_KEY = facts.reserve("xt_match", KEY.size)


@dataclass(frozen=True)
class KernelMatchModel(Match):
    """What a kernel match is to bpfilter: the payload the kernel checks, and the
    hooks the rule is reachable from, which its check takes too. The extension's model
    adds what its listing shows."""
    payload: bytes
    hook_mask: int


class KernelMatch(MatchExtension):
    """An extension whose ->match bpfilter.ko runs (see the module's docstring). A
    subclass gives its payload's struct, decode_fields() (the model's other fields,
    and what checkentry refuses that is worth a message of our own: the kernel's
    check runs anyway) and describe()."""

    model: ClassVar[type]
    facts = frozenset({"skb", "nf_state", "xt_match"})
    # why the kernel's own: the refusal without the module says it
    why: ClassVar[str] = "whose state the kernel keeps"
    runs_in = XT_MATCH_KFUNC

    def decode_fields(self, payload: bytes, where: str) -> dict:
        raise NotImplementedError

    def decode_in(self, payload: bytes, where: str, hook_mask: int):
        return self.model(revision=self.revision, payload=payload, hook_mask=hook_mask,
                          **self.decode_fields(payload, where))

    def unsupported(self, match: KernelMatchModel) -> Optional[str]:
        missing = missing_kfunc(XT_MATCH_KFUNC)
        if missing:
            return (f"needs bpfilter.ko (kernel module mode): it is the kernel's own "
                    f"xt_{self.name}, {self.why} ({missing})")
        return None

    def after_call(self, match: KernelMatchModel, asm) -> None:
        """After the extension's ->match ran (R0, its answer, kept): what it changed of
        the facts, as it left it."""

    def emit(self, match: KernelMatchModel, asm, out) -> None:
        """bpfilter_xt_match() on the rule's instance if every earlier test of the rule
        held (the kernel stops at the first that fails, and recent's --set must not
        see the packet then); its answer is the rule's outcome bits. No instance (the
        loader makes one for every such match, so never): the packet is dropped."""
        skip, found, decided = (asm.label("xt_skip"), asm.label("xt_found"),
                                asm.label("xt_decided"))
        out.hotdrops = True
        emit_skip_if_decided(asm, skip)
        emit_state_lookup(asm, INSTANCES, match_key(out.rule, match), _KEY)
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, found),
                 BPF_MOV64_IMM(R0, proto.XtVerdict.HOTDROP), BPF_JMP_IMM(I.BPF_JA, 0, 0, decided))
        asm.place(found)
        asm.emit(BPF_LDX_MEM(BPF_W, R3, R0, 0),
                 BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
                 BPF_CALL_KFUNC(XT_MATCH_KFUNC))
        self.after_call(match, asm)
        asm.place(decided)
        asm.emit(BPF_MOV64_REG(MISMATCH, R0), BPF_ALU64_IMM(I.BPF_AND, MISMATCH, 1),
                 BPF_MOV64_REG(HOTDROP, R0), BPF_ALU64_IMM(I.BPF_RSH, HOTDROP, 1))
        asm.place(skip)


class ServedKernelMatch(KernelMatch):
    """A kernel match bpfilter also runs in BPF when the module is not there: with
    bpfilter.ko the kernel's own (its state, its listing, the kernel's), without it
    (`bpfilter serve`) served(), a model of `served_model` whose code is emit_served()
    on the facts `served_facts`."""

    served_model: ClassVar[type]
    served_facts: ClassVar[frozenset] = frozenset()
    runs_in = None     # BPF runs it where the module does not
    model: ClassVar[type] = None    # PlainKernelMatch, set below

    def decode_fields(self, payload: bytes, where: str) -> dict:
        return dict(name=self.name, fields=_fields(self, payload))

    def fields_of(self, match) -> dict:
        """Either model's fields by name, for describe()."""
        return match.__dict__ if isinstance(match, self.served_model) else dict(match.fields)

    def served(self, payload: bytes, where: str) -> Match:
        """The payload decoded, with what the kernel's checkentry refuses refused."""
        raise NotImplementedError

    def served_unsupported(self, match) -> Optional[str]:
        return None

    def emit_served(self, match, asm, out) -> None:
        raise NotImplementedError

    def decode_in(self, payload: bytes, where: str, hook_mask: int):
        if missing_kfunc(XT_MATCH_KFUNC):
            return self.served(payload, where)
        return super().decode_in(payload, where, hook_mask)

    def unsupported(self, match) -> Optional[str]:
        if isinstance(match, self.served_model):
            return self.served_unsupported(match)
        return super().unsupported(match)

    def facts_of(self, match) -> frozenset[str]:
        return self.served_facts if isinstance(match, self.served_model) else self.facts

    def emit(self, match, asm, out) -> None:
        if isinstance(match, self.served_model):
            self.emit_served(match, asm, out)
        else:
            super().emit(match, asm, out)


@dataclass(frozen=True)
class KernelTargetModel(ExtensionTarget):
    """What a kernel target is to bpfilter: as KernelMatchModel, and its rule's entry
    up to it (the ip part and the matches), which its checkentry may look at."""
    payload: bytes
    hook_mask: int
    entry: bytes


# a rule's target's key among its matches' (match_key): past any match position
TARGET_POSITION = 0xFFFFFFFF


def target_key(rule) -> int:
    return rule.entry << 32 | TARGET_POSITION


class KernelTarget(TargetExtension):
    """A target whose ->target bpfilter.ko runs (see the module's docstring): as
    KernelMatch, and refresh() for the facts its write changes."""

    model: ClassVar[type]
    facts = frozenset({"skb", "nf_state", "xt_match"})
    why: ClassVar[str] = "which writes the packet"
    runs_in = XT_TARGET_KFUNC

    def decode_fields(self, payload: bytes, where: str) -> dict:
        raise NotImplementedError

    def decode_in(self, payload: bytes, ip, where: str, hook_mask: int, entry: bytes):
        return self.model(revision=self.revision, payload=payload, hook_mask=hook_mask,
                          entry=entry, **self.decode_fields(payload, where))

    def unsupported(self, target: KernelTargetModel) -> Optional[str]:
        missing = missing_kfunc(XT_TARGET_KFUNC)
        if missing:
            return (f"needs bpfilter.ko (kernel module mode): it is the kernel's own "
                    f"{self.name}, {self.why} ({missing})")
        return None

    def refresh(self, target: KernelTargetModel, asm) -> None:
        """After the target went on: what it changed of the facts the next rules read,
        as it left it. The packet's length (byte counters) is read again anyway."""

    def emit_rule(self, rule, target: KernelTargetModel, asm, next_rule) -> None:
        """bpfilter_xt_target() on the rule's instance: XT_CONTINUE goes on to the next
        rule, NF_ACCEPT accepts, anything else drops (a netfilter program returns only
        those two; the targets run here return nothing else). No instance: a drop."""
        found, accept, went_on = (asm.label("xt_target"), asm.label("xt_accept"),
                                  asm.label("xt_went_on"))
        emit_state_lookup(asm, INSTANCES, target_key(rule), _KEY)
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, found),
                 BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        asm.place(found)
        asm.emit(BPF_LDX_MEM(BPF_W, R3, R0, 0),
                 BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
                 BPF_CALL_KFUNC(XT_TARGET_KFUNC),
                 BPF_JMP32_IMM(I.BPF_JEQ, R0, XT_CONTINUE, went_on),
                 BPF_JMP32_IMM(I.BPF_JEQ, R0, NF_ACCEPT, accept),
                 BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())
        asm.place(accept)
        asm.emit(BPF_MOV64_IMM(R0, NF_ACCEPT), BPF_EXIT_INSN())
        asm.place(went_on)
        skb_len = Btf.vmlinux().member("sk_buff", "len")[0]
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_W, R1, R1, skb_len),
                 BPF_STX_MEM(BPF_W, R6, R1, facts.LEN))
        self.refresh(target, asm)


class ServedKernelTarget(KernelTarget):
    """A kernel target bpfilter also runs in BPF when the module is not there, as
    ServedKernelMatch: with bpfilter.ko the kernel's own, without it served(), a model
    of `served_model` whose code is emit_served() on the facts `served_facts`."""

    served_model: ClassVar[type]
    served_facts: ClassVar[frozenset] = frozenset()
    runs_in = None
    model: ClassVar[type] = None    # PlainKernelTarget, set below

    def decode_fields(self, payload: bytes, where: str) -> dict:
        return dict(name=self.name, fields=_fields(self, payload))

    def fields_of(self, target) -> dict:
        """Either model's fields by name, for describe()."""
        return target.__dict__ if isinstance(target, self.served_model) else dict(target.fields)

    def served(self, payload: bytes, ip, where: str) -> ExtensionTarget:
        raise NotImplementedError

    def emit_served(self, target, asm, next_rule) -> None:
        raise NotImplementedError

    def decode_in(self, payload: bytes, ip, where: str, hook_mask: int, entry: bytes):
        if missing_kfunc(XT_TARGET_KFUNC):
            return self.served(payload, ip, where)
        return super().decode_in(payload, ip, where, hook_mask, entry)

    def unsupported(self, target) -> Optional[str]:
        if isinstance(target, self.served_model):
            return None
        return super().unsupported(target)

    def facts_of(self, target) -> frozenset[str]:
        return self.served_facts if isinstance(target, self.served_model) else self.facts

    def emit_rule(self, rule, target, asm, next_rule) -> None:
        if isinstance(target, self.served_model):
            self.emit_served(target, asm, next_rule)
        else:
            super().emit_rule(rule, target, asm, next_rule)


def c_string(field: bytes) -> str:
    """A name field of a payload, as the kernel reads it: up to its first NUL."""
    return field.split(b"\0", 1)[0].decode("latin-1")


def _kernel_extensions(table: Table) -> dict[int, tuple[object, object]]:
    """match_key() or target_key() -> (rule, match or target) of every kernel match and
    target, in rule order. Two equal matches of one rule are one model (decode shares
    it), so one key: one instance serves both, which each run as the kernel runs its
    two (recent's list, nfacct's object, are found by name either way)."""
    found = {}
    for chain in table.chains.values():
        for rule in chain.rules:
            for m in rule.matches:
                if isinstance(m, KernelMatchModel):
                    found[match_key(rule, m)] = (rule, m)
            if isinstance(rule.target, KernelTargetModel):
                found[target_key(rule)] = (rule, rule.target)
    return found


class HeldInstances:
    """The instances one load of a table made, and the INSTANCES map naming them. The
    load owns them until its generation is pinned (store.py), then the generation."""

    def __init__(self, fd: int, cookie: int, instances: list[int], pinned: bool = False):
        self.fd, self.cookie, self.instances = fd, cookie, instances
        self.pinned = pinned   # a generation holds them (a twin's: its table's)

    def release(self) -> None:
        """Closes the map; gives the instances back unless a generation holds them."""
        try:
            if not self.pinned:
                kmodule.xt_match_destroy(self.cookie, self.instances)
        finally:
            os.close(self.fd)


def held_instances(table: Table, netns_path: Optional[str]) -> Optional[HeldInstances]:
    """The instances of every kernel match and target of `table` in the namespace at
    netns_path (the calling thread's if None), made in rule order as the kernel's
    translate_table() checks them; None if it has none. On failure (the first the
    kernel refuses), none."""
    found = _kernel_extensions(table)
    if not found:
        return None
    cookie = netns.cookie(netns_path)
    made: list[int] = []
    try:
        for rule, m in found.values():
            target = isinstance(m, KernelTargetModel)
            kind = "target" if target else "match"
            made.append(kmodule.xt_match_create(
                netns_path, int(table.family), m.name, m.revision, m.payload, table.name,
                m.hook_mask, rule.ip.proto, rule.ip.invert_proto,
                f"set up {kind} '{m.name}' of the rule at entry {rule.entry} (its checkentry)",
                m.entry if target else None))
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_HASH, KEY.size, VALUE.size, len(found),
                            f"{table.name}{INSTANCES_SUFFIX}")
        try:
            bpf.map_update_batch(fd, b"".join(map(KEY.pack, found)),
                                 b"".join(map(VALUE.pack, made)), len(found))
        except BaseException:
            os.close(fd)
            raise
    except BaseException as failure:
        try:
            kmodule.xt_match_destroy(cookie, made)
        except BpfilterError as err:
            # the caller needs the load's own error; what is left goes with the namespace
            failure.add_note(f"(and giving back its kernel matches failed: {err})")
        raise
    return HeldInstances(fd, cookie, made)


def pinned_instances(fd: int) -> list[int]:
    """The instance numbers a generation's pinned INSTANCES map names."""
    count = bpf.map_info(fd)["max_entries"]
    _, values = bpf.map_lookup_batch(fd, KEY.size, VALUE.size, count)
    return [v for (v,) in VALUE.iter_unpack(values)]


def release_unnamed(named: dict[int, set[int]]) -> int:
    """Destroys the module's instances that no pinned generation names (`named`: netns
    cookie -> instance numbers): what a helper that died left between making a load's
    instances and pinning them. Only while no load is under way. How many went."""
    orphans: dict[int, list[int]] = {}
    for cookie, instance in kmodule.xt_match_list():
        if instance not in named.get(cookie, ()):
            orphans.setdefault(cookie, []).append(instance)
    return sum(kmodule.xt_match_destroy(cookie, ids) for cookie, ids in orphans.items())


@dataclass(frozen=True)
class PlainKernelMatch(KernelMatchModel):
    """A kernel match whose model is its payload's fields as they are (plain_kernel_match)."""
    name: str
    revision: int
    fields: tuple = ()   # (field name, value) of the payload, in layout order


ServedKernelMatch.model = PlainKernelMatch


@dataclass(frozen=True)
class PlainKernelTarget(KernelTargetModel):
    """A kernel target whose model is its payload's fields as they are."""
    name: str
    revision: int
    fields: tuple = ()


ServedKernelTarget.model = PlainKernelTarget


def _fields(ext, payload: bytes) -> tuple:
    parsed = ext.struct.parse(payload) if ext.struct.sizeof() else {}
    return tuple((k, v) for k, v in parsed.items() if not k.startswith("_"))


def plain_kernel_extension(kind: str, name: str, struct, families, describe,
                           revisions=(0,), why: str = "", **restrictions) -> None:
    """Registers the kernel's own match or target (`kind`) `name`, for which
    bpfilter's model is its payload's fields: nothing of it is compiled, the kernel's
    checkentry judges it. `describe(fields dict) -> str` lists it; `restrictions`:
    the extension's proto, hooks, table, family_independent, facts, facts_of, stale,
    refresh (a target's), after_call (a match's)."""
    base, model = (KernelMatch, PlainKernelMatch) if kind == "match" else \
        (KernelTarget, PlainKernelTarget)
    register = register_match if kind == "match" else register_target
    for revision in revisions:
        body = dict(name=name, revision=revision, families=tuple(families), struct=struct,
                    model=model, **restrictions,
                    decode_fields=lambda self, payload, where: dict(
                        name=self.name, fields=_fields(self, payload)),
                    describe=lambda self, m: describe(dict(m.fields)))
        if why:
            body["why"] = why
        register(type(f"Kernel{kind.title()}_{name}_{revision}", (base,), body))
