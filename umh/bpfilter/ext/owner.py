"""-m owner: --uid-owner, --gid-owner, --socket-exists (struct xt_owner_match_info, revision 1).

The kernel's owner_mt() looks at the packet's socket: skb_to_full_sk(skb), then the
file behind it and that file's credentials (fsuid, fsgid). The "owner" fact group
reads the same chain of pointers once per packet, with bpf_probe_read_kernel at BTF
offsets (a request socket stands for its listener, a time-wait socket for no socket,
as sk_to_full_sk() has it). --suppl-groups walks the file's supplementary groups
(cred->group_info) with a bpf_loop(), as owner_mt()'s loop, when the fsgid is not in
the range.
"""
from __future__ import annotations

import errno
import functools
from dataclasses import dataclass

from construct import Int8un, Int32un, Struct

from ..bpf import insn as I
from ..bpf.btf import Btf
from ..bpf.insn import (BPF_ALU64_IMM, BPF_ALU64_REG, BPF_B, BPF_DW, BPF_EMIT_CALL,
                        BPF_EXIT_INSN, BPF_JMP_A, BPF_JMP_IMM, BPF_JMP_REG, BPF_LD_FUNC,
                        BPF_LDX_MEM, BPF_MOV64_IMM, BPF_MOV64_REG, BPF_ST_MEM, BPF_STX_MEM, BPF_W,
                        FP, R0, R1, R2, R3, R4, R6, R7, R8)
from ..packet import facts
from ..packet.primitives import HOTDROP, MISMATCH, emit_outside
from ..errors import BpfilterError
from ..model import Hook, Match
from . import BOTH_FAMILIES, MatchExtension, register_match
from .kread import probe

XT_OWNER_UID, XT_OWNER_GID, XT_OWNER_SOCKET, XT_OWNER_SUPPL_GROUPS = 1, 2, 4, 8
XT_OWNER_MASK = 0x0F
INVALID_ID = 0xFFFFFFFF                 # (uid_t)-1: make_kuid() gives no valid id
TCP_TIME_WAIT, TCP_NEW_SYN_RECV = 6, 12

OWNER = facts.reserve("owner", 40)
# (emit_socket_creds()'s layout)
OWNER_SOCKET = OWNER        # u8: a full socket of this namespace, with a struct socket
OWNER_FILE = OWNER + 1      # u8: ... and a file behind it
OWNER_FSUID = OWNER + 4     # u32: the file's f_cred->fsuid
OWNER_FSGID = OWNER + 8     # u32: ... and fsgid
OWNER_GROUPS = OWNER + 16   # u64: ... and its group_info, NULL if none
# --suppl-groups' walk: the rule's gid range, the group read, what was found, and the
# rule's failures so far (kept over the bpf_loop() call)
_GID_MIN = OWNER + 24       # u32
_GID_MAX = OWNER + 28       # u32
_GROUP = OWNER + 32         # u32: gi->ngroups, then each gi->gid[i]
_IN_GROUPS = OWNER + 36     # u8
_FAILED = OWNER + 37        # u8

# Scratch in the main frame's slice buffer, free while the prologue reads the socket.
_SK = facts.SLICE_FP
_TMP = facts.SLICE_FP + 8


@dataclass(frozen=True)
class SockOffsets:
    skb_sk: int
    sk_state: int
    rsk_listener: int
    sk_net: int
    sk_socket: int
    socket_file: int
    file_cred: int
    fsuid: int
    fsgid: int
    group_info: int
    ngroups: int
    gid: int
    state_net: int

    @classmethod
    def from_btf(cls, btf: Btf) -> "SockOffsets":
        return cls(skb_sk=btf.member("sk_buff", "sk")[0],
                   sk_state=btf.member("sock", "__sk_common.skc_state")[0],
                   rsk_listener=btf.member("request_sock", "__req_common.skc_listener")[0],
                   sk_net=btf.member("sock", "__sk_common.skc_net")[0],
                   sk_socket=btf.member("sock", "sk_socket")[0],
                   socket_file=btf.member("socket", "file")[0],
                   file_cred=btf.member("file", "f_cred")[0],
                   fsuid=btf.member("cred", "fsuid")[0],
                   fsgid=btf.member("cred", "fsgid")[0],
                   group_info=btf.member("cred", "group_info")[0],
                   ngroups=btf.member("group_info", "ngroups")[0],
                   gid=btf.member("group_info", "gid")[0],
                   state_net=btf.member("nf_hook_state", "net")[0])


@functools.lru_cache(maxsize=1)
def sock_offsets() -> SockOffsets:
    return SockOffsets.from_btf(Btf.vmlinux())


def _read_pointer(asm, base_slot: int, field: int, gone) -> None:
    """*_TMP = *(u64 *)(*base_slot + field); to `gone` if that is NULL."""
    asm.emit(BPF_MOV64_REG(R1, FP), BPF_ALU64_IMM(I.BPF_ADD, R1, _TMP),
             BPF_MOV64_IMM(R2, 8),
             BPF_LDX_MEM(BPF_DW, R3, FP, base_slot), BPF_ALU64_IMM(I.BPF_ADD, R3, field),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
             BPF_LDX_MEM(BPF_DW, R1, FP, _TMP),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, gone))


def emit_socket_creds(asm, base: int, via_listener: bool, groups: bool = False) -> None:
    """The prologue's read (R7 = skb, R8 = the hook state) of skb->sk's credentials
    into the facts at `base`: u8 a full socket of this namespace with a struct socket,
    u8 and a file behind it, then the file's fsuid and fsgid (u32 at +4, +8), and with
    `groups` its group_info (u64 at +16). A
    request socket stands for its listener when `via_listener` (skb_to_full_sk(), as
    owner_mt() has it), else for no socket (sk_fullsock(), as the log's
    nf_log_dump_sk_uid_gid()); a time-wait socket for none either way."""
    o = sock_offsets()
    done, full = asm.label("sk_creds_done"), asm.label("sk_creds_full_sk")
    asm.emit(BPF_LDX_MEM(BPF_DW, R1, R7, o.skb_sk),
             BPF_JMP_IMM(I.BPF_JEQ, R1, 0, done),
             BPF_STX_MEM(BPF_DW, FP, R1, _SK))
    asm.emit(BPF_MOV64_REG(R1, FP), BPF_ALU64_IMM(I.BPF_ADD, R1, _TMP), BPF_MOV64_IMM(R2, 1),
             BPF_LDX_MEM(BPF_DW, R3, FP, _SK), BPF_ALU64_IMM(I.BPF_ADD, R3, o.sk_state),
             BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel),
             BPF_LDX_MEM(BPF_B, R1, FP, _TMP),
             BPF_JMP_IMM(I.BPF_JEQ, R1, TCP_TIME_WAIT, done),
             BPF_JMP_IMM(I.BPF_JNE, R1, TCP_NEW_SYN_RECV, full))
    if not via_listener:
        asm.emit(BPF_JMP_A(done))
    _read_pointer(asm, _SK, o.rsk_listener, done)
    asm.emit(BPF_STX_MEM(BPF_DW, FP, R1, _SK))
    asm.place(full)
    # a socket of another namespace counts as none
    _read_pointer(asm, _SK, o.sk_net, done)
    asm.emit(BPF_LDX_MEM(BPF_DW, R2, R8, o.state_net),
             BPF_JMP_REG(I.BPF_JNE, R1, R2, done))
    _read_pointer(asm, _SK, o.sk_socket, done)
    asm.emit(BPF_ST_MEM(BPF_B, R6, base, 1), BPF_STX_MEM(BPF_DW, FP, R1, _SK))
    _read_pointer(asm, _SK, o.socket_file, done)
    asm.emit(BPF_STX_MEM(BPF_DW, FP, R1, _SK))
    _read_pointer(asm, _SK, o.file_cred, done)
    asm.emit(BPF_ST_MEM(BPF_B, R6, base + 1, 1), BPF_STX_MEM(BPF_DW, FP, R1, _SK))
    for field, off in ((o.fsuid, base + 4), (o.fsgid, base + 8)):
        asm.emit(BPF_MOV64_REG(R1, R6), BPF_ALU64_IMM(I.BPF_ADD, R1, off), BPF_MOV64_IMM(R2, 4),
                 BPF_LDX_MEM(BPF_DW, R3, FP, _SK), BPF_ALU64_IMM(I.BPF_ADD, R3, field),
                 BPF_EMIT_CALL(I.BPF_FUNC_probe_read_kernel))
    if groups:
        _read_pointer(asm, _SK, o.group_info, done)
        asm.emit(BPF_STX_MEM(BPF_DW, R6, R1, base + 16))
    asm.place(done)


facts.OPTIONAL["owner"] = lambda asm, k: emit_socket_creds(asm, OWNER, via_listener=True,
                                                           groups=True)


def _emit_in_groups(asm, lo: int, hi: int) -> None:
    """R2 (1: the fsgid is outside [lo, hi]) cleared when one of the file's
    supplementary groups is inside, as owner_mt()'s loop over gi->gid[]; R1 kept."""
    o = sock_offsets()
    done = asm.label("owner_groups_done")
    walk = asm.subprogram("owner_groups_walk", lambda: _emit_group(asm, o))
    # a rule an earlier test failed needs no walk, which leaves its outcome (R4, R5) as
    # it was: nothing, which the call would not keep
    asm.emit(BPF_JMP_IMM(I.BPF_JEQ, R2, 0, done),
             BPF_MOV64_REG(R3, MISMATCH), BPF_ALU64_REG(I.BPF_OR, R3, HOTDROP),
             BPF_JMP_IMM(I.BPF_JNE, R3, 0, done),
             BPF_LDX_MEM(BPF_DW, R3, R6, OWNER_GROUPS), BPF_JMP_IMM(I.BPF_JEQ, R3, 0, done),
             BPF_STX_MEM(BPF_B, R6, R1, _FAILED),
             BPF_ST_MEM(BPF_W, R6, _GID_MIN, lo), BPF_ST_MEM(BPF_W, R6, _GID_MAX, hi),
             BPF_ST_MEM(BPF_B, R6, _IN_GROUPS, 0), BPF_ST_MEM(BPF_W, R6, _GROUP, 0),
             BPF_ALU64_IMM(I.BPF_ADD, R3, o.ngroups))
    probe(asm, _GROUP, 4)
    asm.emit(BPF_LDX_MEM(BPF_W, R1, R6, _GROUP), *BPF_LD_FUNC(R2, walk),
             BPF_MOV64_REG(R3, R6), BPF_MOV64_IMM(R4, 0), BPF_EMIT_CALL(I.BPF_FUNC_loop),
             BPF_LDX_MEM(BPF_B, R2, R6, _IN_GROUPS), BPF_ALU64_IMM(I.BPF_XOR, R2, 1),
             BPF_LDX_MEM(BPF_B, R1, R6, _FAILED),
             BPF_MOV64_IMM(MISMATCH, 0), BPF_MOV64_IMM(HOTDROP, 0))
    asm.place(done)


def _emit_group(asm, o: SockOffsets) -> None:
    """bpf_loop()'s callback (R1 = i, R2 = &facts): gi->gid[i] inside the range ends
    the walk."""
    go_on = asm.label("owner_group_next")
    asm.emit(BPF_MOV64_REG(R6, R2),
             BPF_LDX_MEM(BPF_DW, R3, R6, OWNER_GROUPS), BPF_ALU64_IMM(I.BPF_LSH, R1, 2),
             BPF_ALU64_REG(I.BPF_ADD, R3, R1), BPF_ALU64_IMM(I.BPF_ADD, R3, o.gid))
    probe(asm, _GROUP, 4)
    asm.emit(BPF_JMP_IMM(I.BPF_JNE, R0, 0, go_on),
             BPF_LDX_MEM(BPF_W, R1, R6, _GROUP),
             BPF_LDX_MEM(BPF_W, R2, R6, _GID_MIN), BPF_JMP_REG(I.BPF_JLT, R1, R2, go_on),
             BPF_LDX_MEM(BPF_W, R2, R6, _GID_MAX), BPF_JMP_REG(I.BPF_JGT, R1, R2, go_on),
             BPF_ST_MEM(BPF_B, R6, _IN_GROUPS, 1), BPF_MOV64_IMM(R0, 1), BPF_EXIT_INSN())
    asm.place(go_on)
    asm.emit(BPF_MOV64_IMM(R0, 0), BPF_EXIT_INSN())


@dataclass(frozen=True)
class OwnerMatch(Match):
    uid: tuple[int, int]
    gid: tuple[int, int]
    match: int
    invert: int
    name = "owner"
    revision = 1


@register_match
class Owner(MatchExtension):
    name = "owner"
    families = BOTH_FAMILIES
    revision = 1
    struct = Struct("uid_min" / Int32un, "uid_max" / Int32un, "gid_min" / Int32un,
                    "gid_max" / Int32un, "match" / Int8un, "invert" / Int8un)
    hooks = (1 << Hook.LOCAL_OUT) | (1 << Hook.POST_ROUTING)
    facts = frozenset({"owner"})

    def decode(self, payload: bytes, where: str) -> OwnerMatch:
        uid_min, uid_max, gid_min, gid_max, match, invert = self.packed.unpack_from(payload)
        for flag, lo, hi, what in ((XT_OWNER_UID, uid_min, uid_max, "uid"),
                                   (XT_OWNER_GID, gid_min, gid_max, "gid")):
            if match & flag and (INVALID_ID in (lo, hi) or hi < lo):
                raise BpfilterError(errno.EINVAL, f"{where}: owner: invalid {what} range "
                                                  f"{lo}-{hi}")
        sock_offsets()
        return OwnerMatch((uid_min, uid_max), (gid_min, gid_max), match & XT_OWNER_MASK,
                          invert & XT_OWNER_MASK)

    def frames(self, m: OwnerMatch) -> int:
        return 1 if m.match & XT_OWNER_GID and m.match & XT_OWNER_SUPPL_GROUPS else 0

    def emit(self, m: OwnerMatch, asm, out) -> None:
        """owner_mt(), its early returns folded: with a file the id tests decide;
        with a socket but no file, the flags alone; without a socket, likewise."""
        asm.emit(BPF_MOV64_IMM(R1, 0))
        for flag, (lo, hi), off in ((XT_OWNER_UID, m.uid, OWNER_FSUID),
                                    (XT_OWNER_GID, m.gid, OWNER_FSGID)):
            if m.match & flag:
                # fails when (id in range) == invert, i.e. outside != invert
                emit_outside(asm, R2, off, 4, lo, hi)
                if flag == XT_OWNER_GID and m.match & XT_OWNER_SUPPL_GROUPS:
                    _emit_in_groups(asm, lo, hi)
                if m.invert & flag:
                    asm.emit(BPF_ALU64_IMM(I.BPF_XOR, R2, 1))
                asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R2))
        asm.emit(BPF_LDX_MEM(BPF_B, R2, R6, OWNER_FILE), BPF_ALU64_REG(I.BPF_AND, R1, R2),
                 BPF_LDX_MEM(BPF_B, R3, R6, OWNER_SOCKET))
        differ = m.match ^ m.invert
        if differ & (XT_OWNER_UID | XT_OWNER_GID):       # a socket without a file fails
            asm.emit(BPF_MOV64_REG(R0, R2), BPF_ALU64_IMM(I.BPF_XOR, R0, 1),
                     BPF_ALU64_REG(I.BPF_AND, R0, R3), BPF_ALU64_REG(I.BPF_OR, R1, R0))
        if differ:                                        # no socket fails
            asm.emit(BPF_MOV64_REG(R0, R3), BPF_ALU64_IMM(I.BPF_XOR, R0, 1),
                     BPF_ALU64_REG(I.BPF_OR, R1, R0))
        if m.match & m.invert & XT_OWNER_SOCKET:          # ! --socket-exists with a socket
            asm.emit(BPF_ALU64_REG(I.BPF_OR, R1, R3))
        out.mismatch(R1)

    def describe(self, m: OwnerMatch) -> str:
        # libxt_owner's owner_mt_print(): the socket test first, each test's `!` before
        # its label
        parts = []
        for flag, label, ids in ((XT_OWNER_SOCKET, "owner socket exists", None),
                                 (XT_OWNER_UID, "owner UID match", m.uid),
                                 (XT_OWNER_GID, "owner GID match", m.gid),
                                 (XT_OWNER_SUPPL_GROUPS, "incl. suppl. groups", None)):
            if m.match & flag:
                text = label if ids is None else \
                    f"{label} {ids[0]}" + (f"-{ids[1]}" if ids[1] != ids[0] else "")
                parts.append(("! " if m.invert & flag else "") + text)
        return " ".join(parts)
