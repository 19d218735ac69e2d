"""The fuzz targets: each turns one input into a call of bpfilter's code, and checks
the oracle that holds whatever the input is.

Oracle, every target: the code returns, or raises BpfilterError carrying a real errno
(the one the caller is answered with); any other exception is a finding (the service
would answer EIO, "internal error", and log a traceback). Targets also check what
they can say about the result (below, per target); `Finding` is such a failure.

- decoder: the first byte chooses the family (bit 0), whether the blob is decoded a
  second time against a previous table, as the service decodes a replace of a table in
  place (bit 1: both decodings must give the same model or the same errno), and
  whether the caller's optlen is given (bit 2: without it the blob is all the readable
  memory); the rest is the ipt_replace / ip6t_replace blob: codec.parse_replace and
  decode.table_from_raw, the service's `table_from_blob`.
- proto: a request header (proto.request, parsed as transport/unix.py parses it)
  followed by its payload, handled by a Service over a private bpffs in a scratch
  network namespace (the request's namespace), as the transport hands it over.
- klog: the first byte chooses the size class of a LOG record, the rest is the record
  (klog.Record) formatted into the kernel's line (klog.format_line), which either
  succeeds or raises klog.Unreproducible. The record is what our own BPF program
  writes, not a caller's bytes: fields the program only ever writes in a range (the
  level, checked at decode; the bytes captured, at most the record's class) are
  brought into it.
"""
from __future__ import annotations

import errno
import gc
import os
import subprocess
import tempfile
import uuid

from bpfilter import klog, proto
from bpfilter.bpf.syscall import BpfError
from bpfilter.decode import table_from_blob
from bpfilter.errors import BpfilterError
from bpfilter.model import Family
from bpfilter.service import Service
from bpfilter.store import Store


class Finding(AssertionError):
    """The oracle failed for an input without an exception of the code's own."""


def check_errno(err: BpfilterError) -> int:
    if not (isinstance(err.errno, int) and err.errno in errno.errorcode):
        raise Finding(f"{type(err).__name__} without a real errno: {err.errno!r} ({err})")
    return err.errno


class Target:
    name = ""
    max_len = 4096

    def open(self, seeds: "dict[str, bytes]") -> None:
        """Set up what inputs run against; `seeds` are the corpus' starting inputs."""

    def close(self) -> None:
        pass

    def one(self, data: bytes) -> str:
        """Run one input; what came of it (an errno's name, "ok", ...), for the
        run's counts."""
        raise NotImplementedError

    def idle(self) -> None:
        """Called every so many inputs: what the service does when it is idle."""


# ---------------------------------------------------------------- decoder

FAMILY_BIT, PREVIOUS_BIT, NO_OPTLEN_BIT = 1, 2, 4


def decoder_input(blob: bytes, family: Family, flags: int = 0) -> bytes:
    return bytes([flags | (FAMILY_BIT if family == Family.IPV6 else 0)]) + blob


def decoder_split(data: bytes) -> "tuple[int, Family, bytes, int | None]":
    flags, blob = data[0], data[1:]
    family = Family.IPV6 if flags & FAMILY_BIT else Family.IPV4
    return flags, family, blob, None if flags & NO_OPTLEN_BIT else len(blob)


def decode_outcome(blob: bytes, family: Family, optlen, previous=None):
    """("ok", model) or ("errno", errno, entry)."""
    try:
        _, table = table_from_blob(blob, family, optlen=optlen, previous=previous)
    except BpfilterError as err:
        return ("errno", check_errno(err), err.entry)
    return ("ok", table)


class Decoder(Target):
    name = "decoder"
    max_len = 1 << 14

    def open(self, seeds):
        # The previous table a replace is decoded against: each family's first seed
        # that decodes.
        self.previous: dict[Family, tuple] = {}
        for data in seeds.values():
            _, family, blob, _ = decoder_split(data)
            if family not in self.previous:
                try:
                    self.previous[family] = table_from_blob(blob, family)
                except BpfilterError:
                    continue

    def one(self, data: bytes) -> None:
        if not data:
            return "empty"
        flags, family, blob, optlen = decoder_split(data)
        fresh = decode_outcome(blob, family, optlen)
        if flags & PREVIOUS_BIT and family in self.previous:
            again = decode_outcome(blob, family, optlen, self.previous[family])
            if again != fresh:
                raise Finding(f"decoded against the previous table: {_brief(again)}, "
                              f"afresh: {_brief(fresh)}")
        return "ok" if fresh[0] == "ok" else errno.errorcode[fresh[1]]


def _brief(outcome) -> str:
    if outcome[0] == "ok":
        return f"a table of {outcome[1].num_entries} entries"
    return f"{errno.errorcode[outcome[1]]} at entry {outcome[2]}"


# ---------------------------------------------------------------- request protocol

HEADER_SIZE = proto.request.sizeof()


class Protocol(Target):
    """The Service in this process, over its own bpffs, its requests' namespace a
    scratch one: what a request makes it load and attach stays there."""
    name = "proto"
    max_len = 1 << 14

    def open(self, seeds):
        from bpfilter_lab import namespaces
        self.netns = f"bpft-fuzz-{uuid.uuid4().hex[:8]}"
        namespaces.add(self.netns)
        self.netns_fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        self.bpffs = tempfile.mkdtemp(prefix="bpft-fuzz-")
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpffs", self.bpffs], check=True)
        self.store = Store(self.bpffs)
        self.service = Service(self.store)

    def close(self) -> None:
        from bpfilter_lab import namespaces
        for key in list(self.service.tables):
            self.service.tables.pop(key).close()
            self.store.remove(key)
        self.service.close()
        subprocess.run(["umount", self.bpffs], check=True)
        os.rmdir(self.bpffs)
        os.close(self.netns_fd)
        namespaces.delete(self.netns)

    def one(self, data: bytes) -> None:
        if len(data) < HEADER_SIZE:
            return "short"    # the transport waits for the rest, then drops the client
        try:
            req = proto.request.parse(data[:HEADER_SIZE])
        except Exception:  # construct's errors: the transport answers EPROTO
            return "header"
        if req.len > proto.MAX_PAYLOAD:
            return "header"   # answered EINVAL by the transport, never read
        try:
            status, reply = self.service.handle(req, data[HEADER_SIZE:], self.netns_fd)
        except BpfilterError as err:
            return errno.errorcode[check_errno(err)]
        except BpfError as err:
            # the kernel refused a load or a map operation: its errno goes back
            if not err.errno:
                raise Finding(f"BpfError without an errno: {err}")
            return "bpf " + errno.errorcode.get(err.errno, str(err.errno))
        if not (isinstance(status, int) and isinstance(reply, bytes) and status <= 0):
            raise Finding(f"answer ({status!r}, {type(reply).__name__})")
        return "ok"

    def idle(self) -> None:
        # What Service.when_idle does once no request came for a while: the
        # collection its requests skip (they run with the collector paused and
        # freeze what they leave).
        gc.unfreeze()
        gc.collect()
        gc.freeze()


# ---------------------------------------------------------------- LOG records

CLASSES = sorted({c for f in klog.CAPTURE_CLASSES.values() for c in f})


def klog_record(data: bytes) -> bytes:
    captured = CLASSES[data[0] % len(CLASSES)]
    raw = bytearray(data[1:1 + klog.record_size(captured)].ljust(klog.record_size(captured), b"\0"))
    raw[klog.R_LEVEL] %= 8
    held = int.from_bytes(raw[klog.R_CAPTURED:klog.R_CAPTURED + 2], "little")
    raw[klog.R_CAPTURED:klog.R_CAPTURED + 2] = min(held, captured).to_bytes(2, "little")
    return bytes(raw)


class Klog(Target):
    name = "klog"
    max_len = 1 + klog.record_size(max(CLASSES))

    def one(self, data: bytes) -> None:
        if not data:
            return "empty"
        try:
            level, text = klog.format_line(klog.Record(klog_record(data)))
        except klog.Unreproducible:
            return "unreproducible"
        if not (isinstance(level, int) and 0 <= level <= 7):
            raise Finding(f"a line of level {level!r}: /dev/kmsg cannot be given it")
        if len(text) >= klog.S_SIZE:
            raise Finding(f"a line of {len(text)} bytes, longer than the kernel's buffer")
        return "line"


TARGETS = {t.name: t for t in (Decoder, Protocol, Klog)}
