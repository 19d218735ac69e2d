"""-m policy (struct xt_policy_info, revision 0, both families): the IPsec states a
packet was decapsulated by (--dir in: its sec_path, last first) or will be
encapsulated by (--dir out: its route's xfrm bundle), against up to four elements
(--reqid, --spi, --proto, --mode, --tunnel-src/-dst, each `!`-able), any of them
(or each in order with --strict), or none at all (--pol none), as policy_mt() has them.

With bpfilter.ko: the kernel's own (ext/xtmatch.py). Without it: the states are read
where the rule runs, with bpf_probe_read_kernel() at BTF offsets: the skb's sec_path
extension and its xvec, or skb_dst()'s xfrm and each xfrm_dst's child, at most
XFRM_MAX_DEPTH of them; --strict's inbound order is the fixed kernel's (the
element for the i-th state from the outside is pol[len - i - 1]).
"""
from __future__ import annotations

import errno
import functools
import ipaddress
from dataclasses import dataclass
from typing import Optional

from construct import Array, Bytes, Int8un, Int16un, Int32un, Padding, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf, BtfError
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_JMP_A,
                        BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_IMM64, BPF_LDX_MEM, BPF_MOV64_IMM,
                        BPF_MOV64_REG, BPF_W, R0, R1, R2, R3, R6, R7, R8, R9)
from ..errors import BpfilterError
from ..model import Family, Hook, Match
from ..packet import facts
from ..packet.primitives import emit_answer_and_hotdrop, emit_skip_if_decided
from . import BOTH_FAMILIES, missing_kfunc, register_match
from .kread import emit_read_pointer, emit_skb_ext_find, probe, skb_ext_offsets
from .xtmatch import XT_MATCH_KFUNC, ServedKernelMatch

XT_POLICY_MAX_ELEM = 4
XFRM_MAX_DEPTH = 6
XT_POLICY_MATCH_IN, XT_POLICY_MATCH_OUT = 1, 2
XT_POLICY_MATCH_NONE, XT_POLICY_MATCH_STRICT = 4, 8
# struct xt_policy_spec's bits
SADDR, DADDR, PROTO, MODE, SPI, REQID = 1, 2, 4, 8, 16, 32
SKB_DST_PTRMASK = ~1

_elem = Struct("saddr" / Bytes(16), "smask" / Bytes(16), "daddr" / Bytes(16),
               "dmask" / Bytes(16), "spi" / Int32un, "reqid" / Int32un, "proto" / Int8un,
               "mode" / Int8un, "match" / Int8un, "invert" / Int8un)
_INFO = Struct("pol" / Array(XT_POLICY_MAX_ELEM, _elem), "flags" / Int16un, "len" / Int16un,
               Padding(4))
# what the registry sizes the payload by (its parts: _INFO)
xt_policy_info = Struct("info" / Bytes(_INFO.sizeof()))

# the scratch of the walk: one state's fields, as match_xfrm_state() reads them
_REGION = facts.reserve("policy", 56)
S_SADDR, S_DADDR = _REGION, _REGION + 16
S_PROTO, S_MODE, S_SPI, S_REQID = _REGION + 32, _REGION + 33, _REGION + 36, _REGION + 40
_TMP = _REGION + 48


@dataclass(frozen=True)
class PolicyElem:
    saddr: bytes
    smask: bytes
    daddr: bytes
    dmask: bytes
    spi: int           # as the payload holds it (network order, read as a u32)
    reqid: int
    proto: int
    mode: int
    match: int
    invert: int


@dataclass(frozen=True)
class ServedPolicyMatch(Match):
    elements: tuple[PolicyElem, ...]
    flags: int
    name = "policy"
    revision = 0


@functools.lru_cache(maxsize=1)
def _offsets() -> dict[str, int]:
    try:
        b = Btf.vmlinux()
        skb_ext_offsets("SKB_EXT_SEC_PATH")
        return dict(
            sp_len=b.member("sec_path", "len")[0], sp_xvec=b.member("sec_path", "xvec")[0],
            refdst=b.member("sk_buff", "_skb_refdst")[0],
            dst_xfrm=b.member("dst_entry", "xfrm")[0], child=b.member("xfrm_dst", "child")[0],
            saddr=b.member("xfrm_state", "props.saddr")[0],
            daddr=b.member("xfrm_state", "id.daddr")[0],
            proto=b.member("xfrm_state", "id.proto")[0],
            spi=b.member("xfrm_state", "id.spi")[0],
            mode=b.member("xfrm_state", "props.mode")[0],
            reqid=b.member("xfrm_state", "props.reqid")[0])
    except BtfError as err:
        raise BpfilterError(errno.EOPNOTSUPP, f"policy needs IPsec's state in the kernel's BTF "
                                              f"({err}); the whole table is refused") from None


@register_match
class Policy(ServedKernelMatch):
    name = "policy"
    revision = 0
    families = BOTH_FAMILIES
    struct = xt_policy_info
    why = "which reads the packet's IPsec state"
    served_model = ServedPolicyMatch
    served_facts = frozenset({"skb", "policy"})

    def decode_in(self, payload: bytes, where: str, hook_mask: int):
        if not missing_kfunc(XT_MATCH_KFUNC):
            return super().decode_in(payload, where, hook_mask)
        p = _INFO.parse(payload)

        # policy_mt_check()
        def invalid(why: str):
            return BpfilterError(errno.EINVAL, f"{where}: policy: {why}")
        if not p.flags & (XT_POLICY_MATCH_IN | XT_POLICY_MATCH_OUT):
            raise invalid("neither incoming nor outgoing policy selected")
        inbound = (1 << Hook.PRE_ROUTING.value) | (1 << Hook.LOCAL_IN.value)
        outbound = (1 << Hook.POST_ROUTING.value) | (1 << Hook.LOCAL_OUT.value)
        if hook_mask & inbound and p.flags & XT_POLICY_MATCH_OUT:
            raise invalid("output policy not valid in PREROUTING and INPUT")
        if hook_mask & outbound and p.flags & XT_POLICY_MATCH_IN:
            raise invalid("input policy not valid in POSTROUTING and OUTPUT")
        if p.len > XT_POLICY_MAX_ELEM:
            raise invalid("too many policy elements")
        return ServedPolicyMatch(tuple(PolicyElem(**{k: v for k, v in e.items()
                                                     if not k.startswith("_")})
                                       for e in p.pol[:p.len]), p.flags)

    def served_unsupported(self, m) -> Optional[str]:
        _offsets()
        return None

    def describe(self, m) -> str:
        if not isinstance(m, ServedPolicyMatch):
            return "policy match"
        # libxt_policy's print_flags() and print_entry() with -n
        words = ["policy match dir", "in" if m.flags & XT_POLICY_MATCH_IN else "out",
                 "pol", "none" if m.flags & XT_POLICY_MATCH_NONE else "ipsec"]
        if m.flags & XT_POLICY_MATCH_STRICT:
            words.append("strict")
        for k, e in enumerate(m.elements):
            if len(m.elements) > 1:
                words.append(f"[{k}]")
            for bit, label, value in ((REQID, "reqid", str(e.reqid)),
                                      (SPI, "spi", f"0x{int.from_bytes(e.spi.to_bytes(4, 'little'), 'big'):x}"),
                                      (PROTO, "proto", str(e.proto)),
                                      (MODE, "mode", "tunnel" if e.mode else "transport")):
                if e.match & bit:
                    words += (["!"] if e.invert & bit else []) + [label, value]
            for bit, label, addr, mask in ((DADDR, "tunnel-dst", e.daddr, e.dmask),
                                           (SADDR, "tunnel-src", e.saddr, e.smask)):
                if e.match & bit:
                    words += (["!"] if e.invert & bit else []) + [label, f"{_net(addr, mask)}"]
        return " ".join(words)

    def emit_served(self, m: ServedPolicyMatch, asm, out) -> None:
        """policy_mt(): R9 = match_policy_in/out()'s answer (2 for its -1: no IPsec),
        then policy_mt()'s."""
        done, answered = asm.label("policy_done"), asm.label("policy_answered")
        o = _offsets()
        emit_skip_if_decided(asm, done)
        if m.flags & XT_POLICY_MATCH_IN:
            _emit_in(asm, m, self.family, o, answered)
        else:
            _emit_out(asm, m, self.family, o, answered)
        asm.place(answered)
        # (ret < 0: --pol none holds; else --pol none fails)
        none = bool(m.flags & XT_POLICY_MATCH_NONE)
        ipsec, final = asm.label("policy_ipsec"), asm.label("policy_final")
        asm.emit(BPF_JMP_IMM(I.BPF_JNE, R9, 2, ipsec), BPF_MOV64_IMM(R9, int(none)),
                 BPF_JMP_A(final))
        asm.place(ipsec)
        if none:
            asm.emit(BPF_MOV64_IMM(R9, 0))
        asm.place(final)
        emit_answer_and_hotdrop(asm, R9)
        asm.place(done)


def _net(addr: bytes, mask: bytes) -> str:
    if not any(addr[4:]) and not any(mask[4:]):
        return f"{ipaddress.IPv4Address(addr[:4])}/{ipaddress.IPv4Address(mask[:4])}"
    return f"{ipaddress.IPv6Address(addr)}/{ipaddress.IPv6Address(mask)}"


def _pointer_at(asm, base: int, off: int, missing, offset_reg: Optional[int] = None) -> None:
    """R3 = *(u64 *)(base + off (+ offset_reg)); to `missing` if unread or NULL."""
    asm.emit(BPF_MOV64_REG(R3, base), BPF_ALU64_IMM(I.BPF_ADD, R3, off))
    if offset_reg is not None:
        asm.emit(BPF_ALU64_REG(I.BPF_ADD, R3, offset_reg))
    emit_read_pointer(asm, _TMP, missing)


def _emit_read_state(asm, o: dict, state: int) -> None:
    """The fields of the xfrm_state at `state` (a register) into the scratch."""
    for field, dst, size in (("saddr", S_SADDR, 16), ("daddr", S_DADDR, 16),
                             ("proto", S_PROTO, 1), ("mode", S_MODE, 1), ("spi", S_SPI, 4),
                             ("reqid", S_REQID, 4)):
        asm.emit(BPF_MOV64_REG(R3, state), BPF_ALU64_IMM(I.BPF_ADD, R3, o[field]))
        probe(asm, dst, size)


def _emit_state_matches(asm, family: int, e: PolicyElem, differs) -> None:
    """match_xfrm_state(): to `differs` unless the scratch's state matches `e`."""
    width = 4 if family == Family.IPV4 else 16
    for bit, at, addr, mask in ((SADDR, S_SADDR, e.saddr, e.smask),
                                (DADDR, S_DADDR, e.daddr, e.dmask)):
        if not e.match & bit:
            continue
        # xt_addr_cmp(): equal under the mask, the invert bit flipping it
        asm.emit(BPF_MOV64_IMM(R2, 0))
        for w in range(0, width, 4):
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, at + w),
                     BPF_ALU64_IMM(I.BPF_XOR, R1, int.from_bytes(addr[w:w + 4], "little")),
                     *BPF_LD_IMM64(R3, int.from_bytes(mask[w:w + 4], "little")),
                     BPF_ALU64_REG(I.BPF_AND, R1, R3), BPF_ALU64_REG(I.BPF_OR, R2, R1))
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ if e.invert & bit else I.BPF_JNE, R2, 0, differs))
    for bit, at, size, value in ((PROTO, S_PROTO, BPF_B, e.proto), (MODE, S_MODE, BPF_B, e.mode),
                                 (SPI, S_SPI, BPF_W, e.spi), (REQID, S_REQID, BPF_W, e.reqid)):
        if e.match & bit:
            asm.emit(BPF_LDX_MEM(size, R1, R6, at), *BPF_LD_IMM64(R2, value),
                     BPF_JMP_REG(I.BPF_JEQ if e.invert & bit else I.BPF_JNE, R1, R2, differs))


def _emit_step(asm, m: ServedPolicyMatch, family: int, k: int, answered) -> None:
    """One state of the walk, the k-th (from the outside), read into the scratch:
    its element (pos), the answer where the kernel returns."""
    strict = bool(m.flags & XT_POLICY_MATCH_STRICT)
    pos = k if strict else 0
    if pos >= len(m.elements):
        asm.emit(BPF_MOV64_IMM(R9, 0), BPF_JMP_A(answered))
        return
    differs, next_ = asm.label("policy_differs"), asm.label("policy_next")
    _emit_state_matches(asm, family, m.elements[pos], differs)
    if not strict:
        asm.emit(BPF_MOV64_IMM(R9, 1), BPF_JMP_A(answered))
    else:
        asm.emit(BPF_JMP_A(next_))
    asm.place(differs)
    if strict:
        asm.emit(BPF_MOV64_IMM(R9, 0), BPF_JMP_A(answered))
    asm.place(next_)


def _emit_in(asm, m: ServedPolicyMatch, family: int, o: dict, answered) -> None:
    """match_policy_in(): R7 = the sec_path, R8 = its len."""
    strict = bool(m.flags & XT_POLICY_MATCH_STRICT)
    none, walked = asm.label("policy_no_sp"), asm.label("policy_walked")
    # skb_sec_path()
    asm.emit(BPF_LDX_MEM(BPF_DW, R7, R6, facts.SKB))
    emit_skb_ext_find(asm, R7, "SKB_EXT_SEC_PATH", S_SADDR, none)
    asm.emit(BPF_MOV64_REG(R7, R3), BPF_ALU64_IMM(I.BPF_ADD, R3, o["sp_len"]))
    probe(asm, _TMP, 4)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, none), BPF_LDX_MEM(BPF_W, R8, R6, _TMP))
    if strict:
        asm.emit(BPF_MOV64_IMM(R9, 0), BPF_JMP_IMM(I.BPF_JNE, R8, len(m.elements), answered))
    # for (i = sp->len - 1; i >= 0; i--): the k-th turn reads xvec[len - 1 - k]
    for k in range(XFRM_MAX_DEPTH):
        asm.emit(BPF_JMP_IMM(I.BPF_JLE, R8, k, walked),
                 BPF_MOV64_REG(R9, R8), BPF_ALU64_IMM(I.BPF_SUB, R9, 1 + k),
                 BPF_ALU64_IMM(I.BPF_LSH, R9, 3), BPF_ALU64_IMM(I.BPF_ADD, R9, o["sp_xvec"]))
        unread = asm.label("policy_unread")
        _pointer_at(asm, R7, 0, unread, offset_reg=R9)
        asm.emit(BPF_MOV64_REG(R9, R3))
        _emit_read_state(asm, o, R9)
        _emit_step(asm, m, family, k, answered)
        asm.place(unread)
    asm.place(walked)
    asm.emit(BPF_MOV64_IMM(R9, int(strict)), BPF_JMP_A(answered))
    asm.place(none)
    asm.emit(BPF_MOV64_IMM(R9, 2), BPF_JMP_A(answered))


def _emit_out(asm, m: ServedPolicyMatch, family: int, o: dict, answered) -> None:
    """match_policy_out(): R7 = the dst, R8 = its xfrm state."""
    strict = bool(m.flags & XT_POLICY_MATCH_STRICT)
    none, walked = asm.label("policy_no_xfrm"), asm.label("policy_walked")
    asm.emit(BPF_LDX_MEM(BPF_DW, R7, R6, facts.SKB), BPF_LDX_MEM(BPF_DW, R7, R7, o["refdst"]),
             BPF_ALU64_IMM(I.BPF_AND, R7, SKB_DST_PTRMASK), BPF_JMP_IMM(I.BPF_JEQ, R7, 0, none))
    _pointer_at(asm, R7, o["dst_xfrm"], none)
    # for (i = 0; dst && dst->xfrm; dst = xfrm_dst_child(dst), i++)
    for k in range(XFRM_MAX_DEPTH):
        if k:
            _pointer_at(asm, R7, o["child"], walked)
            asm.emit(BPF_MOV64_REG(R7, R3))
            _pointer_at(asm, R7, o["dst_xfrm"], walked)
        asm.emit(BPF_MOV64_REG(R8, R3), BPF_MOV64_IMM(R9, k + 1))
        _emit_read_state(asm, o, R8)
        _emit_step(asm, m, family, k, answered)
    asm.emit(BPF_MOV64_IMM(R9, XFRM_MAX_DEPTH + 1))
    asm.place(walked)
    # (R9: the states walked) return strict ? i == info->len : 0
    if strict:
        equal = asm.label("policy_all")
        asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R9, len(m.elements), equal),
                 BPF_MOV64_IMM(R9, 0), BPF_JMP_A(answered))
        asm.place(equal)
        asm.emit(BPF_MOV64_IMM(R9, 1), BPF_JMP_A(answered))
    else:
        asm.emit(BPF_MOV64_IMM(R9, 0), BPF_JMP_A(answered))
    asm.place(none)
    asm.emit(BPF_MOV64_IMM(R9, 2), BPF_JMP_A(answered))
