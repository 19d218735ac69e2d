"""-j LOG (struct xt_log_info, revision 0): --log-level, --log-prefix, and the
--log-tcp-sequence, --log-tcp-options, --log-ip-options, --log-macdecode flags; for
iptables and ip6tables (xt_LOG registers the same target, payload and checkentry
for both families).

With bpfilter.ko, the rule is the kernel's own xt_LOG, run by the module
(ext/xtmatch.py): the kernel prints the line (nf_log_packet(), its facility and
ratelimits, --log-uid included), as with ip_tables. Without it (`bpfilter serve`), the
rule copies what the kernel's log line is made of into the log ring, and the service
writes the line (klog.py) to /dev/kmsg; --log-uid's ids are those of the file behind
skb->sk, read as nf_log_dump_sk_uid_gid() reads them (the "logsk" fact group:
owner.py's walk, a request socket being no full socket here). Either way the packet goes on to the next rule,
as after the kernel's log_tg() (XT_CONTINUE).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

from construct import Bytes, Int8un, Struct

from .. import klog as K
from ..bpf.insn import BPF_B, BPF_DW, BPF_LDX_MEM, BPF_ST_MEM, BPF_STX_MEM, BPF_W, R1, R6, R7, R8
from ..packet import facts
from ..errors import BpfilterError
from ..model import ExtensionTarget, IpHeader
from . import BOTH_FAMILIES, TargetExtension, missing_kfunc, register_target
from .owner import emit_socket_creds
from .ring import _offsets, emit_record
from .xtmatch import XT_TARGET_KFUNC, KernelTarget, KernelTargetModel

PREFIX_SIZE = 30
LEVELS = 8

# --log-uid's facts, as owner.emit_socket_creds() lays them out
LOGSK = facts.reserve("logsk", 16)
LOGSK_FILE, LOGSK_FSUID, LOGSK_FSGID = LOGSK + 1, LOGSK + 4, LOGSK + 8
facts.OPTIONAL["logsk"] = lambda asm, k: emit_socket_creds(asm, LOGSK, via_listener=False)

xt_log_info = Struct(
    "level" / Int8un,
    "logflags" / Int8un,
    "prefix" / Bytes(PREFIX_SIZE),
)


@dataclass(frozen=True)
class LogTarget(ExtensionTarget):
    level: int
    logflags: int
    prefix: bytes      # up to the NUL
    name = "LOG"
    revision = 0


@dataclass(frozen=True)
class KernelLogTarget(KernelTargetModel):
    """LOG with bpfilter.ko: the kernel's own."""
    level: int
    logflags: int
    prefix: bytes
    name = "LOG"
    revision = 0


class _KernelLog(KernelTarget):
    """xt_LOG as bpfilter.ko runs it (Log hands it its rules when the module is there)."""
    name = "LOG"
    families = BOTH_FAMILIES
    struct = xt_log_info
    why = "which prints the line"


@register_target
class Log(TargetExtension):
    name = "LOG"
    families = BOTH_FAMILIES
    struct = xt_log_info
    facts = frozenset({"skb"})
    environment = tuple(K.LOG_REFS)

    def decode(self, payload: bytes, ip: IpHeader, where: str) -> LogTarget:
        level, logflags, prefix = self.packed.unpack_from(payload)
        # log_tg_check()
        if level >= LEVELS:
            raise BpfilterError(errno.EINVAL, f"{where}: LOG: level {level} is not below {LEVELS}")
        if prefix[-1]:
            raise BpfilterError(errno.EINVAL, f"{where}: LOG: the prefix is not NUL-terminated")
        return LogTarget(level, logflags, prefix.split(b"\0", 1)[0])

    def decode_in(self, payload: bytes, ip: IpHeader, where: str, hook_mask: int,
                  entry: bytes):
        target = self.decode(payload, ip, where)
        if missing_kfunc(XT_TARGET_KFUNC):
            return target
        return KernelLogTarget(payload=payload, hook_mask=hook_mask, entry=entry,
                               level=target.level, logflags=target.logflags,
                               prefix=target.prefix)

    def facts_of(self, target) -> frozenset[str]:
        if isinstance(target, KernelLogTarget):
            return _KernelLog.facts
        return self.facts | ({"logsk"} if target.logflags & K.XT_LOG_UID else set())

    def describe(self, target: LogTarget) -> str:
        prefix = f' prefix "{target.prefix.decode(errors="replace")}"' if target.prefix else ""
        return f"LOG flags {target.logflags} level {target.level}{prefix}"

    def emit_rule(self, rule, target, asm, next_rule) -> None:
        if isinstance(target, KernelLogTarget):
            _KERNEL_LOG[self.family].emit_rule(rule, target, asm, next_rule)
        else:
            self.emit(target, asm, next_rule)

    def emit(self, target: LogTarget, asm, next_rule) -> None:
        def header(asm) -> None:
            asm.emit(BPF_ST_MEM(BPF_B, R7, K.R_LEVEL, target.level),
                     BPF_ST_MEM(BPF_B, R7, K.R_LOGFLAGS, target.logflags))
            prefix = target.prefix.ljust(32, b"\0")
            for off in range(0, 32, 4):
                asm.emit(BPF_ST_MEM(BPF_W, R7, K.R_PREFIX + off,
                                    int.from_bytes(prefix[off:off + 4], "little")))
            if target.logflags & K.XT_LOG_UID:
                asm.emit(BPF_LDX_MEM(BPF_B, R1, R6, LOGSK_FILE),
                         BPF_STX_MEM(BPF_B, R7, R1, K.R_SK_IDS),
                         BPF_LDX_MEM(BPF_W, R1, R6, LOGSK_FSUID), BPF_STX_MEM(BPF_W, R7, R1, K.R_UID),
                         BPF_LDX_MEM(BPF_W, R1, R6, LOGSK_FSGID), BPF_STX_MEM(BPF_W, R7, R1, K.R_GID))

        emit_record(asm, self.family, K.LOG_REFS, K.CAPTURE_CLASSES[self.family], header)


def _emit_skb_facts(asm, k: facts.KernelOffsets) -> None:
    """The "skb" fact group: the skb itself (R7 in the prologue) and the netns inode."""
    o = _offsets()
    asm.emit(BPF_STX_MEM(BPF_DW, R6, R7, facts.SKB),
             BPF_LDX_MEM(BPF_DW, R1, R8, o.state_net),
             BPF_LDX_MEM(BPF_W, R1, R1, o.net_inum),
             BPF_STX_MEM(BPF_W, R6, R1, facts.NETNS))


facts.OPTIONAL["skb"] = _emit_skb_facts


_KERNEL_LOG = {family: _KernelLog(family) for family in BOTH_FAMILIES}
