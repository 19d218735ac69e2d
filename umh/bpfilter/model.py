"""The neutral model of an iptables table: what the rules mean, not how the kernel
ABI spells them. The codec builds it, the compiler reads it; it knows nothing of
construct, cffi or BPF.

Counters live with the table entries they belong to: every rule, every built-in
chain's policy and every user chain's implicit RETURN is one entry, numbered as in
the blob iptables sent, so counters can be reported per entry exactly like the kernel.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union


class Family(enum.IntEnum):
    """Values are the kernel's NFPROTO_* numbers."""

    IPV4 = 2
    IPV6 = 10

    @property
    def addr_len(self) -> int:
        return 4 if self is Family.IPV4 else 16


class Hook(enum.IntEnum):
    """Values are the kernel's NF_INET_* hook numbers."""

    PRE_ROUTING = 0
    LOCAL_IN = 1
    FORWARD = 2
    LOCAL_OUT = 3
    POST_ROUTING = 4

    @property
    def chain_name(self) -> str:
        return _BUILTIN_CHAIN[self]

    @property
    def short_name(self) -> str:
        """Fits BPF's 15-character object names next to a prefix."""
        return _SHORT[self]


_BUILTIN_CHAIN = {
    Hook.PRE_ROUTING: "PREROUTING", Hook.LOCAL_IN: "INPUT", Hook.FORWARD: "FORWARD",
    Hook.LOCAL_OUT: "OUTPUT", Hook.POST_ROUTING: "POSTROUTING",
}


_SHORT = {
    Hook.PRE_ROUTING: "PRE", Hook.LOCAL_IN: "IN", Hook.FORWARD: "FWD", Hook.LOCAL_OUT: "OUT",
    Hook.POST_ROUTING: "POST",
}


class Verdict(enum.Enum):
    ACCEPT = "ACCEPT"
    DROP = "DROP"


# The ip part's values are NamedTuples: immutable, compared and hashed by value, and
# made at a fraction of a frozen dataclass's cost (decoding makes one of each per rule).
class Prefix(NamedTuple):
    """addr/mask as the kernel compares them: (packet & mask) != addr is a mismatch."""

    addr: bytes
    mask: bytes
    invert: bool = False

    @property
    def is_any(self) -> bool:
        return not any(self.mask) and not any(self.addr) and not self.invert


class Interface(NamedTuple):
    """A 16-byte interface name compared under a byte mask ("eth+" masks only "eth")."""

    name: bytes
    mask: bytes
    invert: bool = False

    @property
    def is_any(self) -> bool:
        return not any(self.mask) and not self.invert


class IpHeader(NamedTuple):
    """The part of every IPv4 rule that the kernel checks before any match (ipt_ip,
    ip_packet_match())."""

    src: Prefix
    dst: Prefix
    in_iface: Interface
    out_iface: Interface
    proto: int = 0           # 0: any protocol, the inversion flag is then ignored
    invert_proto: bool = False
    fragment: bool = False   # -f: only non-first fragments
    invert_fragment: bool = False


class Ip6Header(NamedTuple):
    """The part of every IPv6 rule that the kernel checks before any match (ip6t_ip6,
    ip6_packet_match()). Its first fields are IpHeader's: what extensions look at
    (the protocol) reads the same in both."""

    src: Prefix
    dst: Prefix
    in_iface: Interface
    out_iface: Interface
    proto: int = 0
    invert_proto: bool = False
    # -p given (IP6T_F_PROTO; `-p all` too): the packet's extension headers are walked
    # to its upper-layer protocol, which is compared; a chain that cannot be walked
    # drops the packet. Without it the protocol is not looked at.
    proto_given: bool = False


AnyIpHeader = Union[IpHeader, Ip6Header]


class Match:
    """Base of every extension match's model (one subclass per extension, in bpfilter.ext)."""

    name: str = ""
    revision: int = 0


class ExtensionTarget:
    """Base of the models of non-standard targets (REJECT, LOG, ...)."""

    name: str = ""
    revision: int = 0


@dataclass(frozen=True)
class Accept:
    pass


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class Return:
    pass


@dataclass(frozen=True)
class Fallthrough:
    """A rule without a target: it only counts."""


# A jump names its chain by the chain's key in Table.chains (Chain.key), not by its
# name: the kernel identifies chains by offset, and accepts two user chains of one
# name, or one named like a built-in chain.
@dataclass(frozen=True)
class Jump:
    chain: str


@dataclass(frozen=True)
class Goto:
    chain: str


@dataclass(frozen=True)
class Stray:
    """The jump of an entry no hook reaches to an offset where no user chain starts:
    the kernel checks only the jumps it can reach (mark_source_chains), so it
    accepts it; it never runs."""

    offset: int


Target = Union[Accept, Drop, Return, Fallthrough, Jump, Goto, Stray, ExtensionTarget]


@dataclass
class Rule:
    entry: int               # index of the entry in the table: its counter slot
    ip: AnyIpHeader
    matches: list[Match]
    target: Target
    # Whether a hook reaches the entry (its comefrom, as mark_source_chains leaves
    # it): an entry none reaches never runs, so it is compiled into nothing, and its
    # jumps are no edges of the call graph (they may loop, and the kernel allows it).
    reachable: bool = True
    # No match and an ip part all zero bytes, as the kernel's unconditional() tests:
    # with a verdict, ipt_do_table()'s trace names the entry its chain's end.
    unconditional: bool = False


@dataclass
class Chain:
    name: str
    rules: list[Rule] = field(default_factory=list)
    hook: Optional[Hook] = None         # set for built-in chains
    policy: Optional[Verdict] = None    # built-in chains only
    tail_entry: int = -1                # the policy entry, or a user chain's final RETURN
    key: str = ""                       # its key in Table.chains; its name unless taken

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    @property
    def builtin(self) -> bool:
        return self.hook is not None


@dataclass
class Table:
    name: str
    family: Family
    chains: dict[str, Chain]    # by Chain.key, in entry order
    num_entries: int

    def hook_chains(self) -> list[Chain]:
        return sorted((c for c in self.chains.values() if c.builtin), key=lambda c: c.hook)
