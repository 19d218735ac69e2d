"""`bpfilter check`: every table and family of a save file through the service's
pipeline, what it refuses said, nothing attached."""
import subprocess
import sys
from pathlib import Path

import pytest

from bpfilter.check import check, guess_family
from bpfilter.model import Family

pytestmark = pytest.mark.kernel

REALWORLD = Path(__file__).parent / "realworld"

IPV6_SERVER = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT
-A INPUT -s 2001:db8::/32 -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -p udp -m multiport --dports 53,123 -j ACCEPT
COMMIT
"""

FILTER_AND_NAT = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -i br0 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE
COMMIT
"""


def _cli(*args: str, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpfilter", "check", *args], input=text,
                          text=True, capture_output=True)


def test_an_ipv6_ruleset_is_checked_as_ip6tables():
    assert guess_family(IPV6_SERVER) is Family.IPV6
    status, outcomes, _ = check(IPV6_SERVER, Family.IPV6)
    assert status == 0
    assert [(o.table, o.refusal) for o in outcomes] == [("filter", None)]
    assert {name for name, _ in outcomes[0].programs} == {
        "filter_INPUT", "filter_FORWARD", "filter_OUTPUT"}
    done = _cli(text=IPV6_SERVER)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ip6tables table filter: ok")


def test_every_table_is_checked_and_a_refused_one_is_named():
    done = _cli("-4", text=FILTER_AND_NAT)
    lines = done.stdout.splitlines()
    assert done.returncode == 1
    assert lines[0].startswith("iptables table filter: ok")
    assert lines[1].startswith("iptables table nat: REFUSED: chain POSTROUTING rule 1")
    assert "MASQUERADE" in lines[1]


def test_a_table_the_kernel_would_refuse_fails_the_restore():
    bad = FILTER_AND_NAT.replace("-A FORWARD -i br0 -j ACCEPT", "-A FORWARD -j NOSUCHCHAIN")
    done = _cli("-4", text=bad)
    assert done.returncode == 1
    assert "iptables-legacy-restore failed" in done.stdout


@pytest.mark.parametrize("name", ["docker.rules", "server.rules"])
def test_the_realworld_fixtures_that_load_pass(name):
    text = (REALWORLD / name).read_text()
    status, outcomes, stderr = check(text, guess_family(text))
    assert status == 0, stderr
    assert outcomes and all(o.refusal is None for o in outcomes), outcomes
