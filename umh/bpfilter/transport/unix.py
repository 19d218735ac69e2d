"""iptables' requests over a unix socket: `bpfilter serve`, and what `bpfilter exec`'s
preload shim connects to. The peer's credentials stand in for the kernel's
CAP_NET_ADMIN check; the request format is bpfilter.ko's (kmod/bpfilter_proto.h)."""
from __future__ import annotations

import array
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

from .. import proto
from ..errors import BpfilterError
from ..klog import KernelLog
from ..paths import DEFAULT_ROOT, DEFAULT_SOCKET
from ..service import SWEEP_INTERVAL, Service, handled, log
from ..store import Store, ensure_bpffs

CAP_NET_ADMIN = 12
CLIENT_TIMEOUT = 5.0


def peer_may_administer(sock: socket.socket) -> bool:
    """The kernel demands CAP_NET_ADMIN for iptables' socket options; the peer must
    hold it (effective) in the service's user namespace, the one owning what it
    attaches."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        with open(f"/proc/{pid}/status") as status:
            caps = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
        same_userns = os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")
    except OSError:
        return False
    return same_userns and bool(caps & (1 << CAP_NET_ADMIN))


class _Probe(Exception):
    pass


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk, ancdata, _, _ = sock.recvmsg(size - len(data), socket.CMSG_SPACE(4 * 4))
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
        if not chunk:
            if not data and not fds:
                raise _Probe()
            raise BpfilterError(errno.EPROTO, f"client hung up after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def serve_connection(service: Service, conn: socket.socket) -> None:
    conn.settimeout(CLIENT_TIMEOUT)
    fds: list[int] = []
    try:
        try:
            header = _recv_exact(conn, proto.request.sizeof(), fds)
            req = proto.request.parse(header)
        except _Probe:
            return   # a connect-and-close: someone checking that we listen
        except (BpfilterError, OSError) as err:
            log(f"dropped a client: {err}")
            return
        except Exception as err:   # construct's errors: the magic is wrong
            log(f"garbage on the socket ({type(err).__name__}): ignored")
            conn.sendall(proto.build_reply(-errno.EPROTO, b"bad request header"))
            return
        if req.len > proto.MAX_PAYLOAD:
            conn.sendall(proto.build_reply(-errno.EINVAL, b"payload too large"))
            return
        try:
            payload = _recv_exact(conn, req.len, fds)
        except (BpfilterError, OSError) as err:
            log(f"dropped a client: {err}")
            return
        status, reply = _answer(service, conn, req, payload, fds[0] if fds else None)
        conn.sendall(proto.build_reply(status, reply))
    except OSError as err:
        log(f"client went away: {err}")
    finally:
        for fd in fds:
            os.close(fd)


def _answer(service: Service, conn, req, payload: bytes, netns_fd) -> tuple[int, bytes]:
    # The kernel's /proc/net/ip_tables_names is root's to read (0440), CAP_NET_ADMIN
    # or not; only root reaches this socket (0600).
    if req.op != proto.Op.TABLE_NAMES and not peer_may_administer(conn):
        log(f"pid {req.pid}: refused, the caller lacks CAP_NET_ADMIN")
        return -errno.EPERM, b"permission denied: iptables needs CAP_NET_ADMIN"
    return handled(service, req, payload, netns_fd)


def serve(socket_path: str = DEFAULT_SOCKET, bpffs: str = DEFAULT_ROOT, ready=None) -> None:
    ensure_bpffs(bpffs)
    service = Service(Store(bpffs))
    os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(socket_path)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    kernel_log = KernelLog(service.log_ring, log)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log(f"serving on {socket_path}, tables pinned under {bpffs}")
    if ready:
        ready()
    next_sweep = 0.0
    try:
        while True:
            if time.monotonic() >= next_sweep:
                service.sweep()
                next_sweep = time.monotonic() + SWEEP_INTERVAL
            ready = select.select([listener, service.log_ring], [], [], SWEEP_INTERVAL)[0]
            if service.log_ring in ready:
                kernel_log.drain()
            if listener in ready:
                conn, _ = listener.accept()
                with conn:
                    serve_connection(service, conn)
            else:
                service.when_idle()
    finally:
        listener.close()
        kernel_log.drain()
        kernel_log.close()
        service.close()
