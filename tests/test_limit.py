"""limit's dependence on the kernel: its HZ, and how iptables lists its rates."""
import subprocess

import pytest

from bpfilter import ext
from bpfilter.abi import codec
from bpfilter.decode import table_from_raw
from bpfilter.ext import limit
from bpfilter_lab.scratch import replace_blob

pytestmark = pytest.mark.kernel

def test_hz_is_the_rate_jiffies_advance_at():
    """CONFIG_HZ as read agrees with jiffies' rate against CLOCK_MONOTONIC (the
    Kconfig choices are 20% apart at least), which is what is used where no
    configuration file says it (a minimal guest's case)."""
    assert limit.measured_hz() == limit.kernel_hz() in limit.HZ_CHOICES


RATES = ["5/sec", "7/min", "3/hour", "1/day", "10000/sec", "13/sec", "999/min", "59/hour"]


def test_described_as_iptables_lists_it(fresh_netns):
    rules = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                       ":OUTPUT ACCEPT [0:0]",
                       *[f"-A INPUT -m limit --limit {r} --limit-burst 1" for r in RATES],
                       "COMMIT", ""])
    subprocess.run(["ip", "netns", "exec", fresh_netns, "iptables-legacy-restore"],
                   input=rules, text=True, check=True)
    listed = subprocess.run(["ip", "netns", "exec", fresh_netns, "iptables-legacy", "-L",
                             "INPUT", "-n"], text=True, check=True,
                            capture_output=True).stdout.splitlines()[2:]
    table = table_from_raw(codec.parse_replace(replace_blob(rules)))
    ours = [ext.describe_match(rule.matches[0], table.family)
            for rule in table.chains["INPUT"].rules]
    assert [line.split("0.0.0.0/0", 2)[2].strip() for line in listed] == ours


def test_credits_as_the_kernel_computes_them():
    """user2credits() at HZ 250 (CREDITS_PER_JIFFY 128): multiply first while it fits
    in u32, else divide first; products wrap."""
    assert limit.credits_per_jiffy(250) == 128 and limit.credits_per_jiffy(1000) == 32
    assert limit.user2credits(2000, 250) == 2000 * 250 * 128 // 10000
    assert limit.user2credits(20000, 250) == 2 * 250 * 128
    assert limit.user2credits(864000000 * 2, 250) == (172800 * 32000) & 0xFFFFFFFF

