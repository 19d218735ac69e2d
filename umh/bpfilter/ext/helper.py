"""-m helper (struct xt_helper_info, revision 0, both families): whether the packet's
connection was expected by a conntrack helper of that name (the helper of its master
connection), as helper_mt() compares it: the helper's name against the rule's, over
the helper name's length (a rule's "ftp-21" holds for the helper "ftp"); an empty
name holds for any helper; no master, or a master without a helper, fails (holds
with `!`).

With bpfilter.ko: the kernel's own (ext/xtmatch.py). Without it: the "cthelper" fact
group reads the master's helper's name once per packet (ctext.py's walk: nf_ct_get(),
ct->master, nfct_help(), help->helper, helper->name). helper_mt_check()'s side
effects: conntrack on in the namespace (the table reads conntrack), the name's last
byte cleared (which GET_ENTRIES shows).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from construct import Bytes, Int32sn, Padding, Struct

from ..abi.xtables import CHECKENTRY_WRITES
from ..bpf import insn as I
from ..bpf.insn import (BPF_ALU64_IMM, BPF_B, BPF_JMP_IMM, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_ST_MEM, R0, R1, R3, R6, R7)
from ..model import Match
from ..packet import facts
from . import BOTH_FAMILIES, register_match
from .ctext import conntrack_btf, emit_ext_find, emit_nf_ct_get
from .kread import emit_read_pointer, probe
from .xtmatch import ServedKernelMatch, c_string

NAME_SIZE = 30
xt_helper_info = Struct("invert" / Int32sn, "name" / Bytes(NAME_SIZE), Padding(2))
NF_CT_HELPER_NAME_LEN = 16

# the "cthelper" region: whether the master has a helper, then its name (the walk's
# scratch on the way)
_REGION = facts.reserve("cthelper", 8 + NF_CT_HELPER_NAME_LEN)
HELPER_PRESENT = _REGION
HELPER_NAME = _REGION + 8
facts.READ_CONNTRACK.add("cthelper")


@dataclass(frozen=True)
class HelperOffsets:
    master: int
    helper: int      # nf_conn_help->helper
    name: int        # nf_conntrack_helper->name


@functools.lru_cache(maxsize=1)
def _offsets() -> HelperOffsets:
    return conntrack_btf("helper needs conntrack's helper extension", lambda b: HelperOffsets(
        master=b.member("nf_conn", "master")[0],
        helper=b.member("nf_conn_help", "helper")[0],
        name=b.member("nf_conntrack_helper", "name")[0]))


def _read_helper(asm, k: facts.KernelOffsets) -> None:
    """The prologue's part (R7 = skb)."""
    o = _offsets()
    done = asm.label("cthelper_done")
    emit_nf_ct_get(asm, R7, done)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, o.master))
    emit_read_pointer(asm, HELPER_NAME, done)
    emit_ext_find(asm, "NF_CT_EXT_HELPER", HELPER_NAME, done)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, o.helper))
    emit_read_pointer(asm, HELPER_NAME, done)
    asm.emit(BPF_ALU64_IMM(I.BPF_ADD, R3, o.name))
    probe(asm, HELPER_NAME, NF_CT_HELPER_NAME_LEN)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, done), BPF_ST_MEM(BPF_B, R6, HELPER_PRESENT, 1))
    asm.place(done)


facts.OPTIONAL["cthelper"] = _read_helper


@dataclass(frozen=True)
class ServedHelperMatch(Match):
    invert: int
    helper: bytes      # the rule's name, NUL-padded to NAME_SIZE, its last byte cleared
    name = "helper"
    revision = 0


def _checked(payload: bytes) -> bytes:
    """helper_mt_check() clears the name's last byte."""
    return payload[:4 + NAME_SIZE - 1] + b"\0" + payload[4 + NAME_SIZE:]


CHECKENTRY_WRITES[("match", "helper", 0)] = _checked


@register_match
class Helper(ServedKernelMatch):
    name = "helper"
    revision = 0
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_helper_info
    why = "which reads what the kernel keeps beside the packet"
    served_model = ServedHelperMatch
    served_facts = frozenset({"cthelper"})

    def served(self, payload: bytes, where: str) -> ServedHelperMatch:
        p = self.struct.parse(_checked(payload))
        return ServedHelperMatch(p.invert, p.name)

    def served_unsupported(self, match) -> Optional[str]:
        _offsets()
        return None

    def describe(self, m) -> str:
        f = self.fields_of(m)
        name = f["helper"] if "helper" in f else f["name"]
        return f'helper match {"! " if f["invert"] else ""}"{c_string(name)}"'

    def emit_served(self, m: ServedHelperMatch, asm, out) -> None:
        """helper_mt(): R7 = whether the master's helper is the rule's (any, for an
        empty name), before `!` (a non-zero invert)."""
        done, holds = asm.label("helper_done"), asm.label("helper_holds")
        asm.emit(BPF_MOV64_IMM(R7, 0), BPF_LDX_MEM(BPF_B, R1, R6, HELPER_PRESENT),
                 BPF_JMP_IMM(I.BPF_JEQ, R1, 0, done))
        if m.helper[0]:
            # strncmp(helper->name, info->name, strlen(helper->name)) == 0
            for i in range(NF_CT_HELPER_NAME_LEN):
                asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, HELPER_NAME + i),
                         BPF_JMP_IMM(I.BPF_JEQ, R1, 0, holds),
                         BPF_JMP_IMM(I.BPF_JNE, R1, m.helper[i], done))
        asm.place(holds)
        asm.emit(BPF_MOV64_IMM(R7, 1))
        asm.place(done)
        asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R7, 0 if m.invert else 1))
        out.mismatch(R7)
