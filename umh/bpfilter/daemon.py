"""Running the service: in the foreground, as a daemon, and stopping it for good."""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
import traceback

from . import ctnetns, netns
from .errors import BpfilterError
from .service import log
from .transport.unix import serve
from .store import Store


def _paths(socket_path: str) -> tuple[str, str, str]:
    return socket_path + ".pid", socket_path + ".lock", os.path.join(
        os.path.dirname(socket_path), "bpfilter.log")


def _lock(socket_path: str) -> int:
    """One service per socket and bpffs: a second would fight over the same pins."""
    os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
    fd = os.open(_paths(socket_path)[1], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"bpfilter: a service already runs for {socket_path}")
    return fd


def _ancestry() -> "list[int]":
    """This process and its ancestors, up to PID 1 of our pid namespace."""
    chain = [os.getpid()]
    while chain[-1] != 1:
        with open(f"/proc/{chain[-1]}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        if ppid == 0:
            break
        chain.append(ppid)
    return chain


def _host_namespaces() -> "int | None":
    """A process in the host's network and mount namespaces, or None when those are
    ours: PID 1, where we may look at it; some sandboxes deny that even to root,
    and then the outermost ancestor we may look at stands in for it."""
    for pid in reversed(_ancestry()):
        try:
            theirs = [os.stat(f"/proc/{pid}/ns/{ns}") for ns in ("net", "mnt")]
        except OSError:
            continue
        ours = [os.stat(f"/proc/self/ns/{ns}") for ns in ("net", "mnt")]
        same = all((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) for a, b in zip(theirs, ours))
        return None if same else pid
    return None


def _enter_host_namespaces() -> None:
    """The service outlives whoever started it (a daemon), and would keep its
    namespaces alive: started in `ip netns exec blue`, it would keep blue's network
    namespace alive after `ip netns del blue` (and every table in it attached), and
    pin its tables in a private mount namespace (`ip netns exec` makes one, with its
    own /sys) that no one else sees. So it moves to the host's, while it is still
    one thread (setns refuses a mount namespace to a threaded process), before it
    binds or pins anything."""
    owner = _host_namespaces()
    if owner is None:
        return
    # opened both before entering either: /proc may differ once the mounts do
    fds = {nstype: os.open(f"/proc/{owner}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
           for ns, nstype in (("net", netns.CLONE_NEWNET), ("mnt", netns.CLONE_NEWNS))}
    try:
        for nstype, fd in fds.items():
            netns.enter_for_good(fd, nstype)
    except OSError as err:   # a container may forbid it: serve where we are
        log(f"cannot move to the host's namespaces (those of pid {owner}): {err}; "
            f"the service keeps those it was started in")
    finally:
        for fd in fds.values():
            os.close(fd)


def run_service(socket_path: str, bpffs: str, daemon: bool) -> int:
    # entering a mount namespace moves to its root: paths from here on are absolute
    socket_path, bpffs = os.path.abspath(socket_path), os.path.abspath(bpffs)
    _enter_host_namespaces()
    if not daemon:
        _lock(socket_path)
        serve(socket_path, bpffs)
        return 0
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        ok = os.read(ready_r, 1) == b"1"
        if not ok:
            print(f"bpfilter: the service did not start; see {_paths(socket_path)[2]}",
                  file=sys.stderr)
        return 0 if ok else 1
    os.close(ready_r)
    os.setsid()
    pidfile, _, logfile = _paths(socket_path)
    status = 1
    try:
        _lock(socket_path)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        serve(socket_path, bpffs, ready=lambda: os.write(ready_w, b"1"))
        status = 0
    except SystemExit as stop:
        status = 0 if stop.code in (0, None) else 1
        if status:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _running(pid: int) -> bool:
    """Whether pid still runs. A daemon's parent is init, which may be slow to reap
    it (or, in some containers, never does): a zombie holds nothing any more."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _service_holds_lock(socket_path: str) -> bool:
    try:
        fd = os.open(_paths(socket_path)[1], os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def stop_service(socket_path: str) -> None:
    pidfile = _paths(socket_path)[0]
    # After a crash the pid file is stale and its pid may be someone else's now.
    if not _service_holds_lock(socket_path):
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        return
    try:
        pid = int(open(pidfile).read())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    for _ in range(100):
        if not _running(pid):
            break
        time.sleep(0.05)
    if os.path.exists(pidfile):
        os.unlink(pidfile)


def flush(socket_path: str, bpffs: str) -> int:
    """Stop the service, then detach and unpin every table it left behind."""
    stop_service(socket_path)
    store = Store(bpffs)
    count = 0
    for key in list(store.keys()):
        store.remove(key)
        count += 1
        log(f"detached table {key.table} of netns {key.inum}")
        where = netns.find(key.inum)
        if where is not None:
            try:
                # as the kernel drops conntrack with its last user
                ctnetns.release(where, key.family)
            except BpfilterError as err:
                log(f"netns {key.inum}: {err}")
    print(f"bpfilter: flushed {count} table(s)")
    return 0
