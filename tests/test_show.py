"""`bpfilter show` on a table pinned the way the service pins it, with real packets
counted, read back from the bpffs alone (no service, no fd of ours left open)."""
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile

import pytest

from bpfilter import netns
from bpfilter.abi import codec
from bpfilter.decode import table_from_raw
from bpfilter.bpf import syscall as bpf
from bpfilter.loader import attach_slots, load_ruleset
from bpfilter.ext import describe_match
from bpfilter.listing import render
from bpfilter.model import Family
from bpfilter.show import show
from bpfilter.store import Store, TableKey
from bpfilter_lab.scratch import replace_blob
from test_disasm import bpftool_xlated, normalized

RULESET = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:LOCAL - [0:0]
-A OUTPUT -p udp -m udp --dport 9 -j DROP
-A OUTPUT -d 127.0.0.0/8 -j LOCAL
-A LOCAL -p udp -m udp --dport 7777 -j ACCEPT
COMMIT
"""
PAYLOAD = b"0123456789"
DATAGRAM = 20 + 8 + len(PAYLOAD)     # what skb->len counts at the IP hooks
ACCEPTED, DROPPED = 3, 2


@pytest.fixture
def bpffs():
    root = tempfile.mkdtemp(prefix="bpfilter-show-")
    subprocess.run(["mount", "-t", "bpf", "bpffs", root], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", root], check=True)
        os.rmdir(root)


def _send_traffic(netns_name: str) -> None:
    """Datagrams to a listener on 7777 (accepted) and to port 9 (dropped at OUTPUT,
    which sendto reports as EPERM); the listener keeps ICMP errors out of the counts."""
    with netns.entered(netns_name):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind(("127.0.0.1", 7777))
            rx.settimeout(5)
            for _ in range(ACCEPTED):
                tx.sendto(PAYLOAD, ("127.0.0.1", 7777))
                assert rx.recv(100) == PAYLOAD
            for _ in range(DROPPED):
                with pytest.raises(PermissionError):
                    tx.sendto(PAYLOAD, ("127.0.0.1", 9))


@pytest.fixture
def pinned(bpffs, fresh_netns):
    """A filter table pinned in `bpffs` and hooked in `fresh_netns`, traffic counted."""
    blob = replace_blob(RULESET)
    inum = os.stat(netns.path_of(fresh_netns)).st_ino
    key = TableKey(inum, 12345, Family.IPV4, "filter")
    store = Store(bpffs)
    ruleset = load_ruleset(table_from_raw(codec.parse_replace(blob)))
    try:
        slots = attach_slots(ruleset, fresh_netns)
        try:
            store.save_slots(key, slots)
            store.save_ruleset(key, ruleset, blob)
        finally:
            for slot in slots.values():
                slot.close()
    finally:
        ruleset.close()
    try:
        # Only the pins hold the table now: the traffic proves they filter.
        _send_traffic(fresh_netns)
        yield bpffs, fresh_netns, key
    finally:
        store.remove(key)


def _shown(capsys, root, **kwargs) -> str:
    fds = set(os.listdir("/proc/self/fd"))
    assert show(root, **kwargs) == 0
    assert set(os.listdir("/proc/self/fd")) == fds, "show() left file descriptors open"
    out, err = capsys.readouterr()
    assert err == ""
    return out


def _rule_counts(out: str, chain: str) -> list[tuple[int, int, str]]:
    """(packets, bytes, rest of the line) of each rule listed under `chain`."""
    lines = out.split(f"Chain {chain} ", 1)[1].splitlines()[2:]
    rules = []
    for line in lines:
        if not line.strip():
            break
        pkts, byts, rest = line.split(None, 2)
        rules.append((int(pkts), int(byts), rest))
    return rules


def test_nothing_pinned(bpffs, capsys):
    assert _shown(capsys, bpffs) == f"no tables pinned in {bpffs}\n"


def test_tables_with_live_counters(pinned, capsys):
    root, name, key = pinned
    out = _shown(capsys, root)
    assert out.startswith(f"# netns {key.inum} ({name}), cookie {key.cookie}: ipv4 table filter\n")
    assert f"Chain INPUT (policy ACCEPT {ACCEPTED} packets, {ACCEPTED * DATAGRAM} bytes)" in out
    assert "Chain FORWARD (policy DROP 0 packets, 0 bytes)" in out
    assert "Chain OUTPUT (policy ACCEPT 0 packets, 0 bytes)" in out
    assert "Chain LOCAL (1 references)" in out
    output = _rule_counts(out, "OUTPUT")
    assert [(p, b) for p, b, _ in output] == [(DROPPED, DROPPED * DATAGRAM),
                                              (ACCEPTED, ACCEPTED * DATAGRAM)]
    assert output[0][2].startswith("DROP") and output[0][2].endswith("udp dpt:9")
    assert output[1][2].startswith("LOCAL") and "127.0.0.0/8" in output[1][2]
    (local,) = _rule_counts(out, "LOCAL")
    assert local[:2] == (ACCEPTED, ACCEPTED * DATAGRAM) and local[2].endswith("udp dpt:7777")


def _pinned_objects(root: str, key: TableKey, hook: str) -> tuple[dict, int]:
    """The pinned link's info and the id of the ruleset program in the slot."""
    store = Store(root)
    link_fd = bpf.obj_get(store.path(key, f"link_{hook}"))
    array_fd = bpf.obj_get(store.path(key, f"slot_{hook}"))
    try:
        (prog_id,) = struct.unpack("<I", bpf.map_lookup(array_fd, struct.pack("<I", 0), 4))
        return bpf.link_info(link_fd), prog_id
    finally:
        os.close(link_fd)
        os.close(array_fd)


def test_bpf_objects_and_disassembly(pinned, capsys):
    root, _, key = pinned
    out = _shown(capsys, root, bpf=True)
    assert out.startswith(_shown(capsys, root))
    link, prog_id = _pinned_objects(root, key, "OUTPUT")
    section = out.split("\nOUTPUT: ", 1)[1].split("\n\n", 1)[0].splitlines()
    assert section[0] == f"link {link['id']} at ipv4 LOCAL_OUT, priority 0"
    assert re.fullmatch(rf"  dispatcher prog {link['prog_id']} bpfilter_OUT: 6 insns, "
                        r"\d+ bytes jited", section[1])
    assert re.fullmatch(rf"  ruleset    prog {prog_id} filter_OUTPUT: \d+ insns, \d+ bytes jited",
                        section[2])
    maps = [line for line in section if line.startswith("  map ")]
    # a counter per blob entry: 2 policies, OUTPUT's 3, LOCAL's head, rule and RETURN, the end
    assert re.fullmatch(r"  map \d+ percpu_array: 9 entries of 16 bytes, filter_ctrs", maps[0])
    assert re.fullmatch(r"  map \d+ prog_array: 1 entries of 4 bytes, filter_OUTPUT", maps[1])
    code = [line[2:] for line in section[3 + len(maps):]]
    assert normalized(code) == bpftool_xlated(prog_id)
    counters_id = maps[0].split()[1]
    assert any(line.endswith(f"r1 = map[id:{counters_id}]") for line in code)
    assert any(re.search(r"\(85\) call bpf_dynptr_slice#-?\d+$", line) for line in code)
    assert any(line.endswith("lock *(u64 *)(r0 +8) += r1") for line in code)
    assert "\nINPUT: " in out and "\nFORWARD: " in out


def test_command_line(pinned, capsys):
    root, _, _ = pinned
    for flags in ([], ["--bpf"]):
        done = subprocess.run([sys.executable, "-m", "bpfilter", "show", "--bpffs", root, *flags],
                              capture_output=True, text=True, check=True)
        assert done.stderr == ""
        assert done.stdout == _shown(capsys, root, bpf=bool(flags))


DESCRIBED = [
    "-m mark --mark 0x5/0xff", "-m mark ! --mark 0xffffffff",
    "-m pkttype --pkt-type broadcast", "-m pkttype ! --pkt-type host",
    "-m mac --mac-source 42:01:0A:03:04:05", "-m mac ! --mac-source 42:01:0A:03:04:05",
    "-p tcp --tcp-option 2", "-p tcp ! --tcp-option 255 --dport 22 --syn",
]


def test_matches_are_described_as_iptables_lists_them(fresh_netns):
    """Each match's text in `bpfilter show` is what `iptables-legacy -L -n` prints
    after the destination column for the same rule."""
    ruleset = "\n".join(["*filter", *(f"-A INPUT {r}" for r in DESCRIBED), "COMMIT", ""])
    subprocess.run(["ip", "netns", "exec", fresh_netns, "iptables-legacy-restore"],
                   input=ruleset, text=True, check=True)
    listed = subprocess.run(["ip", "netns", "exec", fresh_netns, "iptables-legacy", "-L", "INPUT",
                             "-n"], capture_output=True, text=True, check=True).stdout
    table = table_from_raw(codec.parse_replace(replace_blob(ruleset)))
    rules = table.chains["INPUT"].rules
    assert len(rules) == len(DESCRIBED)
    for rule, line in zip(rules, listed.splitlines()[2:]):
        text = " ".join(describe_match(m, Family.IPV4) for m in rule.matches)
        assert line.rstrip().endswith("0.0.0.0/0            " + text), (line, text)


LISTED = {
    Family.IPV4: """\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:a-chain - [0:0]
:b - [0:0]
-A INPUT -s 10.1.2.0/24 ! -d 10.9.0.0/255.255.0.255 -i eth+ -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT ! -p udp -f -j a-chain
-A INPUT ! -i lo ! -s 192.168.0.1 -g b
-A INPUT -p icmp -m icmp --icmp-type 8 -m comment --comment "ping me"
-A FORWARD ! -o veth0 -m mark --mark 0x4/0x6 -j DROP
-A a-chain -j RETURN
COMMIT
""",
    Family.IPV6: """\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:a-chain - [0:0]
-A INPUT -s 2001:db8::/32 ! -d ::ffff:10.0.0.1/128 -i eth+ -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT ! -p udp -j a-chain
-A INPUT -s 2001:db8::/ffff:0:ffff:: -p all -g a-chain
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT
-A OUTPUT -d ::1.2.3.4 -o lo -j DROP
-A a-chain -m hl --hl-lt 3 -j RETURN
COMMIT
""",
}


@pytest.mark.parametrize("family", list(Family), ids=["ipv4", "ipv6"])
def test_tables_are_listed_as_iptables_lists_them(fresh_netns, family):
    """`bpfilter show`'s listing is `iptables-legacy -L -v -n -x` to the byte (and
    ip6tables-legacy's for IPv6)."""
    command = {Family.IPV4: "iptables-legacy", Family.IPV6: "ip6tables-legacy"}[family]
    rules = LISTED[family]
    subprocess.run(["ip", "netns", "exec", fresh_netns, f"{command}-restore"], input=rules,
                   text=True, check=True)
    kernel = subprocess.run(["ip", "netns", "exec", fresh_netns, command, "-L", "-v", "-n", "-x"],
                            capture_output=True, text=True, check=True).stdout
    table = table_from_raw(codec.parse_replace(replace_blob(rules, family=family), family=family))
    assert render(table, [(0, 0)] * table.num_entries) == kernel
