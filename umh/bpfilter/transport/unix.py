"""iptables' requests over a unix socket: `bpfilter serve`, and what `bpfilter exec`'s
preload shim connects to. The peer's credentials stand in for the kernel's
CAP_NET_ADMIN check; the request format is bpfilter.ko's (kmod/bpfilter_proto.h).
Each connection is served in its own thread, with a deadline for its whole request:
a slow client holds only its own."""
from __future__ import annotations

import array
import errno
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from .. import proto
from ..errors import BpfilterError
from ..answers import Answers
from ..klog import KernelLog
from ..paths import DEFAULT_ROOT, DEFAULT_SOCKET
from ..service import SWEEP_INTERVAL, Service, handled, log
from ..store import Store, ensure_bpffs

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_NET_ADMIN = 1, 2, 12
SO_PEERPIDFD = 77   # Linux 6.5
# The whole request, from the connection to its last byte: a client that trickles
# it holds its own thread that long, and no one else.
CLIENT_TIMEOUT = 5.0
# Connections served at once, in all and per peer process: what tricklers can hold.
MAX_CONNECTIONS = 64
MAX_PER_PEER = 8
SWITCH_INTERVAL = 0.001


@dataclass
class Peer:
    pid: int
    fsuid: int
    caps: int            # effective
    same_userns: bool    # as the service's, which owns what it attaches


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        return next(int(line.split()[1]) for line in info if line.startswith("Pid:"))


def peer(sock: socket.socket) -> Optional[Peer]:
    """The connected process's credentials now, or None if it is gone. Read
    through a pidfd of the process itself (SO_PEERPIDFD): a pid alone may by
    then name another process that reused it. Its /proc entry is read, then the
    pidfd says whether the process still lives: if so, the pid was still its own
    while it was read."""
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as err:
        if err.errno != errno.ENOPROTOOPT:
            return None
        # before 6.5: the pid SO_PEERCRED saw, which may have been reused already
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
    try:
        pid = _pidfd_pid(pidfd)
        if pid <= 0:   # gone (-1), or outside our pid namespace (0)
            return None
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        same_userns = os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")
        signal.pidfd_send_signal(pidfd, 0)
    except (OSError, StopIteration, KeyError, ValueError):
        return None
    finally:
        os.close(pidfd)
    try:
        return Peer(pid, int(fields["Uid"].split()[3]), int(fields["CapEff"], 16), same_userns)
    except (KeyError, IndexError, ValueError):
        return None


def peer_may_administer(who: Optional[Peer]) -> bool:
    """The kernel demands CAP_NET_ADMIN for iptables' socket options; the peer must
    hold it (effective) in the service's user namespace."""
    return who is not None and who.same_userns and bool(who.caps & (1 << CAP_NET_ADMIN))


def peer_may_list(who: Optional[Peer]) -> bool:
    """The kernel's /proc/net/ip_tables_names is root's, mode 0440: readable by its
    owner (fsuid 0) or whoever may override read permissions, CAP_NET_ADMIN or not."""
    dac = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
    return who is not None and who.same_userns and (who.fsuid == 0 or bool(who.caps & dac))


class _Probe(Exception):
    pass


def _recv_exact(sock: socket.socket, size: int, fds: list[int], deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BpfilterError(errno.ETIMEDOUT, f"client sent {len(data)} of {size} bytes "
                                                 f"in {CLIENT_TIMEOUT:g} s")
        sock.settimeout(left)
        try:
            chunk, ancdata, _, _ = sock.recvmsg(size - len(data), socket.CMSG_SPACE(4 * 4))
        except socket.timeout:
            continue
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
    deadline = time.monotonic() + CLIENT_TIMEOUT
    fds: list[int] = []
    try:
        try:
            header = _recv_exact(conn, proto.request.sizeof(), fds, deadline)
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
        # as the kernel: the caller's capability, then its memory, then its bytes
        who = peer(conn)
        try:
            _check_peer(req, who)
            reservation = service.reserve(req, who.pid)
        except BpfilterError as err:
            log(f"pid {who.pid if who else req.pid}: refused: {err}")
            _discard(conn, req.len, deadline)
            conn.sendall(proto.build_reply(-err.errno, str(err).encode()))
            return
        try:
            payload = _recv_exact(conn, req.len, fds, deadline)
        except (BpfilterError, OSError, _Probe) as err:
            reservation.release()
            log(f"dropped a client: {err or 'it hung up'}")
            return
        status, reply = handled(service, req, payload, fds[0] if fds else None,
                                reservation=reservation)
        # the reply too: a client that does not read it holds its thread no longer
        conn.settimeout(CLIENT_TIMEOUT)
        conn.sendall(proto.build_reply(status, reply))
    except (BpfilterError, OSError) as err:
        log(f"client went away: {err}")
    finally:
        for fd in fds:
            os.close(fd)


def _check_peer(req, who: Optional[Peer]) -> None:
    if req.op == proto.Op.TABLE_NAMES:
        if not peer_may_list(who):
            raise BpfilterError(errno.EACCES, "permission denied: the table names are root's "
                                              "to read")
    elif not peer_may_administer(who):
        raise BpfilterError(errno.EPERM, "permission denied: iptables needs CAP_NET_ADMIN")


def _discard(sock: socket.socket, size: int, deadline: float) -> None:
    """The payload of a request refused before it was read, read and let go of a
    piece at a time: the client reads our answer once it has sent it all."""
    fds: list[int] = []
    try:
        while size:
            size -= len(_recv_exact(sock, min(size, 1 << 16), fds, deadline))
    finally:
        for fd in fds:
            os.close(fd)


class _Connections:
    """The connections being served, each by its thread; at most MAX_CONNECTIONS
    in all and MAX_PER_PEER per peer process. Beyond, a connection is refused at
    once (EAGAIN) rather than left waiting behind those."""

    def __init__(self, service: Service):
        self.service = service
        self.lock = threading.Lock()
        self.per_peer: dict[int, int] = {}
        self.threads: set[threading.Thread] = set()

    def take(self, conn: socket.socket) -> None:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        with self.lock:
            full = (len(self.threads) >= MAX_CONNECTIONS
                    or self.per_peer.get(pid, 0) >= MAX_PER_PEER)
            if not full:
                self.per_peer[pid] = self.per_peer.get(pid, 0) + 1
                thread = threading.Thread(target=self._serve, args=(conn, pid), daemon=True,
                                          name=f"bpfilter client {pid}")
                self.threads.add(thread)
        if full:
            log(f"pid {pid}: refused a connection, too many at once")
            with conn:
                try:
                    conn.setblocking(False)
                    conn.sendall(proto.build_reply(-errno.EAGAIN, b"too many requests at once"))
                except OSError:
                    pass
            return
        thread.start()

    def _serve(self, conn: socket.socket, pid: int) -> None:
        try:
            with conn:
                serve_connection(self.service, conn)
        finally:
            with self.lock:
                self.threads.discard(threading.current_thread())
                self.per_peer[pid] -= 1
                if not self.per_peer[pid]:
                    del self.per_peer[pid]

    def wait(self, timeout: float) -> None:
        """A moment for the requests under way to finish (a replace cut short is
        sound, but its caller is told nothing); not longer: `bpfilter flush` waits
        for the service to go only so long."""
        end = time.monotonic() + timeout
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(max(end - time.monotonic(), 0))


def _housekeeping(service: Service, stop: threading.Event) -> None:
    """The sweep and the idle work, beside the requests rather than between them:
    neither delays anyone's answer."""
    while not stop.wait(SWEEP_INTERVAL):
        try:
            service.sweep()
            service.when_idle()
        except Exception as err:   # never the end of sweeping
            log(f"housekeeping failed: {err!r}")


def _draining(kernel_log: KernelLog, ring, stop: threading.Event) -> None:
    """The ring's records (LOG lines, REJECT answers) as they come, beside the
    requests: a flood of them delays no one's answer."""
    while not stop.is_set():
        try:
            if select.select([ring], [], [], SWEEP_INTERVAL)[0]:
                kernel_log.drain()
        except Exception as err:   # never the end of draining
            log(f"draining the ring failed: {err!r}")


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
    listener.listen(128)
    kernel_log = KernelLog(service.log_ring, log, answers=Answers())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # A thread waiting for the interpreter gets it after at most this long: a
    # request's thread takes it back after each of its system calls, so this,
    # times a few dozen, is how long a long compile of another namespace holds an
    # answer up (5 ms by default).
    sys.setswitchinterval(SWITCH_INTERVAL)
    log(f"serving on {socket_path}, tables pinned under {bpffs}")
    if ready:
        ready()
    connections = _Connections(service)
    stop = threading.Event()
    service.sweep()
    sweeper = threading.Thread(target=_housekeeping, args=(service, stop), daemon=True,
                               name="bpfilter housekeeping")
    sweeper.start()
    drainer = threading.Thread(target=_draining, args=(kernel_log, service.log_ring, stop),
                               daemon=True, name="bpfilter ring")
    drainer.start()
    try:
        while True:
            conn, _ = listener.accept()
            connections.take(conn)
    finally:
        listener.close()
        stop.set()
        sweeper.join()
        drainer.join()
        connections.wait(1.0)
        kernel_log.drain()
        kernel_log.close()
        service.close()
