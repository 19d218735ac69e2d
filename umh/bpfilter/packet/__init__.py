"""What a rule can look at in a packet: the facts the prologue reads once per packet
(facts.py), the tests rules make on them (primitives.py), and each family's way of
reading its network header and testing a rule's ip part (ipv4.py, ipv6.py)."""
from ..model import Family
from .facts import Flavour
from .ipv4 import IPV4
from .ipv6 import IPV6

_FLAVOURS = {Family.IPV4: IPV4, Family.IPV6: IPV6}


def flavour(family: Family) -> Flavour:
    return _FLAVOURS[family]
