"""Each target's seed corpus: real inputs, from which the fuzzer mutates.

- decoder: the blobs the real iptables-legacy-restore / ip6tables-legacy-restore hand
  the kernel (read back from the kernel's table, as bpfilter_lab.scratch does), for the
  ABI tests' base ruleset, the real-world rulesets of tests/realworld, the random
  rulesets of tests/rulegen.py with every match bpfilter implements, and a table
  bpfilter only refuses (nat).
- proto: a request of every kind the shim and bpfilter.ko send (GET_INFO, GET_ENTRIES,
  GET_REVISION_*, SET_REPLACE, SET_ADD_COUNTERS, TABLE_NAMES), both families.
- klog: the records a LOG rule writes for real packets of both families (TCP with
  options, UDP, ICMP errors quoting a packet, IPv6 extension headers).
"""
from __future__ import annotations

import glob
import os
import struct
import subprocess

from bpfilter import klog, proto
from bpfilter.abi import families, sockopt
from bpfilter.abi import xtables as X
from bpfilter.model import Family
from bpfilter.netns import entered

import targets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESTORE = {Family.IPV4: "iptables-legacy-restore", Family.IPV6: "ip6tables-legacy-restore"}
NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
      ":POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o lo -j MASQUERADE\nCOMMIT\n"


def rulesets(family: Family, generated: int) -> "list[str]":
    from rulegen import generate
    from test_abi_validation import BASE
    # a small blob first: it is mutated through more of its fields per input
    out = [BASE[family], NAT]
    suffix = ".ip6.rules" if family == Family.IPV6 else ".rules"
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "realworld", "*.rules"))):
        if path.endswith(".ip6.rules") == (family == Family.IPV6):
            with open(path) as f:
                out.append(f.read())
    assert len(out) > 2, f"no tests/realworld/*{suffix}"
    out += [generate(seed, n_cases=0, more=True, extras=True, family=family)[0]
            for seed in range(generated)]
    return out


def kernel_blobs(family: Family, generated: int = 6) -> "list[bytes]":
    """The replace blob of every table of every ruleset, as restore wrote it."""
    from bpfilter_lab import namespaces
    blobs = []
    with namespaces.scratch("bpft-seed") as ns:
        for text in rulesets(family, generated):
            done = subprocess.run(["ip", "netns", "exec", ns, RESTORE[family]], input=text,
                                  text=True, capture_output=True)
            if done.returncode:
                raise RuntimeError(f"{RESTORE[family]} refused a seed ruleset: {done.stderr}")
            tables = [line[1:].strip() for line in text.splitlines() if line.startswith("*")]
            with entered(ns):
                blobs += [sockopt.read_replace(t, family) for t in tables]
    return blobs


def decoder() -> "dict[str, bytes]":
    """Blobs up to the decoder's max_len: each input costs time linear in its size, and
    a seed cut short is only an EFAULT."""
    seeds = {}
    for family in (Family.IPV4, Family.IPV6):
        for i, blob in enumerate(kernel_blobs(family)):
            if len(blob) >= targets.Decoder.max_len:
                continue
            name = f"{family.name.lower()}-{i}"
            seeds[name] = targets.decoder_input(blob, family)
            seeds[name + "-prev"] = targets.decoder_input(blob, family, targets.PREVIOUS_BIT)
    return seeds


def request(op, family: Family, optname: int = 0, payload: bytes = b"") -> bytes:
    return proto.build_request(op, family, optname, payload, pid=1)


# the initial filter table: its three policies and the final ERROR entry
INITIAL_ENTRIES = 4
NUM_COUNTERS_AT = X.ipt_replace.sizeof() - 12


def protocol() -> "dict[str, bytes]":
    seeds = {}
    for family in (Family.IPV4, Family.IPV6):
        f = family.name.lower()
        name = X.name_field("filter", X.XT_TABLE_MAXNAMELEN)
        revision = X.xt_get_revision.build(dict(name=X.name_field("tcp", X.XT_EXTENSION_MAXNAMELEN),
                                                revision=0))
        blob = bytearray(kernel_blobs(family, generated=0)[0])
        struct.pack_into("<I", blob, NUM_COUNTERS_AT, INITIAL_ENTRIES)
        get = proto.Op.GETSOCKOPT
        abi = families.of(family)
        seeds.update({
            f"{f}-info": request(get, family, X.IPT_SO_GET_INFO,
                                 name + bytes(X.SIZEOF_IPT_GETINFO - len(name))),
            f"{f}-entries": request(get, family, X.IPT_SO_GET_ENTRIES,
                                    name + struct.pack("<I", 0) + bytes(8)),
            f"{f}-revision": request(get, family, abi.so_get_revision_match, revision),
            f"{f}-replace": request(proto.Op.SETSOCKOPT, family, X.IPT_SO_SET_REPLACE, bytes(blob)),
            f"{f}-counters": request(proto.Op.SETSOCKOPT, family, X.IPT_SO_SET_ADD_COUNTERS,
                                     name + struct.pack("<I", INITIAL_ENTRIES)
                                     + bytes(X.SIZEOF_XT_COUNTERS * INITIAL_ENTRIES)),
            f"{f}-names": request(proto.Op.TABLE_NAMES, family),
        })
    return seeds


def log_record(packet: bytes, family: Family, level: int = 4, prefix: bytes = b"fw: ",
               inside: bool = True, logflags: int = 0) -> bytes:
    """The record a LOG rule writes for `packet`, as test_targets.line_of makes it:
    arrived on eth0 with a MAC header when `inside`, else sent through lo."""
    captured = next(c for c in klog.CAPTURE_CLASSES[family] if c >= min(len(packet), 1280))
    record = bytearray(klog.record_size(captured))
    struct.pack_into("<IIIBB", record, 0, klog.PROC_NET_INIT_INO, 0, len(packet), level, logflags)
    struct.pack_into("<H", record, klog.R_CAPTURED, min(len(packet), captured))
    record[klog.R_FAMILY] = family
    record[klog.R_PREFIX:klog.R_PREFIX + len(prefix)] = prefix
    if inside:
        record[klog.R_IN:klog.R_IN + 4] = b"eth0"
        record[klog.R_MAC_READ] = klog.MAC_COPIED
        struct.pack_into("<HHHH", record, klog.R_DEV_TYPE, klog.ARPHRD_ETHER, klog.ETH_HLEN,
                         0, klog.ETH_HLEN)
        record[klog.R_MAC:klog.R_MAC + 14] = bytes(range(12)) + (
            b"\x08\x00" if family == Family.IPV4 else b"\x86\xdd")
    else:
        record[klog.R_OUT:klog.R_OUT + 2] = b"lo"
    record[klog.R_PACKET:klog.R_PACKET + captured] = packet[:captured]
    return bytes([targets.CLASSES.index(captured)]) + bytes(record)


def klog_seeds() -> "dict[str, bytes]":
    from bpfilter_lab.packets import Fragment, HopByHop, Packet, Routing, icmpv6_error
    four, six = ("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2")
    packets = {
        Family.IPV4: [Packet(*four, "tcp", tcp_options=b"\x02\x04\x05\xb4\x01\x01\x04\x02"),
                      Packet(*four, "udp"), Packet(*four, "icmp"),
                      Packet(*four, "icmp", icmp_type=3, icmp_code=3,
                             quoted=Packet(*four[::-1], "tcp")),
                      Packet(*four, "tcp", frag_offset=3, options=b"\x94\x04\x00\x00"),
                      Packet(*four, 50), Packet(*four, 132)],
        Family.IPV6: [Packet(*six, "tcp"), Packet(*six, "udp", ext=[HopByHop(), Routing()]),
                      Packet(*six, "udp", ext=[Fragment(offset=1)]), Packet(*six, "icmp"),
                      icmpv6_error(*six, Packet(*six[::-1], "udp")), Packet(*six, 51)],
    }
    seeds = {}
    for family, made in packets.items():
        for i, p in enumerate(made):
            built = p if isinstance(p, bytes) else p.build(1, 1)
            for inside in (True, False):
                # every flag (TCP sequence and options, IP options, uid, MAC decoding)
                # for the packets that arrived, none for those sent
                seeds[f"{family.name.lower()}-{i}-{'in' if inside else 'out'}"] = log_record(
                    built, family, i % 8, inside=inside, logflags=0x2F if inside else 0)
    return seeds


SEEDS = {"decoder": decoder, "proto": protocol, "klog": klog_seeds}


def write(target: str, directory: str) -> int:
    """Write the target's seeds into `directory` (made if missing); how many."""
    os.makedirs(directory, exist_ok=True)
    made = SEEDS[target]()
    for name, data in made.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return len(made)
