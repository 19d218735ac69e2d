"""The kernel's own matches (ext/xtmatch.py: recent, nfacct) as far as they go without
bpfilter.ko: decoded and listed as the kernel's ip_tables has them, their payloads
checked as xt_recent's checkentry checks them, and the table refused with a message
naming the module. (With the module, run by the kernel: tests/test_kmod.py,
test_kmod_recent_and_nfacct_are_the_kernels.)"""
import errno
import re
import subprocess

import pytest

from bpfilter import ext
from bpfilter.abi import codec
from bpfilter.ext.nfacct import xt_nfacct_match_info
from bpfilter.loader import load_filter_table
from bpfilter.recentlists import RecentLists
from bpfilter.ext.recent import XT_RECENT_CHECK, XT_RECENT_REAP, XT_RECENT_SET, XT_RECENT_TTL
from bpfilter.model import Family, IpHeader, Prefix
from bpfilter_lab.scratch import replace_blob

from test_refusals import kernel_refusal
from test_targets import HEADER, ours

pytestmark = pytest.mark.kernel

ENTRY_SIZE = {Family.IPV4: 112, Family.IPV6: 168}   # struct ipt_entry, ip6t_entry
MATCH_HEADER = 32                                   # struct xt_entry_match
SECONDS, HIT_COUNT, CHECK_SET = 0, 4, 8             # in struct xt_recent_mtinfo(_v1)
COMMAND = {Family.IPV4: "iptables-legacy", Family.IPV6: "ip6tables-legacy"}
FAMILIES = pytest.mark.parametrize("family", list(Family), ids=lambda f: f.name.lower())

RECENT = ["-m recent --set --name knock --rsource",
          "-m recent --rcheck --seconds 60 --hitcount 3 --name flood --rdest",
          "-m recent --update --seconds 5 --reap --rttl --name x",
          "-m recent ! --remove --name y"]


def ruleset(*lines: str) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *lines, "COMMIT", ""])


def first_rule(blob: bytes, family: Family):
    """The blob's first rule (INPUT's) and its decoded first match."""
    raw = codec.parse_replace(blob, family=family)
    entry = raw.entries[0]
    m = entry.matches[0]
    return entry, ext.decode_match(m.name, m.revision, m.data, raw.abi.decode_ip(entry.ip),
                                   family, "rule 1", entry.hook_mask, "filter")


@FAMILIES
@pytest.mark.parametrize("rule", RECENT)
def test_recent_is_listed_as_the_kernel_lists_it_and_served_without_the_module(
        fresh_netns, family, rule):
    """Without the module the service's lists serve it (test_service.py,
    test_recent_lists_behave_as_the_kernels), --rttl included."""
    text = ruleset(f"-A INPUT {rule}")
    blob = replace_blob(text, family=family)
    _, match = first_rule(blob, family)
    subprocess.run(["ip", "netns", "exec", fresh_netns, f"{COMMAND[family]}-restore"],
                   input=text, text=True, check=True)
    listed = subprocess.run(["ip", "netns", "exec", fresh_netns, COMMAND[family], "-L", "INPUT",
                             "-n"], capture_output=True, text=True, check=True).stdout
    line = listed.splitlines()[2]
    assert re.sub(r"\s+", " ", line).endswith(" " + ext.describe_match(match, family)), \
        (line, ext.describe_match(match, family))
    err = ours(blob, family=family)
    assert err.errno == errno.EOPNOTSUPP, err
    assert "recent rules without bpfilter.ko need the service's lists" in str(err), err
    lists = RecentLists.create()
    try:
        load_filter_table(blob, attach=False, environment=lists.maps(), family=family).close()
    finally:
        lists.close()


# (what, the payload's bytes at an offset): what recent_mt_check() refuses, and one it takes
PATCHES = [
    ("two modes", CHECK_SET, bytes([XT_RECENT_SET | XT_RECENT_CHECK])),
    ("no mode", CHECK_SET, bytes([XT_RECENT_TTL])),
    ("an unknown flag", CHECK_SET, bytes([XT_RECENT_CHECK | 64])),
    ("--set --seconds", SECONDS, (5).to_bytes(4, "little")),
    ("--set --hitcount", HIT_COUNT, (2).to_bytes(4, "little")),
    ("--set --reap", CHECK_SET, bytes([XT_RECENT_SET | XT_RECENT_REAP])),
    ("--rcheck --reap without --seconds", CHECK_SET, bytes([XT_RECENT_CHECK | XT_RECENT_REAP])),
    ("--rcheck --rttl", CHECK_SET, bytes([XT_RECENT_CHECK | XT_RECENT_TTL])),
]


@FAMILIES
@pytest.mark.parametrize("what, at, value", PATCHES, ids=[p[0] for p in PATCHES])
def test_recent_payloads_the_kernel_refuses_are_refused_alike(fresh_netns, family, what, at,
                                                             value):
    blob = bytearray(replace_blob(ruleset("-A INPUT -m recent --set --name knock"),
                                  family=family))
    entry, _ = first_rule(bytes(blob), family)
    start = HEADER + entry.offset + ENTRY_SIZE[family] + MATCH_HEADER + at
    blob[start:start + len(value)] = value
    kernel = kernel_refusal(bytes(blob), fresh_netns, family)
    err = ours(bytes(blob), family=family)
    if kernel:
        assert (kernel, err.errno) == (errno.EINVAL, errno.EINVAL), err
        assert "recent: invalid options" in str(err)
    else:   # valid: needs the service's lists
        assert err.errno == errno.EOPNOTSUPP, err


@FAMILIES
@pytest.mark.parametrize("revision", [0, 1])
def test_nfacct_names_its_object(family, revision):
    payload = xt_nfacct_match_info.build(dict(name=b"udp_in".ljust(32, b"\0"), nfacct=0))
    ip = IpHeader(Prefix(bytes(4), bytes(4)), Prefix(bytes(4), bytes(4)), None, None)
    match = ext.decode_match("nfacct", revision, payload, ip, family, "rule 1", 1, "filter")
    assert ext.describe_match(match, family) == "nfacct-name  udp_in"
    assert "needs bpfilter.ko" in ext.unsupported_match(match, family)
