"""bpfilter from the inside: its INPUT program run by BPF_PROG_TEST_RUN, what its
maps and programs take, and where the time of loading a ruleset goes."""
from __future__ import annotations

import glob
import os
import struct
import time
from contextlib import contextmanager
from typing import Iterator

from bpfilter import loader
from bpfilter import decode
from bpfilter.bpf import syscall as bpf
from bpfilter.bpf.asm import Assembler
from bpfilter.errors import BpfilterError
from bpfilter.model import Family
from bpfilter.netfilter import NF_ACCEPT, NF_INET_LOCAL_IN
from bpfilter.store import CURRENT
from bpfilter_lab.packets import Packet

from netlab import PAYLOAD
from rules import IPV4, IPV6, Flow

# rules' families as bpfilter names them
FAMILY = {IPV4: Family.IPV4, IPV6: Family.IPV6}

BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_PERCPU = {bpf.BPF_MAP_TYPE_PERCPU_ARRAY, bpf.BPF_MAP_TYPE_PERCPU_HASH,
           BPF_MAP_TYPE_LRU_PERCPU_HASH}


def table_dir(bpffs: str, netns: str, family: int) -> str:
    """The pins of the filter table of `family` bpfilter holds for the named netns."""
    inum = os.stat(f"/run/netns/{netns}").st_ino
    found = glob.glob(os.path.join(bpffs, f"{inum}-*", f"ipv{family}-filter"))
    if len(found) != 1:
        raise RuntimeError(f"bpfilter holds {len(found)} filter tables for {netns} in {bpffs}")
    return found[0]


@contextmanager
def input_program(pins: str) -> Iterator[int]:
    """The ruleset program the INPUT slot holds now."""
    slot = bpf.obj_get(os.path.join(pins, "slot_INPUT"))
    try:
        prog_id = struct.unpack("<I", bpf.map_lookup(slot, struct.pack("<I", 0), 4))[0]
    finally:
        os.close(slot)
    fd = bpf.prog_get_fd_by_id(prog_id)
    try:
        yield fd
    finally:
        os.close(fd)


def test_packet(flow: Flow) -> bytes:
    return Packet(flow.src, flow.dst, "udp", flow.sport, flow.dport,
                  payload_len=PAYLOAD[flow.family]).build(1, 1)


def ns_per_packet(prog_fd: int, flow: Flow, repeat: int) -> float:
    """Mean run time of the program on `flow`'s packet at LOCAL_IN; it must accept it."""
    verdict, ns = bpf.nf_test_run(prog_fd, NF_INET_LOCAL_IN, test_packet(flow), repeat=repeat)
    if verdict != NF_ACCEPT:
        raise RuntimeError(f"bpfilter's INPUT program gave verdict {verdict} for {flow}")
    return float(ns)


def _map_bytes(info: dict) -> int:
    """key + value per entry, the value once per possible CPU for per-CPU maps."""
    value = info["value_size"]
    if info["type"] in _PERCPU:
        value = (value + 7) // 8 * 8 * bpf.possible_cpus()
    return (info["key_size"] + value) * info["max_entries"]


def footprint(pins: str, prog_fd: int) -> dict:
    """Every map of the table (pinned or used by the INPUT program) and the size of
    the INPUT program before and after JIT."""
    maps: dict[int, dict] = {}

    def note(fd: int) -> None:
        info = bpf.map_info(fd)
        maps[info["id"]] = dict(info, bytes=_map_bytes(info))

    # the table's own pins and those of its committed generation (store.py), maps only
    generation = os.path.join(pins, os.readlink(os.path.join(pins, CURRENT)))
    paths = [os.path.join(d, n) for d in (pins, generation) for n in sorted(os.listdir(d))]
    for path in paths:
        name = os.path.basename(path)
        if name.startswith(("link_", "prog_")) or not os.path.isfile(path) or os.path.islink(path):
            continue
        fd = bpf.obj_get(path)
        try:
            note(fd)
        finally:
            os.close(fd)
    prog = bpf.prog_info(prog_fd)
    for map_id in prog["map_ids"]:
        if map_id not in maps:
            fd = bpf.map_get_fd_by_id(map_id)
            try:
                note(fd)
            finally:
                os.close(fd)
    return {"map_bytes": sum(m["bytes"] for m in maps.values()),
            "maps": {m["name"]: {k: m[k] for k in ("type", "key_size", "value_size",
                                                    "max_entries", "bytes")}
                     for m in maps.values()},
            "xlated_insns": prog["xlated_prog_len"] // 8,
            "jited_bytes": prog["jited_prog_len"]}


# Where loader.load_filter_table spends its time, by the functions it calls for each
# stage; the service runs the same path for every IPT_SO_SET_REPLACE.
STAGES = {
    "parse": (decode, "parse_replace"),         # the ipt_replace blob, validated
    "decode": (decode, "table_from_raw"),       # into the rule model
    "compile": (loader, "compile_table"),       # into instructions
    "assemble": (Assembler, "assemble"),        # labels, far jumps, encoding
    "verify": (bpf, "prog_load"),               # BPF_PROG_LOAD: the kernel's verifier and JIT
}


@contextmanager
def _stopwatch() -> Iterator[dict]:
    spent = {stage: 0.0 for stage in STAGES}
    originals = {stage: getattr(owner, attr) for stage, (owner, attr) in STAGES.items()}

    def timed(stage, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - start
        return wrapper

    for stage, (owner, attr) in STAGES.items():
        setattr(owner, attr, timed(stage, originals[stage]))
    try:
        yield spent
    finally:
        for stage, (owner, attr) in STAGES.items():
            setattr(owner, attr, originals[stage])


def replay_load(blob: bytes, family: int) -> dict:
    """Load the blob ip(6)tables-legacy-restore sends (without attaching), timing each
    stage; a refusal ends the replay where the service's load ends too."""
    start = time.perf_counter()
    error = None
    with _stopwatch() as spent:
        try:
            loader.load_filter_table(blob, attach=False, family=FAMILY[family]).close()
        except (BpfilterError, OSError) as err:
            error = str(err).splitlines()[0]
    return {"stages_s": spent, "total_s": time.perf_counter() - start, "error": error}
