"""What filters in a lab target: the kernel's own legacy tables (the reference), bpfilter's
programs loaded directly, or bpfilter's service reached through `bpfilter exec`.

A backend has load(lab, target, ruleset, family), counters(lab, target, family) and
close(lab, target); counters are (packets, bytes) per table entry, in blob order.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from typing import Callable, Mapping, Sequence

from bpfilter.abi import codec, families, sockopt
from bpfilter.loader import load_filter_table
from bpfilter.model import Family
from bpfilter.netns import entered, path_of

from .scratch import RESTORE, replace_blob


def entry_counters(entries: bytes, family: Family) -> list[tuple[int, int]]:
    """(packets, bytes) of every entry of a GET_ENTRIES answer's entry table."""
    layout = families.of(family)
    out, off = [], 0
    while off < len(entries):
        out.append(struct.unpack_from("<QQ", entries, off + layout.counters_at))
        off += layout.next_offset_field.unpack_from(entries, off + layout.next_offset_at)[0]
    return out


def kernel_counters(netns: str, table: str = "filter",
                    family: Family = Family.IPV4) -> list[tuple[int, int]]:
    """(packets, bytes) per entry of the kernel's `table` of `family` in `netns`."""
    with entered(netns):
        size = codec.parse_getinfo(sockopt.get_info(table, family))["size"]
        entries = codec.parse_get_entries(sockopt.get_entries(table, size, family))["entries"]
    return entry_counters(entries, family)


def restore_in(netns: str, ruleset: str, family: Family = Family.IPV4) -> None:
    """The ruleset into the kernel's legacy tables of `family` in `netns`."""
    argv = ["ip", "netns", "exec", netns, RESTORE[family], "-w", "10"]
    done = subprocess.run(argv, input=ruleset, text=True, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")


class KernelBackend:
    """The kernel's own iptables and ip6tables in the target namespace: the reference."""

    def load(self, lab, target: str, ruleset: str, family: Family = Family.IPV4) -> None:
        restore_in(lab.netns(target), ruleset, family)

    def counters(self, lab, target: str, family: Family = Family.IPV4) -> list[tuple[int, int]]:
        return kernel_counters(lab.netns(target), family=family)

    def close(self, lab, target: str) -> None:
        pass


class BpfilterBackend:
    """bpfilter's BPF programs, loaded from the blob the kernel made of the ruleset."""

    def __init__(self) -> None:
        self.loaded: dict[Family, object] = {}

    def load(self, lab, target: str, ruleset: str, family: Family = Family.IPV4) -> None:
        blob = replace_blob(ruleset, family=family)
        self._unload(family)
        self.loaded[family] = load_filter_table(blob, lab.netns(target), family=family)

    def counters(self, lab, target: str, family: Family = Family.IPV4) -> list[tuple[int, int]]:
        return list(self.loaded[family].counters())

    def close(self, lab, target: str) -> None:
        for family in list(self.loaded):
            self._unload(family)

    def _unload(self, family: Family) -> None:
        table = self.loaded.pop(family, None)
        if table is not None:
            table.close()


BACKENDS: dict[str, Callable[[], object]] = {"kernel": KernelBackend,
                                              "bpfilter": BpfilterBackend}


# ---------------------------------------------------------------- the service

def service_request(socket_path: str, netns_path: str, op: int, optname: int = 0,
                    payload: bytes = b"", family: int = Family.IPV4) -> tuple[int, bytes]:
    """One request to a running `bpfilter serve` (kmod/bpfilter_proto.h), made as
    the preload shim makes it for a caller passing payload as optval: the namespace
    `netns_path` names rides along by SCM_RIGHTS. Returns (status, reply payload)."""
    from bpfilter import proto

    ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        request = proto.build_request(op, family, optname, payload,
                                      netns_inum=os.fstat(ns_fd).st_ino, pid=os.getpid())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(socket_path)
            sent = s.sendmsg([request],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", ns_fd))])
            if sent < len(request):   # a large table's GET_ENTRIES outgrows the socket buffer
                s.sendall(request[sent:])
            data = b""
            while len(data) < proto.reply.sizeof():
                chunk = s.recv(proto.reply.sizeof() - len(data))
                if not chunk:
                    raise ConnectionResetError(f"{socket_path} hung up without a reply")
                data += chunk
            reply = proto.reply.parse(data)
            body = b""
            while len(body) < reply.len:
                chunk = s.recv(reply.len - len(body))
                if not chunk:
                    raise ConnectionResetError(f"{socket_path} hung up mid-reply")
                body += chunk
    finally:
        os.close(ns_fd)
    return reply.status, body


def service_counters(socket_path: str, netns_path: str, table: str = "filter",
                     family: Family = Family.IPV4) -> list[tuple[int, int]]:
    """(packets, bytes) per entry of the service's `table` for the namespace at
    netns_path, read with the GET_INFO/GET_ENTRIES options as iptables reads them
    (ip6tables' have the same numbers)."""
    from bpfilter import proto
    from bpfilter.abi import xtables as X

    status, info = service_request(socket_path, netns_path, proto.Op.GETSOCKOPT,
                                   X.IPT_SO_GET_INFO, codec.getinfo_request(table), family)
    if status:
        raise OSError(-status, f"SO_GET_INFO: {info.decode(errors='replace')}")
    size = codec.parse_getinfo(info)["size"]
    status, reply = service_request(socket_path, netns_path, proto.Op.GETSOCKOPT,
                                    X.IPT_SO_GET_ENTRIES, codec.get_entries_request(table, size),
                                    family)
    if status:
        raise OSError(-status, f"SO_GET_ENTRIES: {reply.decode(errors='replace')}")
    return entry_counters(codec.parse_get_entries(reply)["entries"], family)


class ServiceBackend:
    """bpfilter's service, reached as a person reaches it: the unmodified
    iptables-legacy-restore (ip6tables-legacy-restore) under `bpfilter exec` loads the
    ruleset (starting a service on `socket_path` if none answers there), and the
    counters come back from the service with the same socket options iptables uses."""

    def __init__(self, socket_path: str, bpffs: "str | None" = None,
                 env: "Mapping[str, str] | None" = None) -> None:
        self.socket_path, self.bpffs = socket_path, bpffs
        self.env = dict(os.environ if env is None else env, BPFILTER_SOCKET=socket_path)
        if bpffs is not None:
            self.env["BPFILTER_BPFFS"] = bpffs

    def exec(self, lab, target: str, argv: Sequence[str],
             stdin: "str | None" = None) -> subprocess.CompletedProcess:
        """argv in the target's namespace under `bpfilter exec`."""
        return subprocess.run(["ip", "netns", "exec", lab.netns(target), sys.executable, "-m",
                               "bpfilter", "exec", "--", *argv],
                              input=stdin, text=True, capture_output=True, env=self.env,
                              timeout=60)

    def load(self, lab, target: str, ruleset: str, family: Family = Family.IPV4) -> None:
        done = self.exec(lab, target, [RESTORE[family], "-w", "10"], ruleset)
        if done.returncode:
            raise RuntimeError(f"{RESTORE[family]} through bpfilter exec failed "
                               f"({done.returncode}): {done.stderr.strip()}")

    def counters(self, lab, target: str, family: Family = Family.IPV4) -> list[tuple[int, int]]:
        return service_counters(self.socket_path, path_of(lab.netns(target)), family=family)

    def close(self, lab, target: str) -> None:
        pass   # the service drops the table once the lab deletes the namespace
