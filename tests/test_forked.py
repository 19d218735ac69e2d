"""Work handed to a forked child: its result, or the caller's own when the child fails."""
import os

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
