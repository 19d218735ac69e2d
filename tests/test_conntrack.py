"""-m conntrack and -m state against the kernel, with connections made of real packets.

Both lab targets run the kernel's own connection tracking; the kernel's iptables
and bpfilter read it. Each test uses its own ports, so that connections left by
one test (the lab lives for the module) never answer another's packets.
T is the target (198.18.0.1), P its peer behind vin0 (198.18.0.2).
"""
from __future__ import annotations

import subprocess

import pytest

from bpfilter.abi import codec
from bpfilter.netns import entered
from bpfilter_lab.lab import S_IN_ADDR, T_IN_ADDR, Case, Lab
from bpfilter_lab.packets import Packet
from bpfilter_lab.scratch import replace_blob

from test_differential import assert_identical

pytestmark = pytest.mark.kernel

T, P = T_IN_ADDR, S_IN_ADDR
SYN, ACK, SYN_ACK = 0x02, 0x10, 0x12


@pytest.fixture(scope="module")
def lab():
    with Lab({"kernel": "kernel", "bpfilter": "bpfilter"}) as lab:
        yield lab


def out(proto, sport, dport, **kw) -> Case:
    """T opens (or continues) a flow to P."""
    return Case(Packet(T, P, proto, sport=sport, dport=dport, **kw), "output")


def back(proto, sport, dport, **kw) -> Case:
    """P sends to T."""
    return Case(Packet(P, T, proto, sport=sport, dport=dport, **kw), "input")


def port_unreachable_about(case: Case) -> Case:
    """P's ICMP port unreachable quoting a packet T sent: conntrack's RELATED."""
    quote = case.packet.build(1, 0)[:28]
    return Case(Packet(P, T, "icmp", icmp_type=3, icmp_code=3, quoted=quote), "input")


SERVER = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p udp -m state --state NEW -m udp --dport 53 -j ACCEPT
-A OUTPUT -m state --state INVALID -j DROP
COMMIT
"""


def test_server_firewall_accepts_replies_and_drops_the_unsolicited(lab):
    dns = out("udp", 41000, 53)
    cases = [
        dns,
        back("udp", 53, 41000),                       # the answer: ESTABLISHED
        back("udp", 53, 41001),                       # nobody asked: NEW, dropped
        port_unreachable_about(out("udp", 41002, 9)),  # nobody sent it yet: INVALID
        out("udp", 41002, 9),
        port_unreachable_about(out("udp", 41002, 9)),  # now RELATED
        out("tcp", 41010, 443, tcp_flags=SYN, seq=1000),
        back("tcp", 443, 41010, tcp_flags=SYN_ACK, seq=5000, ack=1001),   # ESTABLISHED
        out("tcp", 41010, 443, tcp_flags=ACK, seq=1001, ack=5001),
        back("tcp", 443, 41011, tcp_flags=SYN_ACK, seq=5000, ack=1001),   # no SYN: not ours
        back("tcp", 41020, 22, tcp_flags=SYN, seq=77),                    # NEW to ssh
        back("tcp", 41021, 23, tcp_flags=SYN, seq=77),                    # NEW elsewhere
        back("udp", 41030, 53),                                           # NEW to dns
        out("icmp", 0, 0, icmp_type=8),
        back("icmp", 0, 0, icmp_type=0),                                  # echo reply
        back("icmp", 0, 0, icmp_type=8),                                  # echo request: NEW
    ]
    arrived = assert_identical(lab, SERVER, cases)["kernel"]
    assert arrived == [True, True, False, False, True, True, True, True, True, False,
                       True, False, True, True, True, False]


CT_FIELDS = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:seen -
-A INPUT -j seen
-A INPUT -p udp -m conntrack --ctdir REPLY --ctstate ESTABLISHED --ctorigsrcport 42000:42009 -j DROP
-A INPUT -p udp -m conntrack --ctdir ORIGINAL --ctorigdstport 42010 -j DROP
-A INPUT -m conntrack ! --ctstatus SEEN_REPLY --ctproto udp --ctrepldst {P} -j DROP
-A INPUT -m conntrack --ctstatus ASSURED -j DROP
-A seen -m conntrack --ctreplsrcport 53 --ctrepldstport 42001
-A seen -m conntrack ! --ctproto tcp ! --ctorigdst 198.18.1.0/24
-A seen -m conntrack ! --ctstate NEW,ESTABLISHED
-A seen -m state --state ESTABLISHED
-A seen -m conntrack --ctstate SNAT,DNAT
-A seen -m conntrack --ctorigsrc {T}/32 --ctreplsrc {P} -j RETURN
-A seen -m conntrack --ctstate NEW -j RETURN
COMMIT
"""


def test_the_entry_fields_agree_with_the_kernel(lab):
    ruleset = CT_FIELDS
    cases = [
        out("udp", 42001, 53), back("udp", 53, 42001), back("udp", 53, 42001),
        back("udp", 53, 42001), out("udp", 42001, 53), back("udp", 53, 42001),
        out("udp", 42011, 42010), back("udp", 42010, 42011),
        back("udp", 42012, 42010), back("udp", 42013, 42014),
        out("tcp", 42020, 80, tcp_flags=SYN, seq=10),
        back("tcp", 80, 42020, tcp_flags=SYN_ACK, seq=90, ack=11),
        out("tcp", 42020, 80, tcp_flags=ACK, seq=11, ack=91),
        back("tcp", 80, 42020, tcp_flags=ACK, seq=91, ack=11),
        back("tcp", 42021, 80, tcp_flags=ACK, seq=5, ack=5),
        back("icmp", 0, 0, icmp_type=8),
        port_unreachable_about(out("udp", 42030, 9)),
    ]
    assert_identical(lab, ruleset, cases)


EXPIRING = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctexpire 0:10
-A INPUT -p udp -m conntrack --ctexpire 20:40 -j DROP
-A INPUT -p tcp -m conntrack ! --ctexpire 100:130
-A INPUT -p tcp -m conntrack --ctexpire 400000:500000 -j DROP
-A INPUT -m conntrack --ctexpire 50:0
-A INPUT -m conntrack ! --ctexpire 50:0
COMMIT
"""


def test_ctexpire_counts_the_seconds_left_as_the_kernel(lab):
    """UDP entries live 30 s unanswered (then 120 s), a SYN_SENT one 120 s, an
    established one 5 days: the ranges sit far from where a second could tip them. An
    entry not yet confirmed (the unsolicited datagram's, at INPUT) still holds its
    relative timeout, which nf_ct_expires() turns into 0 seconds."""
    cases = [
        out("udp", 42100, 53), back("udp", 53, 42100),
        back("udp", 53, 42101),
        out("tcp", 42110, 80, tcp_flags=SYN, seq=10),
        back("tcp", 80, 42110, tcp_flags=SYN_ACK, seq=90, ack=11),
        out("tcp", 42110, 80, tcp_flags=ACK, seq=11, ack=91),
        back("tcp", 80, 42110, tcp_flags=ACK, seq=91, ack=11),
        back("icmp", 0, 0, icmp_type=8),
    ]
    arrived = assert_identical(lab, EXPIRING, cases)["kernel"]
    assert arrived == [True, False, True, True, True, True, False, True], arrived


def test_iptables_sends_state_as_conntrack_revision_3():
    table = codec.parse_replace(replace_blob(SERVER))
    names = {(m.name, m.revision) for e in table.entries for m in e.matches}
    assert ("conntrack", 3) in names and not any(n == "state" for n, _ in names)


@pytest.mark.parametrize("revision", [1, 2])
def test_older_revisions_decode_to_the_same_match(revision):
    """Older iptables send revisions 1 and 2: ports as __be16 without ranges, and
    a u8 (1) or u16 (2) state mask. Their code is revision 3's."""
    from bpfilter.ext import conntrack as ct
    blob = replace_blob(SERVER.replace("--dport 22 -m conntrack --ctstate NEW",
                                       "--dport 22 -m conntrack --ctstate NEW --ctorigdstport 22"))
    raw = codec.parse_replace(blob)
    payload = next(m.data for e in raw.entries for m in e.matches
                   if m.name == "conntrack" and len(e.matches) == 2 and e.matches[0].name == "tcp")
    v3 = ct._mtinfo(3).parse(payload)
    fields = {k: v for k, v in v3.items() if not k.startswith("_") and not k.endswith("_high")}
    for port in ("origsrc_port", "origdst_port", "replsrc_port", "repldst_port"):
        fields[port] = int.from_bytes(fields[port].to_bytes(2, "big"), "little")   # __be16
    older = ct._mtinfo(revision).build(fields).ljust(152 if revision == 1 else 160, b"\0")
    where = "chain INPUT rule 3"
    new = ext_match(3).decode(payload, where)
    old = ext_match(revision).decode(older, where)
    assert (old.flags, old.state_mask, old.ports, old.l4proto) == \
        (new.flags, new.state_mask, new.ports, new.l4proto)
    assert old.ports[1] == (22, 22)


def ext_match(revision: int):
    from bpfilter import ext
    from bpfilter.model import Family
    return ext._MATCHES.find("conntrack", revision, Family.IPV4, "test")



def nft_tables(lab: Lab) -> str:
    with entered(lab.netns("bpfilter")):
        return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                              check=True).stdout


def test_conntrack_is_on_exactly_while_a_table_reads_it(lab):
    lab.load(SERVER)
    assert "table ip bpfilter_conntrack" in nft_tables(lab)
    lab.load("*filter\n-A INPUT -p udp -j ACCEPT\nCOMMIT\n")
    assert nft_tables(lab) == ""


# ---------------------------------------------------------------- random

STATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED")
STATUSES = ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED")
ADDRESSES = (T, P, "198.18.0.0/24", "10.0.0.0/8", f"{P}/255.255.0.255")


def random_conntrack(rng) -> str:
    """One conntrack or state match with a few random options."""
    bang = lambda: "! " if rng.random() < 0.3 else ""   # noqa: E731
    if rng.random() < 0.25:
        return "-m state --state " + ",".join(rng.sample(STATES, rng.randint(1, 3)))
    opts = []
    if rng.random() < 0.7:
        opts.append(f"{bang()}--ctstate " + ",".join(rng.sample(STATES, rng.randint(1, 3))))
    proto = rng.choice((None, "udp", "tcp", "icmp"))
    if proto:
        opts.append(f"{bang()}--ctproto {proto}")
    if proto in ("udp", "tcp") and rng.random() < 0.5:
        which = rng.choice(("--ctorigsrcport", "--ctorigdstport", "--ctreplsrcport",
                            "--ctrepldstport"))
        lo = rng.choice((53, 80, 443, 45000, 45010))
        opts.append(f"{bang()}{which} {lo}" + (f":{lo + rng.randint(1, 30)}"
                                                if rng.random() < 0.5 else ""))
    for which in ("--ctorigsrc", "--ctorigdst", "--ctreplsrc", "--ctrepldst"):
        if rng.random() < 0.15:
            opts.append(f"{bang()}{which} {rng.choice(ADDRESSES)}")
    if rng.random() < 0.3:
        opts.append(f"{bang()}--ctstatus " + ",".join(rng.sample(STATUSES, rng.randint(1, 2))))
    if rng.random() < 0.3:
        opts.append("--ctdir " + rng.choice(("ORIGINAL", "REPLY")))
    return "-m conntrack " + " ".join(opts or ["--ctstate NEW"])


def random_ruleset(rng) -> str:
    lines = ["*filter", f":INPUT {rng.choice(('ACCEPT', 'DROP'))} [0:0]", ":FORWARD ACCEPT [0:0]",
             f":OUTPUT {rng.choice(('ACCEPT', 'ACCEPT', 'DROP'))} [0:0]"]
    for chain in ("INPUT", "OUTPUT"):
        for _ in range(rng.randint(3, 8)):
            proto = rng.choice(("", "", "-p udp ", "-p tcp ", "-p icmp "))
            target = rng.choice(("-j ACCEPT", "-j DROP", "-j DROP", ""))
            lines.append(f"-A {chain} {proto}{random_conntrack(rng)} {target}".rstrip())
    return "\n".join(lines + ["COMMIT", ""])


def random_flows(rng, base: int) -> list[Case]:
    """Connections in both directions, with and without answers, interleaved."""
    cases = []
    for i in range(12):
        port = base + i
        kind = rng.choice(("udp", "udp", "tcp", "icmp", "error"))
        outward = rng.random() < 0.6
        first, second = (out, back) if outward else (back, out)
        service = rng.choice((53, 80, 443, port + 100))
        if kind == "udp":
            cases.append(first("udp", port, service))
            if rng.random() < 0.7:
                cases.append(second("udp", service, port))
        elif kind == "tcp":
            cases.append(first("tcp", port, service, tcp_flags=SYN, seq=100))
            if rng.random() < 0.7:
                cases.append(second("tcp", service, port, tcp_flags=SYN_ACK, seq=700, ack=101))
                if rng.random() < 0.7:
                    cases.append(first("tcp", port, service, tcp_flags=ACK, seq=101, ack=701))
        elif kind == "icmp":
            cases.append(first("icmp", 0, 0, icmp_type=8))
            if rng.random() < 0.7:
                cases.append(second("icmp", 0, 0, icmp_type=0))
        else:
            sent = out("udp", port, service)
            if rng.random() < 0.7:
                cases.append(sent)
            cases.append(port_unreachable_about(sent))
    rng.shuffle(cases[len(cases) // 2:])   # later packets out of order: some become INVALID
    return cases


@pytest.mark.parametrize("seed", range(12))
def test_random_conntrack_rulesets_agree_with_the_kernel(lab, seed):
    import random
    rng = random.Random(f"conntrack-{seed}")
    assert_identical(lab, random_ruleset(rng), random_flows(rng, 46000 + 20 * seed))
