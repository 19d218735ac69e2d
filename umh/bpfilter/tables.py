"""The built-in tables, described as the kernel's iptable_*.c and ip6table_*.c
describe them: a name, the hooks it registers, its priority at each, the families
it exists in. Everything table-specific elsewhere (which hooks a blob must fill,
where links attach, what GET_INFO creates on first use) reads these descriptors.

`implemented` says whether bpfilter translates the table; a blob for a table the
kernel has but bpfilter does not is refused (EOPNOTSUPP), a name the kernel does not
know is ENOENT, as __do_replace() answers.
"""
from __future__ import annotations

from dataclasses import dataclass

from .model import Family, Hook

# enum nf_ip_hook_priorities (netfilter_ipv4.h); nf_ip6_hook_priorities has the same values
NF_IP_PRI_RAW = -300
NF_IP_PRI_MANGLE = -150
NF_IP_PRI_NAT_DST = -100
NF_IP_PRI_FILTER = 0
NF_IP_PRI_SECURITY = 50
NF_IP_PRI_NAT_SRC = 100

BOTH = frozenset({Family.IPV4, Family.IPV6})


@dataclass(frozen=True)
class TableType:
    name: str
    hooks: tuple[Hook, ...]
    priorities: tuple[int, ...]     # one per hook, in `hooks` order
    families: frozenset[Family]
    implemented: bool
    # Its chains are the NAT core's lookups (nf_nat_ipv4_register_fn(), as iptable_nat
    # registers them), run for a connection's first packet only, rather than hooks:
    # through bpfilter.ko, which registers them (kmod/nat.c).
    nat_lookups: bool = False
    # Hooks where a packet whose route-deciding fields the rules changed is routed
    # again (iptable_mangle's OUTPUT: compiler/reroute.py).
    reroutes: tuple[Hook, ...] = ()

    @property
    def valid_hooks(self) -> int:
        return sum(1 << hook.value for hook in self.hooks)

    def priority(self, hook: Hook) -> int:
        return self.priorities[self.hooks.index(hook)]


def _same(priority: int, *hooks: Hook) -> tuple:
    return hooks, (priority,) * len(hooks)


_FILTER_HOOKS = (Hook.LOCAL_IN, Hook.FORWARD, Hook.LOCAL_OUT)

FILTER = TableType("filter", *_same(NF_IP_PRI_FILTER, *_FILTER_HOOKS), BOTH, True)
MANGLE = TableType("mangle", *_same(NF_IP_PRI_MANGLE, *Hook), BOTH, True,
                   reroutes=(Hook.LOCAL_OUT,))
NAT = TableType("nat", (Hook.PRE_ROUTING, Hook.LOCAL_IN, Hook.LOCAL_OUT, Hook.POST_ROUTING),
                (NF_IP_PRI_NAT_DST, NF_IP_PRI_NAT_SRC, NF_IP_PRI_NAT_DST, NF_IP_PRI_NAT_SRC),
                BOTH, True, nat_lookups=True)
RAW = TableType("raw", *_same(NF_IP_PRI_RAW, Hook.PRE_ROUTING, Hook.LOCAL_OUT), BOTH, True)
SECURITY = TableType("security", *_same(NF_IP_PRI_SECURITY, *_FILTER_HOOKS), BOTH, False)

TABLES: dict[str, TableType] = {t.name: t for t in (FILTER, MANGLE, NAT, RAW, SECURITY)}


def kernel_tables(family: Family) -> dict[str, TableType]:
    """The tables the kernel has for `family`, by name."""
    return {name: t for name, t in TABLES.items() if family in t.families}


def implemented(family: Family) -> list[str]:
    return [name for name, t in kernel_tables(family).items() if t.implemented]
