"""iptables' requests from bpfilter.ko, through the /dev/bpfilter the module lets
only its spawned helper open."""
from __future__ import annotations

import os
import select
import shutil
import sys
import threading

from .. import forked, kmodule, proto
from ..errors import BpfilterError
from ..klog import KernelLog
from ..paths import DEFAULT_ROOT
from ..service import (SWEEP_INTERVAL, Service, handled, log,
                       log_to_kernel)
from ..store import Store, ensure_bpffs


def _read_exact(fd: int, size: int) -> bytes:
    """size bytes of a request the module has begun to hand us: it keeps the rest
    for us, so a non-blocking read that finds nothing only has to wait."""
    data = bytearray()
    while len(data) < size:
        try:
            chunk = os.read(fd, size - len(data))
        except BlockingIOError:
            select.select([fd], [], [])
            continue
        if not chunk:
            raise EOFError("the device closed")
        data += chunk
    return bytes(data)


def _discard(fd: int, size: int) -> None:
    """The payload of a request refused before it was read, let go of a piece at a time."""
    while size:
        size -= len(_read_exact(fd, min(size, 1 << 16)))


def _next_header(fd: int) -> bytes | None:
    """A request's header, or None if the one poll() announced is gone: the module
    takes back a request whose caller gave up before we began to read it, and a
    blocking read would then wait for the next caller, with the log and the sweep
    waiting behind it."""
    try:
        first = os.read(fd, proto.request.sizeof())
    except BlockingIOError:
        return None
    if not first:
        raise EOFError("the device closed")
    return first + _read_exact(fd, proto.request.sizeof() - len(first))


def _in_use(prefix: str) -> bool:
    """Whether a process maps a file under prefix, or holds one open."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if any(prefix in line for line in maps):
                    return True
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    return True
        except OSError:
            continue
    return False


def remove_stale_extractions(ours: str | None = getattr(sys, "_MEIPASS", None)) -> list[str]:
    """What helpers before us unpacked and left behind: PyInstaller's bootloader
    removes its _MEI* directory when its child exits, but bpfilter.ko kills both
    when a helper times out, and a helper killed while starting leaves a partial
    one. bpfilter.ko starts one helper at a time, all unpacking beside the helper
    (TMPDIR): a sibling of ours that nothing maps or holds open is dead. Returns
    what was removed."""
    if not ours:
        return []   # not frozen: nothing unpacked
    parent, removed = os.path.dirname(ours.rstrip("/")), []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if (not name.startswith("_MEI") or path == ours.rstrip("/") or os.path.islink(path)
                or not os.path.isdir(path) or _in_use(path + "/")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# Requests answered at once, each in its thread: bpfilter.ko hands out every caller's
# request as it comes, and one namespace's slow replace must not hold up another's
# listing (the service locks what two requests share). Past this many, the next
# request waits in the module, its payload not copied into our memory yet.
WORKERS = 16


class _Replies:
    """Replies written whole, one after the other, from the requests' threads."""

    def __init__(self, dev: int):
        self.dev, self.lock = dev, threading.Lock()

    def send(self, req, status: int, reply: bytes = b"") -> None:
        data = memoryview(proto.build_reply(status, reply, req.id))
        with self.lock:
            while data:
                data = data[os.write(self.dev, data):]


def serve_device(device: str, bpffs: str = DEFAULT_ROOT) -> None:
    """The helper of bpfilter.ko: requests come from /dev/bpfilter, which the module
    lets only the process it spawned open; the module already checked the caller's
    CAP_NET_ADMIN and put the caller's netns in our fd table."""
    log_to_kernel()
    for path in remove_stale_extractions():
        log(f"removed {path}, unpacked by a helper that was killed")
    ensure_bpffs(bpffs)
    dev = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    forked.close_in_children(dev)
    # conntrack, nat lookups, kernel matches: asked of the module, recovery included
    # (what it drops of a dead helper's work it gives back to the module)
    kmodule.use_device(dev)
    service = Service(Store(bpffs), beside_ip_tables=False)
    kernel_log = KernelLog(service.log_ring, log)
    log(f"serving bpfilter.ko through {device}, tables pinned under {bpffs}")
    waiting = select.poll()
    waiting.register(dev, select.POLLIN)
    waiting.register(service.log_ring, select.POLLIN)
    replies = _Replies(dev)
    slots = threading.BoundedSemaphore(WORKERS)
    workers: set[threading.Thread] = set()

    def answer(req, payload: bytes, netns_fd, reservation) -> None:
        try:
            # bpfilter.ko prints refusals itself, with the caller's context
            status, reply = handled(service, req, payload, netns_fd, log_refusals=False,
                                    reservation=reservation)
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
            slots.release()
        try:
            replies.send(req, status, reply)
        except OSError:
            pass   # the module let go of us: the main loop finds out too
        finally:
            workers.discard(threading.current_thread())

    try:
        while True:
            idle = not workers
            if idle:
                service.sweep()
            ready = {fd for fd, _ in waiting.poll(SWEEP_INTERVAL * 1000)}
            if not ready and idle:
                service.when_idle()
            if service.log_ring.fileno() in ready:
                kernel_log.drain()
            if dev not in ready:
                continue
            slots.acquire()
            try:
                header = _next_header(dev)
                if header is None:
                    slots.release()
                    continue
                req = proto.request.parse(header)
                try:
                    reservation = service.reserve(req, req.pid)
                except BpfilterError as err:   # bpfilter.ko prints it, as other refusals
                    if req.netns_fd >= 0:
                        os.close(req.netns_fd)
                    _discard(dev, req.len)
                    replies.send(req, -err.errno, str(err).encode())
                    slots.release()
                    continue
                try:
                    payload = _read_exact(dev, req.len)
                except BaseException:
                    reservation.release()
                    raise
            except BaseException:
                slots.release()
                raise
            netns_fd = req.netns_fd if req.netns_fd >= 0 else None
            if req.op == proto.Op.SHUTDOWN:
                reservation.release()
                slots.release()
                # what callers who gave up left running ends first
                for worker in list(workers):
                    worker.join()
                log("bpfilter.ko is unloading: detaching every table")
                kernel_log.drain()
                service.close()
                for key in list(service.store.keys()):
                    service.store.remove(key)
                replies.send(req, 0)
                return
            worker = threading.Thread(target=answer, args=(req, payload, netns_fd, reservation),
                                      name=f"request {req.id}", daemon=True)
            workers.add(worker)
            worker.start()
    finally:
        kmodule.use_device(None)
        forked.keep_in_children(dev)
        os.close(dev)
        if not service.closed:
            kernel_log.drain()
        kernel_log.close()
        service.close()
