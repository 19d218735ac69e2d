"""The classifiers' decisions and building blocks: the tuple space (both families)
and multifield's merged tuples (IPv4). Their verdicts and counters are proved against
the kernel in test_differential.py and, case by case, in test_verdicts.py and
test_verdicts6.py (each case walked, classified and in merged tuples); here both
classifiers' structures are also searched by models of their BPF code against the
kernel's first match, packet by packet."""
import ipaddress
import random
import struct
import socket
from dataclasses import replace

import pytest

from bpfilter import forked
from bpfilter.decode import table_from_blob
from bpfilter.compiler import classifier, multifield
from bpfilter.compiler.classifier import Run, segments
from bpfilter.compiler.runs import (CALLS, MAIN, PROJECTION, RECORD_SIZE, UNWALKED, VERDICT_ACCEPT,
                                    VERDICT_DROP, VERDICT_HOTDROP, TupleSpace, lower, port_blocks)
from bpfilter.compiler.multifield import MultiFieldRun
from bpfilter.ext.tcp import TcpMatch
from bpfilter.model import Accept, Family, Rule
from bpfilter_lab.scratch import replace_blob

IPV4, IPV6 = Family.IPV4, Family.IPV6


def chain_rules(rules: str, family: Family = IPV4):
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + rules + "\nCOMMIT\n")
    return table_from_blob(replace_blob(text, family=family), family)[1].chains["INPUT"].rules


def ids(tuples) -> list[int]:
    return [t.tid for t in tuples]


def covered(blocks):
    return {p for value, mask in blocks for p in range(65536) if p & mask == value}


def test_port_blocks_cover_exactly_the_range():
    rng = random.Random(7)
    ranges = [(0, 65535), (22, 22), (1024, 65535), (0, 1023), (1000, 1100), (65535, 65535)]
    ranges += [tuple(sorted((rng.randrange(65536), rng.randrange(65536)))) for _ in range(20)]
    for lo, hi in ranges:
        blocks = port_blocks(lo, hi)
        assert covered(blocks) == set(range(lo, hi + 1)), (lo, hi)
        assert len(blocks) <= 2 * 16


def test_a_blocklist_is_one_run_with_one_lookup_per_prefix_length():
    rules = chain_rules("\n".join(f"-A INPUT -s 10.1.{i // 256}.{i % 256} -j DROP"
                                  for i in range(300)))
    [run] = segments(rules, TupleSpace())
    assert isinstance(run, Run) and len(run.rules) == 300
    # its projection has the keys of its one tuple: it is that tuple
    assert len(run.tuples) == 1 and ids(run.ip_tuples) == ids(run.tuples)
    assert len(run.keys) == 300


def test_short_runs_and_varied_ranges_stay_code():
    few = chain_rules("\n".join(f"-A INPUT -s 10.0.0.{i} -j DROP"
                                for i in range(classifier.MIN_RUN - 1)))
    assert not any(isinstance(s, Run) for s in segments(few, TupleSpace()))
    # ranges on one field are cheap (at most 17 masks); across fields they multiply
    rng = random.Random(3)
    varied = chain_rules("\n".join(
        f"-A INPUT -s 10.{i}.0.0/{rng.randint(8, 32)} -d 10.{i}.0.0/{rng.randint(8, 32)} "
        f"-p tcp --sport {lo}:{lo + rng.randrange(1, 999)} --dport {lo}:{lo + rng.randrange(1, 5000)} "
        "-j DROP" for i, lo in enumerate(rng.randrange(60000) for _ in range(64))))
    assert not any(isinstance(s, Run) for s in segments(varied, TupleSpace()))
    # nor, a few of them, for merged tuples
    assert all(isinstance(s, Rule) for s in segments(varied[:20], TupleSpace()))
    one_field = chain_rules("\n".join(
        f"-A INPUT -p tcp --dport {lo}:{lo + rng.randrange(1, 5000)} -j DROP"
        for lo in (rng.randrange(60000) for _ in range(80))))
    [run] = segments(one_field, TupleSpace())
    assert len(run.tuples) + len(run.ip_tuples) <= 17


def test_a_rule_the_classifier_cannot_take_ends_the_run_in_order():
    lines = [f"-A INPUT -s 10.0.1.{i} -j DROP" for i in range(20)]
    lines += ["-A INPUT ! -s 10.9.9.9 -p tcp --syn -j ACCEPT"]
    lines += [f"-A INPUT -p udp --dport {1000 + i} -j ACCEPT" for i in range(20)]
    segs = segments(chain_rules("\n".join(lines)), TupleSpace())
    assert [type(s).__name__ for s in segs] == ["Run", "Rule", "Run"]
    assert [r.entry for s in segs for r in (s.rules if isinstance(s, Run) else [s])] == \
        list(range(41))


def test_runs_never_share_tuple_ids():
    lines = [f"-A INPUT -s 10.0.1.{i} -j DROP" for i in range(20)]
    lines += ["-A INPUT -i lo -j ACCEPT"]
    lines += [f"-A INPUT -s 10.0.2.{i} -j ACCEPT" for i in range(20)]
    first, _, second = segments(chain_rules("\n".join(lines)), TupleSpace())
    first_ids, second_ids = ({t.tid for t in run.tuples + run.ip_tuples} for run in (first, second))
    assert not first_ids & second_ids


def test_the_first_rule_wins_a_shared_key():
    rules = chain_rules("\n".join(["-A INPUT -s 10.0.0.1 -j ACCEPT"] * 2 +
                                  [f"-A INPUT -s 10.0.0.{i} -j DROP" for i in range(2, 20)]))
    [run] = segments(rules, TupleSpace())
    entries = {entry for entry, _ in run.keys.values()}   # relative to the run's first
    assert 0 in entries and 1 not in entries


def test_comments_do_not_keep_rules_from_a_run():
    rules = chain_rules("\n".join(f'-A INPUT -s 10.0.1.{i} -p tcp --dport {i} -m comment '
                                  f'--comment "host {i}" -j DROP' for i in range(20)))
    [run] = segments(rules, TupleSpace())
    assert isinstance(run, Run) and len(run.rules) == 20
    other = chain_rules("\n".join(f"-A INPUT -s 10.0.1.{i} -m ttl --ttl-eq 1 -j DROP"
                                  for i in range(20)))
    assert not any(isinstance(s, Run) for s in segments(other, TupleSpace()))


# ---------------------------------------------------------------- IPv6

def v6_host(i: int) -> str:
    """An address whose every prefix from /32 on is its own."""
    return f"2001:{i + 1:x}::{i + 1:x}"


def test_an_ipv6_blocklist_is_one_run_with_one_lookup_per_prefix_length():
    """Prefixes from /32 to /128, without -p: a tuple per length, looked up the same
    way by the packets whose transport header is short or whose extension headers
    cannot be walked (a rule without -p matches those on its addresses)."""
    lengths = (32, 48, 56, 64, 96, 127, 128)
    rules = chain_rules("\n".join(f"-A INPUT -s {v6_host(i)}/{lengths[i % len(lengths)]} -j DROP"
                                   for i in range(300)), IPV6)
    [run] = segments(rules, TupleSpace(IPV6))
    assert isinstance(run, Run) and len(run.rules) == 300
    assert len(run.tuples) == len(lengths)
    assert ids(run.ip_tuples) == ids(run.unwalked_tuples) == ids(run.tuples)
    assert len(run.keys) == 300
    assert all(len(key) == classifier.KEYS[IPV6].size == 48 for key in run.keys)


def test_projections_have_keys_of_their_own_where_they_differ():
    """A port rule says "hotdrop" in the projection for short transport headers; an
    IPv6 rule with -p (`all` too) says it in the one for packets that cannot be
    walked, a rule without -p its verdict there."""
    rules = chain_rules("\n".join(
        [f"-A INPUT -s {v6_host(i)}/64 -p all -j DROP" for i in range(8)]
        + [f"-A INPUT -s {v6_host(i)}/64 -p udp --dport {i} -j DROP" for i in range(8, 16)]
        + [f"-A INPUT -d {v6_host(i)}/128 -j ACCEPT" for i in range(16, 24)]), IPV6)
    [run] = segments(rules, TupleSpace(IPV6))
    assert isinstance(run, Run) and len(run.rules) == 24
    by_tid: dict[int, set] = {}
    for key, (entry, verdict) in run.keys.items():
        by_tid.setdefault(struct.unpack_from("<I", key)[0], set()).add((entry, verdict))

    def values(tuples):
        return {value for tid in ids(tuples) for value in by_tid[tid]}
    drop, accept, hotdrop = VERDICT_DROP, VERDICT_ACCEPT, VERDICT_HOTDROP
    # entries 0-7: -p all; 8-15: udp ports; 16-23: no -p
    assert values(run.tuples) == {(e, drop) for e in range(16)} | {(e, accept) for e in range(16, 24)}
    assert values(run.ip_tuples) == ({(e, drop) for e in range(8)} | {(e, hotdrop) for e in range(8, 16)}
                                     | {(e, accept) for e in range(16, 24)})
    assert values(run.unwalked_tuples) == {(e, hotdrop) for e in range(16)} | \
        {(e, accept) for e in range(16, 24)}
    # projections that are main tuples: both of the destination rules', and the one
    # of the -p all rules for short transport headers (no port rule there)
    shared = set(ids(run.tuples)) & (set(ids(run.ip_tuples)) | set(ids(run.unwalked_tuples)))
    assert len(shared) == 2 and len(set(ids(run.tuples + run.ip_tuples + run.unwalked_tuples))) == 5


def test_ipv6_address_bits_outside_the_mask_do_not_count():
    """ip6_packet_match() compares ((packet ^ addr) & mask): such a rule is keyed on
    the address's masked bits, where IPv4's (packet & mask) == addr never matches.
    (ip6tables clears those bits itself; a blob can have them.)"""
    def odd(rule):
        src = rule.ip.src
        return replace(rule, ip=rule.ip._replace(src=src._replace(
            addr=bytes(a | (~m & 0xFF) for a, m in zip(src.addr, src.mask)))))
    v6 = odd(chain_rules("-A INPUT -s 2001:db8:1::/48 -j DROP", IPV6)[0])
    assert v6.ip.src.addr != v6.ip.src.mask
    [(masks, fields, *_), *_] = classifier.rule_keys(lower(v6), IPV6)
    assert fields[0].to_bytes(16, "little") == bytes.fromhex("20010db80001") + bytes(10)
    v4 = odd(chain_rules("-A INPUT -s 10.1.0.0/16 -j DROP")[0])
    assert list(classifier.rule_keys(lower(v4), IPV4)) == []


def test_an_ipv6_rule_without_p_ignores_its_protocol_field():
    """Without IP6T_F_PROTO the kernel looks at no protocol, whatever the field holds:
    no protocol in the rule's keys, and its verdict for packets that cannot be walked."""
    rule = chain_rules("-A INPUT -s 2001:db8::/32 -p tcp -j DROP", IPV6)[0]
    assert rule.ip.proto_given
    blind = replace(rule, ip=rule.ip._replace(proto_given=False))
    low = lower(blind)
    assert low.proto == 0 and not low.walks
    assert {masks.structure: verdict for masks, _, _, verdict in classifier.rule_keys(low, IPV6)} \
        == {MAIN: VERDICT_DROP, PROJECTION: VERDICT_DROP, UNWALKED: VERDICT_DROP}
    low = lower(rule)
    assert low.proto == 6 and low.walks
    inverted = replace(rule, ip=rule.ip._replace(invert_proto=True))
    assert lower(inverted) is None


def test_ipv6_runs_the_tuple_space_cannot_take_stay_code():
    """Merged tuples are IPv4's: an IPv6 ACL too varied for the tuple space is code."""
    rng = random.Random(3)
    rules = chain_rules("\n".join(
        f"-A INPUT -s {v6_host(i)}/{rng.randint(32, 128)} -d {v6_host(i + 9)}/{rng.randint(32, 128)} "
        f"-p tcp --dport {lo}:{lo + rng.randrange(1, 5000)} -j DROP"
        for i, lo in enumerate(rng.randrange(60000) for _ in range(200))), IPV6)
    assert all(isinstance(s, Rule) for s in segments(rules, TupleSpace(IPV6)))


@pytest.mark.parametrize("family", [IPV4, IPV6], ids=["ipv4", "ipv6"])
def test_a_run_has_the_tuples_counted_for_it(family, monkeypatch):
    """segments() grows runs by TupleCount; the runs made have exactly the tuple ids
    it counted (distinct ids: projections that are main tuples count once)."""
    monkeypatch.setattr(classifier, "RULES_PER_TUPLE", 0)
    rng = random.Random(21)
    for _ in range(30):
        lines = run_lines(rng, rng.randint(16, 120), family, [], [])
        runs = [s for s in segments(chain_rules("\n".join(lines), family), TupleSpace(family))
                if isinstance(s, Run)]
        for run in runs:
            count = classifier.TupleCount(family)
            for rule in run.rules:
                count.add(lower(rule))
            made = set(ids(run.tuples + run.ip_tuples + run.unwalked_tuples))
            assert count.count == len(made) <= classifier.MAX_TUPLES


# ---------------------------------------------------------------- multifield

def acl_lines(rng: random.Random, n: int, nets: list, ports: list, space: str = "10.0.0.0/8"):
    """ClassBench-style ACL rules in `space`: prefixes of every length or none, tcp,
    udp or any protocol, ports exact, in ranges or any. The networks and ports they
    name are appended to `nets` and `ports`, to aim packets at them."""
    base, length = space.split("/")
    lo = int.from_bytes(socket.inet_aton(base), "big")
    size = 1 << (32 - int(length))
    lines = []
    for _ in range(n):
        parts = ["-A INPUT"]
        for flag in ("-s", "-d"):
            bits = rng.choice([0, 0, 16, 20, 24, 24, 28, 30, 32, 32, rng.randint(int(length), 32)])
            if bits:
                addr = lo + rng.randrange(size)
                nets.append((addr, bits))
                parts.append(f"{flag} {socket.inet_ntoa(addr.to_bytes(4, 'big'))}/{bits}")
        # a rule wild in both addresses names a protocol and a service, as ACLs do
        wild = len(parts) == 1
        proto = rng.choices(["tcp", "udp", None], [5, 4, 0 if wild else 1])[0]
        if proto:
            parts.append(f"-p {proto}")
            for opt, weights in (("--sport", (70, 15, 15)),
                                 ("--dport", (0, 1, 0) if wild else (20, 50, 30))):
                kind = rng.choices(["any", "exact", "range"], weights)[0]
                if kind == "exact":
                    port = rng.choice([22, 53, 80, 443, rng.randrange(65536)])
                    ports.append(port)
                    parts.append(f"{opt} {port}")
                elif kind == "range":
                    a, b = rng.choice([(0, 1023), (1024, 65535),
                                       sorted((rng.randrange(65536), rng.randrange(65536)))])
                    ports += [a, b]
                    parts.append(f"{opt} {a}:{b}")
        parts.append(f"-j {rng.choice(['ACCEPT', 'DROP'])}")
        lines.append(" ".join(parts))
    return lines


# ---------------------------------------------------------------- models

SPACE = {IPV4: "10.0.0.0/8", IPV6: "2001::/16"}


def address_text(value: int, family: Family) -> str:
    return str(ipaddress.ip_address(value) if family is IPV4 else ipaddress.IPv6Address(value))


def run_lines(rng: random.Random, n: int, family: Family, nets: list, ports: list) -> list[str]:
    """Rules the tuple space takes, overlapping in a few sites of SPACE: prefixes of a
    handful of lengths (IPv6: /32 to /128), tcp, udp, another protocol, `all` or none,
    ports exact or in short ranges. What they name goes to `nets` and `ports`."""
    space = ipaddress.ip_network(SPACE[family])
    bits = space.max_prefixlen
    lengths = ([16, 20, 24, 24, 28, 32, 32] if family is IPV4
               else [32, 48, 56, 64, 64, 96, 127, 128, 128])
    sites = [int(space.network_address) + rng.getrandbits(bits - space.prefixlen)
             for _ in range(6)]
    other = {IPV4: "icmp", IPV6: "ipv6-icmp"}[family]
    lines = []
    for _ in range(n):
        parts = ["-A INPUT"]
        # a rule names an address, or is a service's (port rule): no catch-alls
        addressed = rng.random() < 0.8
        for flag in ("-s", "-d"):
            if addressed and (rng.random() < 0.6 if flag == "-s" else len(parts) == 1 or rng.random() < 0.3):
                length = rng.choice(lengths)
                site = rng.choice(sites)
                addr = site ^ rng.getrandbits(bits - length) if rng.random() < 0.5 else site
                nets.append((addr, length))
                parts.append(f"{flag} {address_text(addr, family)}/{length}")
        proto = rng.choice(["tcp", "udp", "tcp", "udp", other, "all", None, None]) \
            if addressed else rng.choice(["tcp", "udp"])
        if proto:
            parts.append(f"-p {proto}")
        if proto in ("tcp", "udp") and (rng.random() < 0.7 or not addressed):
            for opt, chance in (("--sport", 0.2), ("--dport", 0.9 if addressed else 1)):
                if rng.random() < chance:
                    lo = rng.choice([22, 53, 80, 443, rng.randrange(65000)])
                    hi = lo + rng.choice([0, 0, 0, 1, 7, 100])
                    ports += [lo, hi]
                    parts.append(f"{opt} {lo}" if lo == hi else f"{opt} {lo}:{hi}")
        parts.append(f"-j {rng.choice(['ACCEPT', 'DROP'])}")
        lines.append(" ".join(parts))
    return lines


def le(addr: int, family: Family = IPV4) -> int:
    """An address as the facts hold it: the wire bytes loaded little-endian."""
    size = family.addr_len
    return int.from_bytes(addr.to_bytes(size, "big"), "little")


def packet(rng: random.Random, nets: list, ports: list, family: Family = IPV4) -> dict:
    """Facts of a packet aimed inside or just outside the rules' networks and ranges;
    some later fragments (IPv4: offset 1 among them; IPv6's offsets are in bytes) and
    short transport headers; IPv6: some whose extension headers cannot be walked."""
    bits = 8 * family.addr_len

    def addr():
        if rng.random() < 0.2:
            return rng.getrandbits(bits)
        base, length = rng.choice(nets)
        host = bits - length
        inside = base >> host << host | rng.getrandbits(host)
        return inside if rng.random() < 0.8 or length == 0 else inside ^ (1 << host)

    def port():
        return min(65535, max(0, rng.choice(ports) + rng.choice([0, 0, -1, 1]))) \
            if ports and rng.random() < 0.8 else rng.randrange(65536)

    proto = rng.choice([6, 6, 17, 17, 1 if family is IPV4 else 58, 47])
    fragoff = rng.choice([0] * 8 + ([1, 2, 100] if family is IPV4 else [8, 16, 800]))
    walked = family is IPV4 or rng.random() < 0.85
    l4 = 20 if fragoff == 0 and walked else 0
    if l4 and proto in (6, 17) and rng.random() < 0.1:
        l4 = rng.choice([0, 8])
    read = l4 >= 8
    return {"saddr": le(addr(), family), "daddr": le(addr(), family), "proto": proto,
            "fragoff": fragoff if walked else 0, "l4": l4, "walked": walked,
            "sport": port() if read else 0, "dport": port() if read else 0}


def addresses_match(ip, p: dict, family: Family) -> bool:
    """ip_packet_match(): (packet & mask) == addr; ip6_packet_match(): ((packet ^ addr)
    & mask) == 0."""
    for fact, prefix in (("saddr", ip.src), ("daddr", ip.dst)):
        mask, addr = (int.from_bytes(prefix.mask, "little"), int.from_bytes(prefix.addr, "little"))
        if (p[fact] & mask != addr) if family is IPV4 else (p[fact] ^ addr) & mask:
            return False
    return True


def kernel_first(rules: list, p: dict, family: Family = IPV4):
    """(entry, verdict) of the first rule ip(6)t_do_table() stops at, VERDICT_HOTDROP
    where it drops the packet (a port match, an IPv6 walk that failed); None if the
    packet runs off the run."""
    for rule in rules:
        ip = rule.ip
        if not addresses_match(ip, p, family):
            continue
        if family is IPV6 and ip.proto_given and not p["walked"]:
            return rule.entry, VERDICT_HOTDROP
        if ip.proto and (family is IPV4 or ip.proto_given) and p["proto"] != ip.proto:
            continue
        verdict = VERDICT_ACCEPT if isinstance(rule.target, Accept) else VERDICT_DROP
        if not rule.matches:
            return rule.entry, verdict
        m = rule.matches[0]
        if p["fragoff"]:
            if isinstance(m, TcpMatch) and p["fragoff"] == 1:
                return rule.entry, VERDICT_HOTDROP
            continue
        if p["l4"] < (20 if isinstance(m, TcpMatch) else 8):
            return rule.entry, VERDICT_HOTDROP
        if m.sport.lo <= p["sport"] <= m.sport.hi and m.dport.lo <= p["dport"] <= m.dport.hi:
            return rule.entry, verdict
    return None


def hotdrop_structure(p: dict) -> bool:
    """codegen's dispatch: the packet looks up the projection on the ip part."""
    return (p["proto"] == 6 and (p["fragoff"] == 1 or (p["fragoff"] == 0 and p["l4"] < 20))) \
        or (p["proto"] == 17 and p["fragoff"] == 0 and p["l4"] < 8)


def looked_up(run: Run, p: dict, family: Family):
    """What codegen's lookups find in a tuple space run (its dispatch, emit_key's
    keys, each tuple's filter, the smallest entry), and what it makes of it: (entry,
    verdict). A filter must never hide a key."""
    layout = classifier.KEYS[family]
    tuples = run.unwalked_tuples if not p["walked"] else \
        run.ip_tuples if hotdrop_structure(p) else run.tuples
    best = None
    for t in tuples:
        m = t.masks
        key = layout.pack(t.tid, p["saddr"] & m.saddr, p["daddr"] & m.daddr, p["sport"] & m.sport,
                          p["dport"] & m.dport, p["proto"] if m.proto else 0,
                          int(p["fragoff"] == 0) if m.l4 else 0)
        bit = (t.filter - run.record_base) * 8 * RECORD_SIZE + \
            classifier.filter_slot(key, layout, m, t.bits)
        found = run.keys.get(key)
        assert run.records[bit >> 3] >> (bit & 7) & 1 or found is None
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    return None if best is None else (run.base + best[0], best[1])


def unmasked(rule: Rule) -> Rule:
    """The rule with its addresses' bits outside their masks set (a blob can have them)."""
    ip = rule.ip
    return replace(rule, ip=ip._replace(**{
        name: prefix._replace(addr=bytes(a | (~m & 0xFF) for a, m in zip(prefix.addr, prefix.mask)))
        for name, prefix in (("src", ip.src), ("dst", ip.dst))}))


@pytest.mark.parametrize("family", [IPV4, IPV6], ids=["ipv4", "ipv6"])
def test_the_tuple_space_finds_the_kernels_first_match(family, monkeypatch):
    """Overlapping rules of every kind the tuple space takes, some with address bits
    outside their masks (IPv6: ignored; IPv4: never matching) and some IPv6 ones with a
    protocol but no -p, against random packets: the model of the lookups finds the
    kernel's first rule, or hotdrop, or nothing, for each. (Tuples unlimited here:
    what is modelled is exactness, not cost.)"""
    monkeypatch.setattr(classifier, "MAX_TUPLES", 1 << 20)
    monkeypatch.setattr(classifier, "RULES_PER_TUPLE", 0)
    rng = random.Random(8)
    nets, ports = [], []
    rules = chain_rules("\n".join(run_lines(rng, 400, family, nets, ports)), family)
    for i, rule in enumerate(rules):
        if rng.random() < 0.05:
            rules[i] = unmasked(rule)
        elif family is IPV6 and rng.random() < 0.05 and not rule.matches:
            rules[i] = replace(rule, ip=rule.ip._replace(proto=rng.choice([6, 17, 300]),
                                                         proto_given=False))
    [run] = segments(rules, TupleSpace(family))
    assert isinstance(run, Run) and len(run.rules) == len(rules)
    found = {"match": 0, "deep": 0, "hotdrop": 0, "none": 0}
    for _ in range(6000):
        p = packet(rng, nets, ports, family)
        expected = kernel_first(rules, p, family)
        assert looked_up(run, p, family) == expected, p
        found["none" if expected is None else "hotdrop" if expected[1] == VERDICT_HOTDROP
              else "deep" if expected[0] > 100 else "match"] += 1
    assert min(found.values()) >= 50, found


def searched(run: MultiFieldRun, p: dict):
    """What multifield.emit_search's code finds, step by step (codegen's dispatch picks
    the projection for packets a port match would hotdrop), and codegen makes of it:
    (entry, verdict)."""
    hotdrops = (p["proto"] == 6 and (p["fragoff"] == 1 or (p["fragoff"] == 0 and p["l4"] < 20))) \
        or (p["proto"] == 17 and p["fragoff"] == 0 and p["l4"] < 8)
    best = multifield.PACKED_INF
    for t in run.ip_tuples if hotdrops else run.tuples:
        if best < t.first:
            break
        m = t.masks
        fields = (p["saddr"] & m.saddr, p["daddr"] & m.daddr, p["proto"] & m.proto,
                  p["sport"] & m.sport, p["dport"] & m.dport)
        slot = multifield.slot_index(fields, t.bits)
        table = t.slots - run.record_base
        first, count = struct.unpack_from("<II", run.records, table * 32 + slot * 8)
        assert count <= t.width <= 2 * multifield.MAX_BUCKET
        first += table   # a slot's records count from its table
        for at in range(first, first + count):
            (saddr, smask, daddr, dmask, splo, sphi, dplo, dphi, packed, proto, pmask,
             ports) = multifield._RECORD.unpack_from(run.records, at * 32)
            if packed >= best:
                break
            if (p["saddr"] & smask == saddr and p["daddr"] & dmask == daddr
                    and p["proto"] & pmask == proto
                    and (not ports or (p["fragoff"] == 0 and splo <= p["sport"] <= sphi
                                       and dplo <= p["dport"] <= dphi))):
                best = packed
                break
    return None if best == multifield.PACKED_INF else (run.base + (best >> 2), best & 3)


def test_a_classbench_acl_is_one_multifield_run_with_few_lookups():
    """2,000 rules over the whole address space: hundreds of tuples for the tuple
    space, a dozen or so merged ones."""
    rng = random.Random(11)
    rules = chain_rules("\n".join(acl_lines(rng, 2000, [], [], space="1.0.0.0/1")))
    [run] = segments(rules, TupleSpace())
    assert isinstance(run, MultiFieldRun) and run.rules == rules
    assert len(run.tuples) <= 16 and len(run.ip_tuples) <= 16
    tables = sum(1 << t.bits >> 2 for t in run.tuples + run.ip_tuples)
    assert run.record_count - tables <= 2 * len(rules)
    assert not run.keys   # no hash lookups: slot tables
    assert tables <= 4 * multifield.SLOTS_PER_KEY * len(rules)
    unmerged = {m for rule in rules for m in classifier.rule_keys(lower(rule), Family.IPV4)}
    assert len({masks for masks, *_ in unmerged}) > 100


def test_a_long_run_builds_its_projection_in_a_child_alike(monkeypatch):
    """Past PARALLEL_MIN rules the projection is built by a forked child beside the
    main structure: the run is the same, byte for byte, as one built in process."""
    rng = random.Random(12)
    rules = chain_rules("\n".join(acl_lines(rng, 1500, [], [], space="1.0.0.0/1")))

    def built():
        [run] = segments(rules, TupleSpace())
        return run.rules, run.tuples, run.ip_tuples, bytes(run.records)

    monkeypatch.setattr(multifield, "PARALLEL_MIN", 1 << 30)
    alone = built()
    monkeypatch.setattr(multifield, "PARALLEL_MIN", 1000)
    children = []
    real_child = forked.Child

    def child(fn, args):
        made = real_child(fn, args)
        children.append(made.pid)
        return made
    monkeypatch.setattr(forked, "Child", child)
    assert built() == alone
    assert len(children) == 1 and children[0] is not None


def test_multifield_finds_the_kernels_first_match():
    """Overlapping rules in a /16 (crowded buckets, finer tuples, hits deep in the
    run), against random packets: the model of the search finds the kernel's first
    rule, or hotdrop, or nothing, for each."""
    rng = random.Random(5)
    nets, ports = [], []
    rules = chain_rules("\n".join(acl_lines(rng, 800, nets, ports, space="10.0.0.0/12")))
    runs = segments(rules, TupleSpace())
    assert all(isinstance(s, MultiFieldRun) for s in runs)
    assert len(runs) == 1 or min(len(r.rules) for r in runs) > 16   # cut only where crowded
    found = {"match": 0, "deep": 0, "hotdrop": 0, "none": 0}
    for _ in range(4000):
        p = packet(rng, nets, ports)
        expected = kernel_first(rules, p)
        got = None
        for run in runs:
            got = searched(run, p)
            if got is not None:
                break
        assert got == expected, p
        found["none" if got is None else "hotdrop" if got[1] == VERDICT_HOTDROP
              else "deep" if got[0] > 200 else "match"] += 1
    assert min(found.values()) >= 50, found


def test_a_bucket_that_cannot_split_cuts_the_run(monkeypatch):
    """Rules alike in every field a key can hold share a bucket in each tuple they
    open (the coarse one and their finest); with both full the run is cut there and
    goes on in another, in order."""
    monkeypatch.setattr(multifield, "RULES_PER_LOOKUP", 0)
    rules = chain_rules("\n".join(
        f"-A INPUT -s 10.0.0.1 -d 10.0.0.2 -p tcp --sport {i}:{30000 + i} --dport 1000:60000 -j DROP"
        for i in range(50)))
    runs = segments(rules, TupleSpace())
    assert [len(r.rules) for r in runs] == [2 * multifield.MAX_BUCKET, 50 - 2 * multifield.MAX_BUCKET]
    assert [rule for run in runs for rule in run.rules] == rules


def test_what_covers_a_rule():
    """A covered rule is never first: not for whole packets, not for fragments (port
    rules never match them) nor hotdrops (the projection decides those)."""
    rules = chain_rules("\n".join([
        "-A INPUT -s 10.0.0.0/8 -p tcp -j DROP",
        "-A INPUT -s 10.1.0.0/16 -p tcp --dport 80 -j ACCEPT",
        "-A INPUT -s 10.1.0.0/16 -p tcp --dport 1:1000 -j ACCEPT",
        "-A INPUT -s 10.1.0.0/16 -p tcp -j ACCEPT",
        "-A INPUT -s 10.1.0.0/16 -j ACCEPT"]))
    ip_only, port80, ports, tcp16, any16 = (multifield.main_member(lower(r), r.entry)
                                               for r in rules)
    covers = multifield._covers
    assert covers(ip_only, port80) and covers(ip_only, tcp16) and covers(ports, port80)
    assert not covers(port80, ports) and not covers(ports, tcp16)   # a fragment matches tcp16
    assert not covers(ip_only, any16) and covers(any16, tcp16)


def test_a_run_of_jumps_is_one_run_whatever_its_number_of_chains():
    """kube-proxy's KUBE-SERVICES: one `-d VIP -p tcp --dport P -j KUBE-SVC-X` per
    service is one tuple, each key naming its chain among the run's calls."""
    decls = "\n".join(f":SVC{i} -" for i in range(300))
    rules = chain_rules(decls + "\n" + "\n".join(
        f"-A INPUT -d 172.30.{i // 256}.{i % 256} -p tcp --dport {80 + i % 3} -j SVC{i}"
        for i in range(300)))
    [run] = segments(rules, TupleSpace())
    assert isinstance(run, Run) and len(run.rules) == 300 and len(run.tuples) == 1
    assert [target.chain for target in run.calls] == [f"SVC{i}" for i in range(300)]
    assert sorted(value for _, value in run.keys.values() if value >= CALLS) == \
        list(range(CALLS, CALLS + 300))


def test_a_rule_sharing_the_key_of_a_jump_starts_a_new_run():
    """The lookup would find the -j rule again after its chain returns, never the later
    rule: that rule cannot be in the run (a -g, or a verdict, holding it can)."""
    decls = ":J -\n:G -\n"
    first = [f"-A INPUT -d 10.0.0.{i} -j J" for i in range(1, 21)]
    again = ["-A INPUT -d 10.0.0.3 -j ACCEPT"]
    rest = [f"-A INPUT -d 10.0.1.{i} -g G" for i in range(1, 21)] + ["-A INPUT -d 10.0.1.3 -j DROP"]
    a, b = segments(chain_rules(decls + "\n".join(first + again + rest)), TupleSpace())
    assert len(a.rules) == 20 and a.cut_by is b.rules[0] and len(b.rules) == 22
