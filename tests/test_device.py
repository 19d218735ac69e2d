"""bpfilter.ko's device loop (transport/device.py) on a stand-in for /dev/bpfilter:
a FIFO, and a poll() that says what the test needs it to."""
import os
import select
import socket
import subprocess
import threading
import time

import pytest

from bpfilter import memory, proto
from bpfilter.transport import device


class _Stop(Exception):
    pass


class _Ring:
    """The LOG ring's place in poll(): a pipe nobody writes to."""
    def __init__(self):
        self.read, self.write = os.pipe()

    def fileno(self):
        return self.read


class _Service:
    closed = False

    def __init__(self, store, beside_ip_tables=True):
        self.log_ring = _Ring()
        self.store = {}         # the pinned tables SHUTDOWN detaches: none
        self.budget = memory.Budget()

    def reserve(self, req, caller_pid):
        return self.budget.reserve(0, None)

    def sweep(self):
        pass

    def when_idle(self):
        pass

    def close(self):
        self.closed = True


class _Log:
    def __init__(self, *args):
        pass

    def drain(self):
        pass

    def close(self):
        pass


@pytest.fixture
def loop(monkeypatch, tmp_path):
    """serve_device on a FIFO nobody writes to, whose poll() reports it readable once
    (a request the module took back: its caller gave up before we read it), then
    ends the loop."""
    polls = []

    class Poll:
        def register(self, fd, events):
            pass

        def poll(self, timeout):
            polls.append(timeout)
            if len(polls) == 1:
                return [(dev_fd[0], select.POLLIN)]
            raise _Stop

    dev_fd = []
    real_open = os.open

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        if path == str(fifo):
            dev_fd.append(fd)
        return fd

    fifo = tmp_path / "bpfilter"
    os.mkfifo(fifo)
    for name, value in (("log_to_kernel", lambda: None), ("ensure_bpffs", lambda root: None),
                        ("Service", _Service), ("Store", lambda root: None),
                        ("KernelLog", _Log)):
        monkeypatch.setattr(device, name, value)
    monkeypatch.setattr(device.select, "poll", Poll)
    monkeypatch.setattr(device.os, "open", open_)
    monkeypatch.setattr(device.kmodule, "use_device", lambda fd: None)
    return fifo, polls


def test_a_request_taken_back_after_poll_does_not_block_the_loop(loop):
    fifo, polls = loop
    ended = []

    def serve():
        try:
            device.serve_device(str(fifo), "/nonexistent")
        except BaseException as e:
            ended.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.join(2)
    if thread.is_alive():
        # unblock it (a header it refuses) so that it does not outlive the test
        with open(fifo, "wb") as f:
            f.write(bytes(64))
        thread.join(2)
        pytest.fail("the loop blocked in read() after poll() said readable")
    assert len(polls) == 2 and isinstance(ended[0], _Stop), ended


def test_a_killed_helpers_extraction_is_removed_by_the_next(tmp_path):
    """_MEI* directories beside ours that no process maps or holds open are left by
    killed helpers (bpfilter.ko's timeout); ours, one in use and anything else stay."""
    for name in ("_MEIours", "_MEIstale", "_MEIbusy", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "libpython.so").write_bytes(b"x")
    holder = subprocess.Popen(["sleep", "30"], stdin=open(tmp_path / "_MEIbusy" / "libpython.so"))
    try:
        removed = device.remove_stale_extractions(str(tmp_path / "_MEIours"))
    finally:
        holder.kill()
        holder.wait()
    assert removed == [str(tmp_path / "_MEIstale")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_MEIbusy", "_MEIours", "other"]
def _request(id_: int, op=proto.Op.GETSOCKOPT, payload: bytes = b"") -> bytes:
    return proto.request.build(dict(version=proto.VERSION, op=op, family=2, optname=64,
                                    netns_cookie=id_, netns_inum=id_, pid=1, len=len(payload),
                                    netns_fd=-1, id=id_)) + payload


def _reply(sock: socket.socket) -> tuple:
    head = proto.reply.parse(sock.recv(proto.reply.sizeof(), socket.MSG_WAITALL))
    body = sock.recv(head.len, socket.MSG_WAITALL) if head.len else b""
    return head.id, head.status, body


def test_requests_are_answered_each_in_its_thread_by_id(monkeypatch):
    """bpfilter.ko hands out every caller's request at once: one that takes long (a big
    replace in one namespace) does not hold up the next (another's listing), whose reply
    comes first, carrying its id; SHUTDOWN waits for what is still running."""
    ours, theirs = socket.socketpair()
    slow = threading.Event()

    def handled(service, req, payload, netns_fd, log_refusals=True, reservation=None):
        if req.id == 1:
            slow.wait(10)
        reservation.release()
        return 0, f"answer {req.id}".encode()

    for name, value in (("log_to_kernel", lambda: None), ("ensure_bpffs", lambda root: None),
                        ("Service", _Service), ("Store", lambda root: None),
                        ("KernelLog", _Log),
                        ("handled", handled)):
        monkeypatch.setattr(device, name, value)
    monkeypatch.setattr(device.os, "open", lambda path, flags, *args: os.dup(ours.fileno()))
    monkeypatch.setattr(device.kmodule, "use_device", lambda fd: None)
    ended = []
    thread = threading.Thread(target=lambda: ended.append(device.serve_device("dev", "/x")),
                              daemon=True)
    thread.start()
    theirs.settimeout(1)
    theirs.sendall(_request(1, payload=b"big replace"))
    theirs.sendall(_request(2))
    started = time.monotonic()
    assert _reply(theirs) == (2, 0, b"answer 2")
    assert time.monotonic() - started < 1
    theirs.sendall(_request(3, op=proto.Op.SHUTDOWN))
    with pytest.raises(socket.timeout):
        _reply(theirs)      # not before request 1 is done
    theirs.settimeout(10)
    slow.set()
    assert _reply(theirs) == (1, 0, b"answer 1")
    assert _reply(theirs) == (3, 0, b"")
    thread.join(5)
    assert ended == [None]
