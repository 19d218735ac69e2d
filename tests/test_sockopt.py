"""abi.sockopt, the client of the kernel's own iptables and ip6tables socket options."""
import struct
import subprocess

import pytest

from bpfilter.abi import codec, families, sockopt
from bpfilter.model import Family
from bpfilter.netns import entered

pytestmark = pytest.mark.kernel

RULES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:mine - [0:0]
-A INPUT -p tcp --dport 22 -j mine
-A mine -j DROP
COMMIT
"""


def test_entry_layouts_are_the_headers(tmp_path):
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n"
        "#include <linux/netfilter_ipv4/ip_tables.h>\n"
        "#include <linux/netfilter_ipv6/ip6_tables.h>\n"
        "#define LAYOUT(t) printf(\"%zu %zu %zu\\n\", offsetof(t, next_offset), "
        "offsetof(t, counters), sizeof(t))\n"
        "int main(void) { LAYOUT(struct ipt_entry); LAYOUT(struct ip6t_entry); return 0; }\n")
    binary = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True)
    lines = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    assert [tuple(map(int, line.split())) for line in lines.splitlines()] == \
        [_layout(Family.IPV4), _layout(Family.IPV6)]



def _layout(family: Family) -> tuple[int, int, int]:
    """(next_offset, counters, size) of the family's entry header, as the codec has them."""
    layout = families.of(family)
    return layout.next_offset_at, layout.counters_at, layout.entry_size

@pytest.mark.parametrize("family,restore", [(Family.IPV4, "iptables-legacy-restore"),
                                            (Family.IPV6, "ip6tables-legacy-restore")])
def test_read_replace_gives_back_the_table_with_counters_zeroed(fresh_netns, family, restore):
    subprocess.run(["ip", "netns", "exec", fresh_netns, restore], input=RULES, text=True,
                   check=True)
    with entered(fresh_netns):
        info = codec.parse_getinfo(sockopt.get_info("filter", family))
        entries = codec.parse_get_entries(
            sockopt.get_entries("filter", info["size"], family))["entries"]
        blob = sockopt.read_replace("filter", family)
    next_at, counters_at, size = _layout(family)
    header, table = blob[:len(blob) - info["size"]], blob[len(blob) - info["size"]:]
    assert len(header) == 96 and header[:6] == b"filter"
    # INPUT's rule and policy, FORWARD's and OUTPUT's policies, mine's head, rule and
    # RETURN, the table's end
    offsets, off = [], 0
    while off < len(table):
        offsets.append(off)
        assert table[off:off + counters_at] == entries[off:off + counters_at]
        assert table[off + counters_at:off + size] == bytes(16)
        off += struct.unpack_from("<H", table, off + next_at)[0]
    assert len(offsets) == info["num_entries"] == 8
