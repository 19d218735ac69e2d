"""Work handed to a forked child: its result, or the caller's own when the child fails."""
import os
import signal
import subprocess
import sys
import time

from bpfilter import forked as forked_module
from bpfilter.forked import Child, forked

PARENT = os.getpid()


def square_unless_child_dies(n: int) -> int:
    if os.getpid() != PARENT:
        os._exit(3)   # the child crashes before it answers
    return n * n


def where(n: int) -> tuple[int, bool]:
    return n * n, os.getpid() == PARENT


def test_the_child_computes_the_result():
    with forked(where, 7) as child:
        assert child.pid is not None
    assert child.result() == (49, False)


def test_a_child_that_dies_leaves_the_work_to_the_caller():
    with forked(square_unless_child_dies, 7) as child:
        pass
    assert child.result() == 49


def test_a_block_that_raises_takes_the_child_down():
    try:
        with forked(where, 7) as child:
            pid = child.pid
            raise KeyError("the caller failed")
    except KeyError:
        pass
    assert child.pid is None and child.fd is None
    try:
        os.waitpid(pid, os.WNOHANG)
        raise AssertionError("the child was not reaped")
    except ChildProcessError:
        pass


def test_without_a_fork_the_caller_computes(monkeypatch):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", no_fork)
    child = Child(where, (7,))
    assert child.pid is None and child.result() == (49, True)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_child_closes_what_the_caller_keeps_from_it():
    """bpfilter.ko's device, held by a worker, would keep the module from unloading once
    the helper is gone: a fork copies it whatever its flags."""
    read, write = os.pipe()
    try:
        forked_module.close_in_children(write)
        with forked(_open, write) as child:
            pass
        assert child.result() is False
        forked_module.keep_in_children(write)
        with forked(_open, write) as child:
            pass
        assert child.result() is True
    finally:
        forked_module.keep_in_children(write)
        os.close(read)
        os.close(write)


WORKER = """
import sys, time
from bpfilter.forked import Child
child = Child(time.sleep, (60,))
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_dies_with_its_caller():
    """A helper killed (bpfilter.ko's timeout) takes its workers with it."""
    caller = subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pid = int(caller.stdout.readline())
    try:
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 2
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the worker outlived its caller"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
