"""-j REJECT --reject-with TYPE (struct ipt_reject_info, revision 0).

A netfilter BPF program can only answer NF_ACCEPT or NF_DROP: it cannot send the TCP
reset or ICMP error REJECT sends (nf_send_reset()/nf_send_unreach()). Dropping
silently instead would be a different firewall (peers time out instead of failing
fast), so REJECT is decoded and checked as the kernel checks it, then refused: it
needs kfuncs that bpfilter.ko would register (see README, "Targets").
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Int32un, Struct

from ..errors import BpfilterError
from ..model import ExtensionTarget, IpHeader
from . import TargetExtension, register_target
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

ipt_reject_info = Struct("with_" / Int32un)


@dataclass(frozen=True)
class RejectTarget(ExtensionTarget):
    with_: int
    name = "REJECT"
    revision = 0


@register_target
class Reject(TargetExtension):
    name = "REJECT"
    struct = ipt_reject_info

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

    def unsupported(self, target: RejectTarget) -> str:
        answer = REJECT_WITH.get(target.with_, f"reject-with {target.with_}")
        return (f"needs bpfilter.ko (kernel module mode) to send its {answer} answer: a "
                "netfilter BPF program cannot, and dropping silently instead would change "
                "what peers see (bpfilter.ko does not register the kfuncs for it yet)")
