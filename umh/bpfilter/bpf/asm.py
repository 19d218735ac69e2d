"""An assembler with symbolic labels: code is emitted in order, labels are placed as
they are reached, and every reference is fixed up once the whole program is known.

Long rule sets make jumps that cannot be expressed in a 16-bit offset (the policy at
the end of a 100k-rule chain). Such jumps are relaxed: an unconditional one becomes
the 32-bit `gotol` (BPF_JMP32|BPF_JA), a conditional one an inverted short jump over
a `gotol`. Sizes change when that happens, so relaxation repeats until stable.
"""
from __future__ import annotations

from typing import Callable, Iterable, Union

from .. import memory
from . import insn as I
from .insn import Insn, Kfunc, Label, MapRef, Slot

S16 = 1 << 15
# The verifier rewrites code after we have placed it (it inlines map lookups, for
# instance), which lengthens jumps, and it refuses one that no longer fits 16 bits
# ("cannot be patched due to 16-bit range"). Relaxing every jump that spans more
# than half the 16-bit reach leaves room for the code between to double.
VERIFIER_HEADROOM_REACH = 1 << 14


# BPF_COMPLEXITY_LIMIT_INSNS: the most instructions a privileged program may have
MAX_INSNS = 1_000_000


class AsmError(Exception):
    pass


class TooLarge(AsmError):
    """The program passed MAX_INSNS: raised as it does, not once all is emitted."""


def _place_slots(ins: Insn, slots: "dict[str, int] | None") -> Insn:
    def offset(value):
        if not isinstance(value, Slot):
            return value
        if not slots or value.region not in slots:
            raise AsmError(f"fact region {value.region!r} is not in this program's layout")
        return slots[value.region] + value.offset
    return ins.with_(off=offset(ins.off), imm=offset(ins.imm))


class Assembler:
    def __init__(self, short_reach: int = VERIFIER_HEADROOM_REACH) -> None:
        """`short_reach`: the longest jump (in slots) kept as a 16-bit offset."""
        assert 0 < short_reach <= S16
        self.short = range(-short_reach, short_reach)
        self.items: list[Insn] = []
        self.labels: dict[Label, int] = {}
        self._counter = 0
        self._subprograms: dict[str, tuple[Label, Callable[[], None]]] = {}
        # after resolve(): (slot, name) of the main program and every subprogram, and
        # whether one is a callback (its loading then needs them declared in BTF)
        self.functions: list[tuple[int, str]] = []
        self.has_callbacks = False
        self._reserved_for = 0   # instructions the request's memory reservation covers

    def label(self, name: str) -> Label:
        self._counter += 1
        return Label(f"{name}.{self._counter}")

    def place(self, label: Label) -> None:
        if label in self.labels:
            raise AsmError(f"label {label} placed twice")
        self.labels[label] = len(self.items)

    def subprogram(self, name: str, emit: Callable[[], None]) -> Label:
        """The label of a subprogram (a callback, say) that `emit` writes once, when
        emit_subprograms() lays the subprograms out after the code: a program's
        subprograms must follow it, never sit inside another one's code."""
        if name not in self._subprograms:
            self._subprograms[name] = (self.label(name), emit)
        return self._subprograms[name][0]

    def emit_subprograms(self) -> None:
        """Lay out every subprogram asked for, those they ask for included."""
        done: set[str] = set()
        while len(done) < len(self._subprograms):
            for name, (label, emit) in list(self._subprograms.items()):
                if name not in done:
                    done.add(name)
                    self.place(label)
                    emit()

    def emit(self, *code: Union[Insn, Iterable[Insn]]) -> None:
        for item in code:
            if isinstance(item, Insn):
                self.items.append(item)
            else:
                self.items.extend(item)
        if len(self.items) > MAX_INSNS:
            raise TooLarge(f"more than {MAX_INSNS} instructions")
        while len(self.items) > self._reserved_for:
            # a program's instructions are what a request spends most on: reserved
            # as they come (ENOMEM past the caller's limit), not once all are there
            memory.spend_insns(memory.INSNS_PER_SPEND)
            self._reserved_for += memory.INSNS_PER_SPEND

    def __len__(self) -> int:
        return len(self.items)

    def assemble(self, map_fd: Callable[[MapRef], int] = None,
                 kfunc_id: Callable[[Kfunc], int] = None,
                 slots: "dict[str, int] | None" = None) -> bytes:
        """`slots`: where each region of packet facts the code names (a Slot as an
        offset or immediate) starts, for this program (packet.facts.layout)."""
        return b"".join(i.encode() for i in self.resolve(map_fd, kfunc_id, slots))

    def resolve(self, map_fd=None, kfunc_id=None, slots=None) -> list[Insn]:
        for label in self._referenced_labels():
            if label not in self.labels:
                raise AsmError(f"label {label} referenced but never placed")
        self._drop_unreachable()
        long_jumps: set[int] = set()
        while True:
            positions = self._positions(long_jumps)
            grown = {i for i, ins in enumerate(self.items)
                     if isinstance(ins.off, Label) and i not in long_jumps
                     and self._distance(i, ins.off, positions) not in self.short}
            if not grown:
                break
            long_jumps |= grown
        out: list[Insn] = []
        for i, ins in enumerate(self.items):
            if isinstance(ins.off, Slot) or isinstance(ins.imm, Slot):
                ins = _place_slots(ins, slots)
            out.extend(self._lower(i, ins, positions, i in long_jumps, map_fd, kfunc_id))
        targets = {ins.imm for ins in self.items if isinstance(ins.imm, Label)}
        self.functions = [(0, "main")] + sorted((positions[self.labels[label]], label.name)
                                                for label in targets)
        self.has_callbacks = any(isinstance(ins.imm, Label) and ins.op != I.BPF_CALL
                                 for ins in self.items)
        return out

    def _drop_unreachable(self) -> None:
        """The verifier refuses code no path reaches, and rule sets produce it
        naturally (the policy after an unconditional ACCEPT): keep only what is
        reachable from the entry and from the subprograms reachable calls enter."""
        items, start = self.items, {}
        for label, pos in self.labels.items():
            start.setdefault(pos, []).append(label)
        reachable = [False] * len(items)
        work = [0]
        while work:
            i = work.pop()
            if i >= len(items) or reachable[i]:
                continue
            reachable[i] = True
            ins = items[i]
            if ins.code == I.BPF_LD | I.BPF_DW | I.BPF_IMM:
                reachable[i + 1] = True
                work.append(i + 2)
                if isinstance(ins.imm, Label):   # a callback's address
                    work.append(self.labels[ins.imm])
                continue
            if isinstance(ins.imm, Label) and ins.op == I.BPF_CALL:
                work.append(self.labels[ins.imm])
            if isinstance(ins.off, Label):
                work.append(self.labels[ins.off])
            # (an ALU instruction's op may have their bits: BPF_MOD is BPF_EXIT's)
            if ins.klass in (I.BPF_JMP, I.BPF_JMP32) and \
                    (ins.op == I.BPF_EXIT or (ins.op == I.BPF_JA and ins.is_jump())):
                continue
            work.append(i + 1)
        if all(reachable):
            return
        kept, new_index = [], []
        for i, ins in enumerate(items):
            new_index.append(len(kept))
            if reachable[i]:
                kept.append(ins)
        new_index.append(len(kept))
        self.items = kept
        self.labels = {label: new_index[pos] for label, pos in self.labels.items()}

    def _referenced_labels(self):
        for ins in self.items:
            for ref in (ins.off, ins.imm):
                if isinstance(ref, Label):
                    yield ref

    def _positions(self, long_jumps: set[int]) -> list[int]:
        """Instruction slot of each item (and one past the end)."""
        positions, pos = [], 0
        for i, ins in enumerate(self.items):
            positions.append(pos)
            pos += self._size(ins) if i in long_jumps else 1
        positions.append(pos)
        return positions

    @staticmethod
    def _size(ins: Insn) -> int:
        if ins.op == I.BPF_JA:
            return 1
        return 3 if ins.op == I.BPF_JSET else 2

    def _distance(self, i: int, label: Label, positions: list[int]) -> int:
        return positions[self.labels[label]] - (positions[i] + 1)

    def _lower(self, i, ins, positions, long_jump, map_fd, kfunc_id) -> list[Insn]:
        if isinstance(ins.imm, MapRef):
            return [ins.with_(imm=map_fd(ins.imm))]
        if isinstance(ins.imm, Kfunc):
            # off: which fd_array entry holds the module's BTF (0: vmlinux's)
            btf_id, btf_fd_index = kfunc_id(ins.imm)
            return [ins.with_(imm=btf_id, off=btf_fd_index)]
        if isinstance(ins.imm, Label):  # bpf-to-bpf call, or a callback's address
            return [ins.with_(imm=self._distance(i, ins.imm, positions))]
        if not isinstance(ins.off, Label):
            return [ins]
        if not long_jump:
            return [ins.with_(off=self._distance(i, ins.off, positions))]
        if ins.op == I.BPF_JA:
            return [Insn(I.BPF_JMP32 | I.BPF_JA, imm=self._distance(i, ins.off, positions))]
        # the gotol is the last slot of the expansion, so its distance is measured from there
        size = self._size(ins)
        gotol = Insn(I.BPF_JMP32 | I.BPF_JA,
                     imm=positions[self.labels[ins.off]] - (positions[i] + size))
        if ins.op == I.BPF_JSET:
            return [ins.with_(off=1), I.BPF_JMP_A(1), gotol]
        inverse = (ins.code & ~0xF0) | I.INVERTED_JUMP[ins.op]
        return [ins.with_(code=inverse, off=1), gotol]
