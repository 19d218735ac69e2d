"""Transparent proxying: -m socket (xt_socket.c, revisions 0 to 3: --transparent,
--nowildcard, --restore-skmark) and -j TPROXY (xt_TPROXY.c, revisions 0 and 1: --on-ip,
--on-port, --tproxy-mark; mangle PREROUTING, -p tcp or -p udp): the kernel's own, run by
bpfilter.ko (ext/xtmatch.py). The match finds the packet's local socket as the
kernel's socket lookup does, the target hands the packet to a transparent listener
(nf_tproxy_assign_sock) and marks it for `ip rule fwmark`; their checkentries turn on
the namespace's defragmentation, as with ip_tables.

--restore-skmark writes the socket's mark into the packet's, which the prologue read
once (the "mark" fact): after such a match the fact is read again, so that a later
`-m mark` sees what the kernel's would."""
from __future__ import annotations

from construct import Bytes, Int8un, Int32un, Padding, Struct

from ..bpf.btf import Btf
from ..bpf.insn import BPF_DW, BPF_LDX_MEM, BPF_STX_MEM, BPF_W, R1, R6
from ..model import Family, Hook
from ..packet import facts
from . import BOTH_FAMILIES
from .xtmatch import KernelMatch, plain_kernel_extension

XT_SOCKET_TRANSPARENT, XT_SOCKET_NOWILDCARD, XT_SOCKET_RESTORE_SKMARK = 1, 2, 4
_SOCKET_HOOKS = sum(1 << h.value for h in (Hook.PRE_ROUTING, Hook.LOCAL_IN))
_SOCKET_WORDS = ((XT_SOCKET_TRANSPARENT, "--transparent"), (XT_SOCKET_NOWILDCARD, "--nowildcard"),
                 (XT_SOCKET_RESTORE_SKMARK, "--restore-skmark"))
_READS = "which looks the packet's socket up"

xt_socket_mtinfo = Struct("flags" / Int8un)
xt_tproxy_target_info = Struct("mark_mask" / Int32un, "mark_value" / Int32un,
                               "laddr" / Bytes(4), "lport" / Bytes(2), Padding(2))
xt_tproxy_target_info_v1 = Struct("mark_mask" / Int32un, "mark_value" / Int32un,
                                  "laddr" / Bytes(16), "lport" / Bytes(2),
                                  Padding(2))


def _restores_mark(match) -> bool:
    return bool(dict(match.fields).get("flags", 0) & XT_SOCKET_RESTORE_SKMARK)


def _socket_facts(self, match) -> frozenset[str]:
    return KernelMatch.facts | {"mark"} if _restores_mark(match) else KernelMatch.facts


def _socket_after(self, match, asm) -> None:
    """socket_match() may have written skb->mark: the fact read again (R0 kept)."""
    if _restores_mark(match):
        mark = Btf.vmlinux().member("sk_buff", "mark")[0]
        asm.emit(BPF_LDX_MEM(BPF_DW, R1, R6, facts.SKB), BPF_LDX_MEM(BPF_W, R1, R1, mark),
                 BPF_STX_MEM(BPF_W, R6, R1, facts.MARK))


def _describe_socket(f: dict) -> str:
    return " ".join(["socket", *(word for bit, word in _SOCKET_WORDS
                                 if f.get("flags", 0) & bit)])


def _describe_tproxy(f: dict) -> str:
    port = int.from_bytes(f["lport"], "big")
    return f"TPROXY redirect to port {port} mark 0x{f['mark_value']:x}/0x{f['mark_mask']:x}"


plain_kernel_extension("match", "socket", Struct(), (Family.IPV4,), why=_READS,
                       hooks=_SOCKET_HOOKS, describe=_describe_socket)
plain_kernel_extension("match", "socket", xt_socket_mtinfo, BOTH_FAMILIES, revisions=(1, 2, 3),
                       why=_READS, hooks=_SOCKET_HOOKS, facts_of=_socket_facts,
                       after_call=_socket_after, describe=_describe_socket)
plain_kernel_extension("target", "TPROXY", xt_tproxy_target_info, (Family.IPV4,),
                       table="mangle", hooks=1 << Hook.PRE_ROUTING.value,
                       describe=_describe_tproxy)
plain_kernel_extension("target", "TPROXY", xt_tproxy_target_info_v1, BOTH_FAMILIES,
                       revisions=(1,), table="mangle", hooks=1 << Hook.PRE_ROUTING.value,
                       describe=_describe_tproxy)
