"""`bpfilter check [-4|-6] [FILE]`: every table of an iptables-save (ip6tables-save)
file through what the service does with it — the kernel's checks, bpfilter's
refusals, compilation and the kernel's verifier — with nothing attached.

The file goes to the unmodified iptables-legacy-restore (ip6tables-legacy-restore),
as it would go to bpfilter.ko or `bpfilter exec`; the preload shim sends its socket
options to a private responder here, which starts every table as the kernel's fresh
one, and for each table the restore replaces runs the service's pipeline. A table
bpfilter refuses is reported and the restore goes on to the next; a table the
kernel itself would refuse fails the restore, as it would fail it on the kernel.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Optional

from . import memory, proto
from .abi import codec, families
from .abi import xtables as X
from .bpf.syscall import BpfError
from .decode import table_from_raw
from .errors import BpfilterError
from .klog import ANSWER_REFS, LogRing
from .localroutes import LocalRoutes
from .sharedstate import SharedState
from .loader import load_ruleset
from .model import Family
from .tables import kernel_tables

RESTORE = {Family.IPV4: "iptables-legacy-restore", Family.IPV6: "ip6tables-legacy-restore"}


@dataclass
class Outcome:
    table: str
    refusal: Optional[str] = None            # why bpfilter refuses it, if it does
    programs: list[tuple[str, int]] = field(default_factory=list)   # (name, instructions)


class _Responder:
    """Answers iptables' socket options as a namespace of fresh kernel tables would,
    and runs each replacement through the pipeline (the interface
    transport.unix.serve_connection drives)."""

    def __init__(self, family: Family):
        self.family, self.abi = family, families.of(family)
        self.tables: dict[str, X.RawTable] = {}
        self.outcomes: list[Outcome] = []

    def table(self, name: str) -> X.RawTable:
        if name not in self.tables:
            if name not in kernel_tables(self.family):
                raise BpfilterError(errno.ENOENT, f"no table named {name!r}")
            blob = codec.initial_replace(name, self.family)
            self.tables[name] = codec.parse_replace(blob, family=self.family)
        return self.tables[name]

    def reserve(self, req, caller_pid: int) -> memory.Reservation:
        """Nothing: what a check spends is its own process's memory."""
        return memory.Reservation(None, 0, None)

    def handle(self, req, payload: bytes, netns_fd: Optional[int]) -> tuple[int, bytes]:
        from .service import get_answer   # the service's own answer
        if req.op == proto.Op.GETSOCKOPT:
            return get_answer(self.abi, req.optname, req.optlen, payload,
                              lambda name: codec.getinfo_bytes(self.table(name)), self._entries)
        if req.op == proto.Op.SETSOCKOPT and req.optname == X.IPT_SO_SET_REPLACE:
            return self._replace(payload)
        return 0, b""   # ADD_COUNTERS: nothing to count into

    def _entries(self, name: str, size: int) -> bytes:
        raw = self.table(name)
        zeros = bytes(X.SIZEOF_XT_COUNTERS * len(raw.entries))
        return codec.with_counters(raw, codec.kernel_entries(raw), zeros)

    def _replace(self, blob: bytes) -> tuple[int, bytes]:
        raw = codec.parse_replace(blob, optlen=len(blob), family=self.family)
        outcome = Outcome(raw.name)
        self.outcomes.append(outcome)
        try:
            table = table_from_raw(raw)
        except BpfilterError as err:
            if err.errno != errno.EOPNOTSUPP:
                raise            # the kernel would refuse it: so does the restore
            outcome.refusal = str(err)
        else:
            outcome.refusal, outcome.programs = _verify(table)
        self.tables[raw.name] = raw
        return 0, bytes(X.SIZEOF_XT_COUNTERS * raw.num_counters)


def _verify(table) -> tuple[Optional[str], list[tuple[str, int]]]:
    """Compile and load the table's programs as the service would (LOG rules with a
    ring of their own), then let them go."""
    ring, routes, shared = LogRing.create(), LocalRoutes.create(), SharedState.create()
    try:
        ruleset = load_ruleset(table, {**ring.maps(), **ring.maps(ANSWER_REFS),
                                       **routes.maps(), **shared.maps()})
    except (BpfilterError, BpfError) as err:   # the verifier's refusal is bpfilter's too
        return str(err), []
    finally:
        ring.close()
        routes.close()
        shared.close()
    try:
        return None, [(r.program.name, r.insn_count) for r in ruleset.hooks.values()]
    finally:
        ruleset.close()


def guess_family(text: str) -> Family:
    """What an -save file holds, when not told: ip6tables-save signs its output and
    writes IPv6 addresses (::/0 at least in -L output, and in rules with an address)
    and ICMPv6 names. A file with none of these reads the same in both families."""
    if re.search(r"(^|[\s/])[0-9a-fA-F]*::|ip6tables|ipv6-icmp|icmpv6|-m (hl|rt|frag|hbh|dst|mh|eui64|"
                 r"ipv6header)\b", text, re.M):
        return Family.IPV6
    return Family.IPV4


def check(text: str, family: Family) -> tuple[int, list[Outcome], str]:
    """(the restore's exit status, the outcome of each table it replaced, its stderr)."""
    from .execute import shim_path
    from .transport.unix import serve_connection
    responder = _Responder(family)
    with tempfile.TemporaryDirectory(prefix="bpfilter-check-") as tmp:
        path = os.path.join(tmp, "check.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    serve_connection(responder, conn)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        env = dict(os.environ, LD_PRELOAD=shim_path(), BPFILTER_SOCKET=path)
        try:
            done = subprocess.run([RESTORE[family]], input=text, text=True, env=env,
                                  capture_output=True)
        finally:
            stop.set()
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            server.join()
    return done.returncode, responder.outcomes, done.stderr


def run(path: str, family: Optional[Family]) -> int:
    text = sys.stdin.read() if path == "-" else open(path).read()
    family = family or guess_family(text)
    status, outcomes, stderr = check(text, family)
    command = families.of(family).command
    for outcome in outcomes:
        if outcome.refusal:
            print(f"{command} table {outcome.table}: REFUSED: {outcome.refusal}")
        else:
            hooks = ", ".join(f"{name} {count} insns" for name, count in outcome.programs)
            print(f"{command} table {outcome.table}: ok ({hooks}; verified by the kernel)")
    if status:
        print(f"{RESTORE[family]} failed ({status}): {stderr.strip()}")
        return 1
    if not outcomes:
        print(f"{RESTORE[family]} replaced no table")
    return 1 if any(o.refusal for o in outcomes) else 0
