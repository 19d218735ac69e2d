"""No caller of `bpfilter serve` holds up another (issue 13): a long replace in one
namespace, a client that trickles its request, a netns descriptor that is not one;
and who the service believes its callers are, where it runs, what it says when the
kernel's own table is in its way.

Each test has its own service and namespaces (test_service.py's fixtures).
"""
from __future__ import annotations

import errno
import os
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from bpfilter import netns, proto
from bpfilter.abi import codec
from bpfilter.abi import xtables as X
from bpfilter_lab import namespaces
from test_service import LOCAL_RULES, PY, SHIM, Service, inum_of, nets, svc  # noqa: F401

pytestmark = pytest.mark.kernel

ANSWER_WITHIN = 1.0   # the bound for root's `iptables -L` while another runs


def shim_env(svc: Service) -> dict:
    """The environment `bpfilter env` gives: iptables itself, no interpreter started.
    With an xtables lock of its own, as in a container: a restore holds the lock
    it shares with every iptables (of any namespace) for as long as it runs."""
    return dict(svc.env, LD_PRELOAD=SHIM, BPFILTER_SOCKET=svc.socket,
                XTABLES_LOCKFILE=os.path.join(svc.dir, "xtables-other.lock"))


def timed_list(svc: Service, ns: str) -> float:
    """Seconds root's `iptables-legacy -L -n` in ns takes, through the shim."""
    started = time.monotonic()
    done = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy", "-L", "-n"],
                          env=shim_env(svc), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 0 and "Chain INPUT" in done.stdout, done.stderr
    return took


def send_request(sock: socket.socket, fd: int, op: int, optname: int = 0,
                 payload: bytes = b"") -> None:
    request = proto.build_request(op, 2, optname, payload, pid=os.getpid())
    sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])


def read_reply(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while len(data) < proto.reply.sizeof():
        chunk = sock.recv(proto.reply.sizeof() - len(data))
        assert chunk, "the service hung up without a reply"
        data += chunk
    reply = proto.reply.parse(data)
    body = b""
    while len(body) < reply.len:
        chunk = sock.recv(reply.len - len(body))
        assert chunk
        body += chunk
    return reply.status, body


def get_info(svc: Service, fd: int, timeout: float = 30) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(svc.socket)
        send_request(s, fd, proto.Op.GETSOCKOPT, X.IPT_SO_GET_INFO,
                     codec.getinfo_request("filter"))
        return read_reply(s)


# ---------------------------------------------------------------- no one waits for another

def test_a_long_replace_holds_up_no_other_namespace(svc, nets):
    """While one namespace's restore of a large (valid) table is compiled, root's
    `iptables -L` in another is answered within a second, every time."""
    big, other = nets(2)
    svc.ok(other, "iptables-legacy-restore", input=LOCAL_RULES)
    # Large enough that the replace itself outlasts the bound twice over, or this
    # would prove nothing (the single-threaded service answered each -L at most that
    # late); how large that is depends on the compiler, so it grows until it does.
    # Rules each with its own device, address and port: no classifier takes them,
    # each is code for the verifier to walk.
    for size in (4000, 8000, 16000):
        text = "*filter\n" + "".join(
            f"-A INPUT -i veth{i % 97} -s 10.{i >> 8 & 255}.{i & 255}.1 -p tcp --dport {1 + i} "
            "-j DROP\n" for i in range(size)) + "COMMIT\n"
        restore = subprocess.Popen(["ip", "netns", "exec", big, PY, "-m", "bpfilter", "exec",
                                    "--", "iptables-legacy-restore"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=svc.env)
        feeder = threading.Thread(target=restore.communicate, args=(text,))
        feeder.start()
        during, after = [], []   # how long each -L took that ended while the restore ran, after
        while restore.poll() is None:
            took = timed_list(svc, other)
            (during if restore.poll() is None else after).append(took)
            time.sleep(0.05)
        feeder.join()
        assert restore.returncode == 0
        replaced = re.findall(r"table filter replaced in (\d+\.\d+) s .*?: (\d+) entries",
                              svc.log_text())
        assert replaced and int(replaced[-1][1]) > size, svc.log_text()
        if float(replaced[-1][0]) > 2 * ANSWER_WITHIN:
            break
    else:
        raise AssertionError(f"no table up to {size} rules took {2 * ANSWER_WITHIN} s to replace")
    assert len(during) >= 3 and max(during + after) < ANSWER_WITHIN, (during, after)


def test_a_trickling_client_holds_up_no_one(svc, nets):
    """A client that sends its request a byte at a time holds only its own thread,
    and only for CLIENT_TIMEOUT in all, however often it sends."""
    from bpfilter.transport.unix import CLIENT_TIMEOUT
    (ns,) = nets(1)
    svc.ok(ns, "iptables-legacy-restore", input=LOCAL_RULES)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(svc.socket)
        connected = time.monotonic()
        slow.setblocking(False)
        took = []
        cut = None
        for _ in range(int(3 * CLIENT_TIMEOUT / 0.25)):
            try:
                slow.send(b"\0")
            except OSError:   # hung up on
                cut = time.monotonic() - connected
                break
            try:
                if slow.recv(100) == b"":
                    cut = time.monotonic() - connected
                    break
            except BlockingIOError:
                pass
            if len(took) < 3 and time.monotonic() - connected > 0.5:
                took.append(timed_list(svc, ns))
            time.sleep(0.25)
    assert took and max(took) < ANSWER_WITHIN, took
    assert cut is not None and cut < CLIENT_TIMEOUT + 1.5, cut
    assert "client sent" in svc.log_text()


def test_connections_are_capped_per_peer(svc, nets):
    """One process holds at most MAX_PER_PEER connections: the next is refused at
    once (EAGAIN), and other processes are still answered."""
    from bpfilter.transport.unix import MAX_PER_PEER
    (ns,) = nets(1)
    svc.ok(ns, "iptables-legacy-restore", input=LOCAL_RULES)
    silent = []
    try:
        for _ in range(MAX_PER_PEER):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.append(s)
            s.connect(svc.socket)
        fd = os.open(netns.path_of(ns), os.O_RDONLY)
        try:
            assert get_info(svc, fd, timeout=ANSWER_WITHIN)[0] == -errno.EAGAIN
        finally:
            os.close(fd)
        assert timed_list(svc, ns) < ANSWER_WITHIN
    finally:
        for s in silent:
            s.close()
    assert "refused a connection, too many at once" in svc.log_text()


def test_replaces_of_one_namespace_take_turns(nets, monkeypatch):
    """The service in this process, its replace held at its wait for the old
    programs: a second replace of the same namespace waits for the first to end
    (then replaces the first's table), while another namespace is answered.
    Unserialised, both would replace the same table, and close it twice."""
    from bpfilter import service as svcmod
    from bpfilter.store import Store
    from bpfilter_lab.scratch import replace_blob
    same, other = nets(2)
    blobs = [replace_blob(LOCAL_RULES.replace("7777", str(port))) for port in (7777, 7778, 7779)]
    # the first replaces the table as created (its 4 entries), the others one of 6
    offset = X.SIZEOF_IPT_REPLACE - 12   # ipt_replace's num_counters
    blobs[0] = blobs[0][:offset] + struct.pack("I", 4) + blobs[0][offset + 4:]
    held, release = threading.Event(), threading.Event()
    waits = []

    def wait_for_programs() -> None:
        waits.append(threading.current_thread().name)
        held.set()
        assert release.wait(30)

    t = Service()   # a private bpffs; its own service is never started
    fds = {ns: os.open(netns.path_of(ns), os.O_RDONLY) for ns in (same, other)}
    service = svcmod.Service(Store(t.bpffs))
    try:
        def request(ns: str, op: int, optname: int, payload: bytes) -> tuple[int, bytes]:
            request = proto.build_request(op, 2, optname, payload, pid=os.getpid())
            req = proto.request.parse(request)
            return svcmod.handled(service, req, request[proto.request.sizeof():], fds[ns])

        def replace(ns: str, blob: bytes, answers: dict) -> None:
            answers[threading.current_thread().name] = request(
                ns, proto.Op.SETSOCKOPT, X.IPT_SO_SET_REPLACE, blob)

        assert request(same, proto.Op.SETSOCKOPT, X.IPT_SO_SET_REPLACE, blobs[0])[0] == 0
        monkeypatch.setattr(svcmod.bpf, "wait_for_programs", wait_for_programs)
        answers: dict = {}
        first = threading.Thread(target=replace, args=(same, blobs[1], answers), name="first")
        second = threading.Thread(target=replace, args=(same, blobs[2], answers), name="second")
        first.start()
        assert held.wait(30)
        second.start()
        started = time.monotonic()
        status, _ = request(other, proto.Op.GETSOCKOPT, X.IPT_SO_GET_INFO,
                            codec.getinfo_request("filter"))
        assert status == 0 and time.monotonic() - started < ANSWER_WITHIN
        second.join(0.5)
        assert waits == ["first"] and second.is_alive()   # it waits its turn
        release.set()
        first.join(30)
        second.join(30)
        assert answers["first"][0] == 0 and answers["second"][0] == 0, answers
        assert waits == ["first", "second"]
        # the table is the second's, which replaced the first's
        status, info = request(same, proto.Op.GETSOCKOPT, X.IPT_SO_GET_INFO,
                               codec.getinfo_request("filter"))
        size = codec.parse_getinfo(info)["size"]
        status, reply = request(same, proto.Op.GETSOCKOPT, X.IPT_SO_GET_ENTRIES,
                                codec.get_entries_request("filter", size))
        assert status == 0 and reply[X.SIZEOF_IPT_GET_ENTRIES:] == blobs[2][-size:]
    finally:
        release.set()
        service.close()
        for fd in fds.values():
            os.close(fd)
        t.close()


# ---------------------------------------------------------------- item 9: socket mode

def test_a_netns_descriptor_that_is_a_fifo_is_refused_at_once(svc, nets):
    """Reopening the descriptor (/proc/self/fd/N) of a FIFO without a writer would
    wait for one forever: it is refused before anything opens it."""
    (ns,) = nets(1)
    fifo = os.path.join(svc.dir, "fifo")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        status, message = get_info(svc, fd, timeout=2)
    finally:
        os.close(fd)
    assert status == -errno.EINVAL and b"not a network namespace" in message
    for kind in ("/dev/null", "/proc/self/ns/mnt"):
        fd = os.open(kind, os.O_RDONLY)
        try:
            assert get_info(svc, fd, timeout=2)[0] == -errno.EINVAL, kind
        finally:
            os.close(fd)
    fd = os.open(netns.path_of(ns), os.O_RDONLY)
    try:
        assert get_info(svc, fd)[0] == 0
    finally:
        os.close(fd)


def _connected_then(svc: Service, then: str) -> tuple[socket.socket, int]:
    """A connection to the service made by a child process that then runs `then`
    (Python, `os` imported) and exits; the socket comes back to us by SCM_RIGHTS.
    Returns it and the child's pid."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(svc.socket)
            exec(then, {"os": os})
            socket.send_fds(theirs, [b"x"], [s.fileno()])
            theirs.recv(1)   # until the parent has it
        finally:
            os._exit(0)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    conn = socket.socket(fileno=fds[0])
    ours.send(b"x")
    ours.close()
    os.waitpid(pid, 0)
    return conn, pid


def test_table_names_are_roots_to_read(svc, nets):
    """/proc/net/ip_tables_names is root's, mode 0440: a caller that dropped root
    (no uid 0, no capability) gets EACCES for the names, as open() would."""
    (ns,) = nets(1)
    svc.ok(ns, "iptables-legacy-restore", input=LOCAL_RULES)
    fd = os.open(netns.path_of(ns), os.O_RDONLY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(svc.socket)
            send_request(s, fd, proto.Op.TABLE_NAMES)
            assert read_reply(s) == (0, b"filter\n")
        # a process that connected as root and became nobody, still alive when it asks
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(svc.socket)
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                send_request(s, fd, proto.Op.TABLE_NAMES)
                theirs.send(repr(read_reply(s)).encode())
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        answer = ours.recv(1000).decode()
        os.waitpid(pid, 0)
    finally:
        os.close(fd)
    status, message = eval(answer)
    assert status == -errno.EACCES
    assert message.startswith(b"permission denied: the table names are root's to read"), message


def test_peer_credentials_are_the_connected_process(svc, nets):
    """The caller is the process that connected, not whichever process has its pid
    now: a caller without CAP_NET_ADMIN that exits does not lend its connection the
    capabilities of the root process that then reuses its pid."""
    (ns,) = nets(1)
    fd = os.open(netns.path_of(ns), os.O_RDONLY)
    sleeper = None
    try:
        conn, peer_pid = _connected_then(svc, "os.setresuid(65534, 65534, 65534)")
        for _ in range(50):   # another process may take the pid first: try again
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(peer_pid - 1))
            sleeper = subprocess.Popen(["sleep", "60"])
            if sleeper.pid == peer_pid:
                break
            sleeper.kill()
            sleeper.wait()
            sleeper = None
        assert sleeper is not None, f"could not make pid {peer_pid} be reused"
        with conn:
            conn.settimeout(30)
            send_request(conn, fd, proto.Op.GETSOCKOPT, X.IPT_SO_GET_INFO,
                         codec.getinfo_request("filter"))
            status, message = read_reply(conn)
        assert status == -errno.EPERM, (status, message)
        # and one still alive is itself: root it is, and answered
        assert get_info(svc, fd)[0] == 0
    finally:
        os.close(fd)
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()


# ---------------------------------------------------------------- where the daemon runs

def test_the_daemon_runs_in_the_hosts_namespaces(nets):
    """Started by `bpfilter exec` inside `ip netns exec blue`, the service moves to
    the host's network and mount namespaces: `ip netns del blue` then frees blue,
    and the service sweeps its table."""
    service = Service()   # not started: `bpfilter exec` starts it
    try:
        (blue,) = nets(1)
        inum = inum_of(blue)
        done = subprocess.run(["ip", "netns", "exec", blue, PY, "-m", "bpfilter", "exec", "--",
                               "iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"],
                              env=service.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + service.log_text()
        for ns in ("net", "mnt"):
            assert os.stat(f"/proc/{service.pid}/ns/{ns}").st_ino == \
                os.stat(f"/proc/self/ns/{ns}").st_ino, ns
        assert inum in service.pinned()
        namespaces.delete(blue)
        deadline = time.monotonic() + 15
        while inum in service.pinned() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert inum not in service.pinned(), service.log_text()
        shown = service.cli("show")
        assert shown.returncode == 0 and "(no ip netns name)" not in shown.stdout, shown.stdout
    finally:
        service.close()


def test_a_foreground_service_runs_in_the_hosts_namespaces(nets):
    """`bpfilter serve` in the foreground, started in a namespace, moves too."""
    service = Service()
    (blue,) = nets(1)
    proc = subprocess.Popen(["ip", "netns", "exec", blue, PY, "-m", "bpfilter", "serve",
                             "--socket", service.socket, "--bpffs", service.bpffs],
                            env=service.env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(service.socket) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.path.exists(service.socket), proc.stderr.read() if proc.poll() else ""
        for ns in ("net", "mnt"):
            assert os.stat(f"/proc/{proc.pid}/ns/{ns}").st_ino == \
                os.stat(f"/proc/self/ns/{ns}").st_ino, ns
    finally:
        proc.terminate()
        proc.wait(30)
        service.close()


# ---------------------------------------------------------------- the kernel's own table

def test_the_kernels_own_table_is_named_as_what_is_in_the_way(svc, nets):
    """Where plain iptables-legacy made the kernel's filter table, netfilter refuses
    bpfilter's hooks at its priority (EBUSY): the caller is told why and what to do,
    and nothing is left behind."""
    (ns,) = nets(1)
    svc.kok(ns, "iptables-legacy", "-L", "-n")   # instantiates the kernel's table
    assert "filter" in svc.kok(ns, "cat", "/proc/net/ip_tables_names").split()
    done = svc.exec(ns, "iptables-legacy-restore", input=LOCAL_RULES)
    assert done.returncode != 0
    assert "the kernel's own iptables table 'filter' exists in this network namespace" \
        in done.stderr, done.stderr
    assert "rmmod iptable_filter" in done.stderr and "BPF_LINK_CREATE" not in done.stderr
    done = svc.exec(ns, "iptables-legacy", "-S")
    assert done.returncode != 0 and "the kernel's own iptables table" in done.stderr
    # iptables' own words for it
    assert f"can't initialize iptables table `filter': {os.strerror(errno.EBUSY)}" in done.stderr
    assert inum_of(ns) not in svc.pinned()


def test_the_kernels_own_table_made_after_ours_is_told_while_it_filters(svc, nets):
    """The other way round: bpfilter's table first, then plain iptables-legacy makes
    the kernel's beside it (netfilter lets it in) and fills it. Both tables then
    decide every packet: bpfilter answers no request for its table while the
    kernel's can decide otherwise than ACCEPT, says why and what to do, and answers
    again once the kernel's is as the kernel made it."""
    (ns,) = nets(1)
    svc.ok(ns, "iptables-legacy", "-A", "INPUT", "-s", "192.0.2.1", "-j", "DROP")
    svc.kok(ns, "iptables-legacy", "-L", "-n")   # the kernel's, empty: harmless
    assert "filter" in svc.kok(ns, "cat", "/proc/net/ip_tables_names").split()
    assert "-A INPUT -s 192.0.2.1/32 -j DROP" in svc.ok(ns, "iptables-legacy", "-S")
    svc.kok(ns, "iptables-legacy", "-A", "OUTPUT", "-p", "udp", "-j", "DROP")
    done = svc.exec(ns, "iptables-legacy", "-S")
    assert done.returncode != 0
    assert "the kernel's own iptables table 'filter' was made in this network namespace " \
        "after bpfilter's" in done.stderr and "iptables-legacy -t filter -F" in done.stderr, \
        done.stderr
    svc.kok(ns, "iptables-legacy", "-F")
    svc.kok(ns, "iptables-legacy", "-P", "FORWARD", "DROP")
    assert svc.exec(ns, "iptables-legacy", "-S").returncode != 0   # a policy decides too
    svc.kok(ns, "iptables-legacy", "-P", "FORWARD", "ACCEPT")
    assert "-A INPUT -s 192.0.2.1/32 -j DROP" in svc.ok(ns, "iptables-legacy", "-S")


def test_an_nftables_chain_at_the_tables_priority_is_named(svc, nets):
    """An nftables base chain at priority filter (0) at one of filter's hooks: the
    same refusal by netfilter, told as what it is."""
    (ns,) = nets(1)
    svc.kok(ns, "nft", "-f", "-", input="table ip t {\n chain c {\n"
                                        "  type filter hook output priority 0;\n }\n}\n")
    done = svc.exec(ns, "iptables-legacy", "-S")
    assert done.returncode != 0
    assert "another netfilter hook of this network namespace has the priority of table " \
        "'filter' (0)" in done.stderr and "nft list ruleset" in done.stderr, done.stderr
    assert "BPF_LINK_CREATE" not in done.stderr
    assert inum_of(ns) not in svc.pinned()
