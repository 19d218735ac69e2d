"""Work done in a child process beside the caller's own.

Compiling a long chain holds the interpreter, and leaves the machine's other cores
idle: a part of the work that depends only on what the caller already has is handed to
a forked child, which sees it as it is (copy on write, nothing to send) and sends back
only its result, pickled. Whatever goes wrong with the child (no fork, a crash, a bad
answer), the work is done in the caller instead: the result never depends on it.

The service serves requests in threads, and a child has only the thread that forked
it: a lock another thread held at the fork stays held in the child forever. So fn is
pure computation on what it is given (no lock of ours, no I/O but its pipe, no
import); the interpreter's own locks are made anew in the child, and it leaves by
os._exit, running nothing else (no atexit, no flush of a buffer another thread held).

A child is the caller's helper and nothing more: it dies with the thread that forked it
(PR_SET_PDEATHSIG), so that a helper killed for a timeout leaves no worker running, and
it closes the files registered with close_in_children() (bpfilter.ko's /dev/bpfilter):
a fork copies every descriptor, O_CLOEXEC or not, and a worker holding the device open
would keep the module from unloading after its helper is gone.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
from contextlib import contextmanager
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1

# descriptors a forked child closes first: the caller's, never its work's
_not_inherited: set[int] = set()


def close_in_children(fd: int) -> None:
    _not_inherited.add(fd)


def keep_in_children(fd: int) -> None:
    """Before fd is closed: its number may be reused for a file the work needs."""
    _not_inherited.discard(fd)


def become_worker(parent: int) -> None:
    """In the child, before the work: die with the parent, drop what is not ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0):
        os._exit(1)
    if os.getppid() != parent:   # the parent died before the signal was asked for
        os._exit(1)
    for fd in list(_not_inherited):
        try:
            os.close(fd)
        except OSError:
            pass


class Child:
    """fn(*args), computed by a forked child from its creation on."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args
        self.pid = self.fd = None
        try:
            read, write = os.pipe()
        except OSError:
            return
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            return
        if pid == 0:   # the child: compute, answer, and leave without running anything else
            status = 1
            try:
                become_worker(parent)
                os.close(read)
                data = pickle.dumps(fn(*args), pickle.HIGHEST_PROTOCOL)
                with os.fdopen(write, "wb") as out:
                    out.write(data)
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        self.pid, self.fd = pid, read

    def result(self):
        """The child's answer, once it has given it; computed here if it gave none."""
        if self.pid is None:
            return self.fn(*self.args)
        with os.fdopen(self.fd, "rb") as pipe:
            self.fd = None
            data = pipe.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if status == 0 and data:
            return pickle.loads(data)
        return self.fn(*self.args)

    def abandon(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextmanager
def forked(fn: Callable, *args) -> Iterator[Child]:
    """A child computing fn(*args) while the block runs; its result() is to be asked
    for after it. A block that raises takes the child down with it."""
    child = Child(fn, args)
    try:
        yield child
    except BaseException:
        child.abandon()
        raise
