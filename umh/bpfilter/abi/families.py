"""The entry family of each model.Family: abi.families.of(Family.IPV6)."""
from ..model import Family
from .ipv4 import IPV4
from .ipv6 import IPV6
from .xtables import EntryFamily

_BY_FAMILY = {Family.IPV4: IPV4, Family.IPV6: IPV6}


def of(family: Family) -> EntryFamily:
    return _BY_FAMILY[family]
