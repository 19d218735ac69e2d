"""The two iptables families the tests run side by side: the kernel's binaries
and what pytest calls each one. Tests parameterized by family take FAMILIES with
ids=FAMILY_IDS."""
from bpfilter.model import Family

FAMILIES = (Family.IPV4, Family.IPV6)
FAMILY_IDS = ["ipv4", "ipv6"]


def tool(family: Family, suffix: str = "") -> str:
    """The Debian legacy binary of the family: tool(Family.IPV6, "-save") is
    ip6tables-legacy-save."""
    return ("iptables" if family == Family.IPV4 else "ip6tables") + "-legacy" + suffix


def names_file(family: Family) -> str:
    return "/proc/net/" + ("ip_tables_names" if family == Family.IPV4 else "ip6_tables_names")
