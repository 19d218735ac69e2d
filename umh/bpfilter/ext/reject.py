"""-j REJECT --reject-with TYPE (struct ipt_reject_info, revision 0), and ip6tables'
REJECT (struct ip6t_reject_info: the same u32, read as enum ip6t_reject_with).

A netfilter BPF program can only answer NF_ACCEPT or NF_DROP: it cannot send the TCP
reset or ICMP error REJECT sends. bpfilter.ko registers a kfunc for netfilter
programs, bpfilter_reject(skb, state, with), that calls the kernel's own
nf_send_reset()/nf_send_unreach() exactly as ipt_REJECT's reject_tg() does; the
rule calls it and returns NF_DROP, as reject_tg() does. Without the module (the
kfunc is not in the kernel's BTF) the rule writes the packet and what the answer
depends on to the service's ring and drops; the service sends the answer the kernel
would (answers.py). Where no service drains a ring (a bare load), the table is
refused: dropping silently instead would be a different firewall (peers time out
instead of failing fast).

The kfunc reads `with` by the hook's family (state->pf), as ipt_REJECT and ip6t_REJECT
are two targets: the IPv6 class differs only in its names and its checkentry.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from functools import lru_cache

from construct import Int32un, Struct

from .. import klog as K
from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_CALL_KFUNC, BPF_DW,
                        BPF_EXIT_INSN, BPF_LDX_MEM, BPF_MOV64_IMM, BPF_ST_MEM, BPF_STX_MEM, BPF_W,
                        R0, R1, R2, R3, R6, R7, R8, Kfunc)
from ..packet import facts
from ..errors import BpfilterError
from ..model import ExtensionTarget, Family, Hook, Ip6Header, IpHeader
from ..netfilter import NF_DROP
from . import MODULE, TargetExtension, missing_kfunc, register_target
from .ring import emit_record
from .tcp import IPPROTO_TCP

# enum ipt_reject_with, and what iptables calls each
REJECT_WITH = {
    0: "icmp-net-unreachable",
    1: "icmp-host-unreachable",
    2: "icmp-proto-unreachable",
    3: "icmp-port-unreachable",
    4: "echo-reply",
    5: "icmp-net-prohibited",
    6: "icmp-host-prohibited",
    7: "tcp-reset",
    8: "icmp-admin-prohibited",
}
IPT_ICMP_ECHOREPLY, IPT_TCP_RESET = 4, 7

# enum ip6t_reject_with, and what libip6t_REJECT prints for each: it has no name for
# IP6T_ICMP6_NOT_NEIGHBOUR (2), and glibc's printf prints its NULL as "(null)"
REJECT6_WITH = {
    0: "icmp6-no-route",
    1: "icmp6-adm-prohibited",
    2: "(null)",
    3: "icmp6-addr-unreachable",
    4: "icmp6-port-unreachable",
    5: "echo-reply",
    6: "tcp-reset",
    7: "icmp6-policy-fail",
    8: "icmp6-reject-route",
}
IP6T_ICMP6_ECHOREPLY, IP6T_TCP_RESET = 5, 6

REJECT_KFUNC = Kfunc("bpfilter_reject", MODULE)

ipt_reject_info = Struct("with_" / Int32un)

# The "nf_state" fact group: the hook state pointer (R8 in the prologue), which the
# kfunc needs beside the skb and which user chains (subprograms) cannot get otherwise.
NF_STATE = facts.reserve("nf_state", 8)


def _emit_nf_state(asm, k: facts.KernelOffsets) -> None:
    asm.emit(BPF_STX_MEM(BPF_DW, R6, R8, NF_STATE))


facts.OPTIONAL["nf_state"] = _emit_nf_state


@dataclass(frozen=True)
class RejectTarget(ExtensionTarget):
    with_: int
    name = "REJECT"
    revision = 0


@register_target
class Reject(TargetExtension):
    name = "REJECT"
    struct = ipt_reject_info
    table = "filter"
    hooks = (1 << Hook.LOCAL_IN.value) | (1 << Hook.FORWARD.value) | (1 << Hook.LOCAL_OUT.value)
    facts = frozenset({"skb", "nf_state"})
    names = REJECT_WITH

    def decode(self, payload: bytes, ip: IpHeader, where: str) -> RejectTarget:
        (with_,) = self.packed.unpack_from(payload)
        # reject_tg_check()
        if with_ == IPT_ICMP_ECHOREPLY:
            raise BpfilterError(errno.EINVAL, f"{where}: REJECT: --reject-with echo-reply is "
                                              "no longer supported by the kernel")
        if with_ == IPT_TCP_RESET and (ip.proto != IPPROTO_TCP or ip.invert_proto):
            raise BpfilterError(errno.EINVAL, f"{where}: REJECT: --reject-with tcp-reset is "
                                              "only valid with -p tcp")
        return RejectTarget(with_)

    def describe(self, target: RejectTarget) -> str:
        answer = self.names.get(target.with_, f"{target.with_}")
        return f"reject-with {answer}"

    def emit(self, target: RejectTarget, asm, next_rule) -> None:
        if missing_kfunc(REJECT_KFUNC):
            self._emit_served(target, asm)
            return
        # the kfunc does what reject_tg() or reject_tg6() does for `with` (a value
        # neither knows sends nothing), and the rule drops as they do
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB),
                 BPF_LDX_MEM(BPF_DW, R2, R6, NF_STATE),
                 BPF_MOV64_IMM(R3, target.with_),
                 BPF_CALL_KFUNC(REJECT_KFUNC),
                 BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())


    def _emit_served(self, target: RejectTarget, asm) -> None:
        """Without bpfilter.ko: the packet and what the kernel's answer depends on go
        to the service's ring (the record LOG writes, of ANSWER_CLASSES), whose
        drain sends the answer (answers.py); the rule drops, as reject_tg() does."""
        o = _offsets()

        def header(asm) -> None:
            asm.emit(BPF_ST_MEM(BPF_B, R7, K.R_LEVEL, K.REJECT_RECORD),
                     BPF_ST_MEM(BPF_B, R7, K.R_LOGFLAGS, target.with_),
                     BPF_LDX_MEM(BPF_DW, R1, R6, NF_STATE),
                     BPF_LDX_MEM(BPF_B, R1, R1, o.state_hook),
                     BPF_STX_MEM(BPF_B, R7, R1, K.R_HOOK),
                     BPF_LDX_MEM(BPF_DW, R2, R6, facts.SKB))
            for (bit, width), field in ((o.skb_ip_summed, K.R_IP_SUMMED),
                                        (o.skb_csum_valid, K.R_CSUM_VALID),
                                        (o.skb_pkt_type, K.R_PKT_TYPE)):
                byte, shift = divmod(bit, 8)
                asm.emit(BPF_LDX_MEM(BPF_B, R1, R2, byte))
                if shift:
                    asm.emit(BPF_ALU64_IMM(I.BPF_RSH, R1, shift))
                asm.emit(BPF_ALU64_IMM(I.BPF_AND, R1, (1 << width) - 1),
                         BPF_STX_MEM(BPF_B, R7, R1, field))
            asm.emit(BPF_LDX_MEM(BPF_W, R1, R2, o.skb_csum),
                     BPF_STX_MEM(BPF_W, R7, R1, K.R_CSUM),
                     BPF_LDX_MEM(BPF_DW, R1, R2, o.skb_data),
                     BPF_LDX_MEM(BPF_DW, R3, R2, o.skb_head),
                     BPF_ALU64_REG(I.BPF_SUB, R1, R3),
                     BPF_STX_MEM(BPF_W, R7, R1, K.R_HEADROOM))

        emit_record(asm, self.family, K.ANSWER_REFS, K.ANSWER_CLASSES[self.family], header)
        asm.emit(BPF_MOV64_IMM(R0, NF_DROP), BPF_EXIT_INSN())


@register_target
class Reject6(Reject):
    families = (Family.IPV6,)
    names = REJECT6_WITH

    def decode(self, payload: bytes, ip: Ip6Header, where: str) -> RejectTarget:
        (with_,) = self.packed.unpack_from(payload)
        # reject_tg6_check(): IPv6 rules say whether -p was given (IP6T_F_PROTO), and
        # tcp-reset wants it given, as tcp, without `!`
        if with_ == IP6T_ICMP6_ECHOREPLY:
            raise BpfilterError(errno.EINVAL, f"{where}: REJECT: --reject-with echo-reply is "
                                              "not supported by the kernel")
        if with_ == IP6T_TCP_RESET and (not ip.proto_given or ip.proto != IPPROTO_TCP
                                        or ip.invert_proto):
            raise BpfilterError(errno.EINVAL, f"{where}: REJECT: --reject-with tcp-reset is "
                                              "only valid with -p tcp")
        return RejectTarget(with_)

@dataclass(frozen=True)
class _Offsets:
    state_hook: int
    skb_ip_summed: "tuple[int, int]"     # (bit offset, width)
    skb_csum_valid: "tuple[int, int]"
    skb_pkt_type: "tuple[int, int]"
    skb_csum: int
    skb_data: int
    skb_head: int


@lru_cache(maxsize=1)
def _offsets() -> _Offsets:
    btf = Btf.vmlinux()
    return _Offsets(
        state_hook=btf.member("nf_hook_state", "hook")[0],
        skb_ip_summed=btf.bitfield("sk_buff", "ip_summed"),
        skb_csum_valid=btf.bitfield("sk_buff", "csum_valid"),
        skb_pkt_type=btf.bitfield("sk_buff", "pkt_type"),
        skb_csum=btf.member("sk_buff", "csum")[0],
        skb_data=btf.member("sk_buff", "data")[0],
        skb_head=btf.member("sk_buff", "head")[0],
    )
