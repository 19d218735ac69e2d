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
"""
from __future__ import annotations

import os
import pickle
import signal
from contextlib import contextmanager
from typing import Callable, Iterator


class Child:
    """fn(*args), computed by a forked child from its creation on."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args
        self.pid = self.fd = None
        try:
            read, write = os.pipe()
        except OSError:
            return
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            return
        if pid == 0:   # the child: compute, answer, and leave without running anything else
            status = 1
            try:
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
