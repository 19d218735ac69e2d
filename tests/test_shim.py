"""The preload shim of `bpfilter exec`, driven by the real iptables-legacy.

A stub service (a thread here) records what the shim sends and answers with
canned replies, so these tests pin the shim to kmod/bpfilter_proto.h without
depending on the translator behind it.
"""
from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import types

import pytest

from bpfilter import check, netns, proto
from bpfilter.abi import codec, sockopt
from bpfilter.errors import BpfilterError
from bpfilter.model import Family
from bpfilter_lab import namespaces

MAIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = importlib.util.find_spec("bpfilter._preload").origin
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES = 64, 65
IPT_SO_GET_REVISION_MATCH, IPT_SO_GET_REVISION_TARGET = 66, 67
IPT_SO_SET_REPLACE, IPT_SO_SET_ADD_COUNTERS = 64, 65


@dataclasses.dataclass
class Request:
    header: dict
    payload: bytes
    netns_ino: int      # of the fd that came with the request


class Stub:
    """Stands in for `bpfilter serve` on its own socket path."""

    def __init__(self, answer):
        self.answer = answer        # Request -> (status, reply payload), or None to hang up
        self.requests: list[Request] = []
        self.dir = tempfile.mkdtemp(prefix="bpft-shim-")
        self.path = os.path.join(self.dir, "service.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self._one(conn)

    @staticmethod
    def _recv(conn, size, fds):
        data = b""
        while len(data) < size:
            chunk, more, _, _ = socket.recv_fds(conn, size - len(data), 4)
            if not chunk:
                return None
            fds.extend(more)
            data += chunk
        return data

    def _one(self, conn):
        fds = []
        try:
            header = self._recv(conn, proto.request.sizeof(), fds)
            if header is None:          # `bpfilter exec` probing for a service
                return
            header = proto.request.parse(header)
            payload = self._recv(conn, header.len, fds) if header.len else b""
            assert len(fds) == 1, fds
            request = Request({k: v for k, v in header.items() if k != "_io"}, payload,
                              os.fstat(fds[0]).st_ino)
        finally:
            for fd in fds:
                os.close(fd)
        self.requests.append(request)
        answer = self.answer(request)
        if answer is not None:
            conn.sendall(proto.build_reply(*answer))

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join()
        shutil.rmtree(self.dir)


@pytest.fixture
def stub():
    made = []

    def make(answer):
        made.append(Stub(answer))
        return made[-1]

    yield make
    for s in made:
        s.close()


def shimmed(ns: str, path: str, *argv, preload: bool = True):
    """argv in netns ns with the shim preloaded, talking to the service at path."""
    env = [f"LD_PRELOAD={SHIM}"] if preload else []
    return subprocess.run(["ip", "netns", "exec", ns, "env", *env, f"BPFILTER_SOCKET={path}", *argv],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def fresh_filter():
    """(GET_INFO reply, GET_ENTRIES reply, ipt_replace) of a new netns's filter table, from the kernel."""
    with namespaces.scratch("bpft-shim") as name, netns.entered(name):
        info = sockopt.get_info("filter")
        entries = sockopt.get_entries("filter", codec.parse_getinfo(info)["size"])
        replace = sockopt.read_replace("filter")
    return info, entries, replace


def kernel_like(info, entries, counters=b""):
    """Answers a fresh filter table as the kernel would; SET_REPLACE returns counters."""
    def answer(req):
        h = req.header
        if h["op"] == proto.Op.GETSOCKOPT and h["optname"] == IPT_SO_GET_INFO:
            return 0, info
        if h["op"] == proto.Op.GETSOCKOPT and h["optname"] == IPT_SO_GET_ENTRIES:
            return 0, entries
        if h["op"] == proto.Op.GETSOCKOPT:          # a revision the "kernel" has
            return 0, req.payload
        if h["op"] == proto.Op.SETSOCKOPT and h["optname"] == IPT_SO_SET_REPLACE:
            return 0, counters
        if h["op"] == proto.Op.TABLE_NAMES:
            return 0, b"filter\n"
        return 0, b""
    return answer


def ops(s: Stub):
    return [(r.header["op"], r.header["optname"]) for r in s.requests]


# A Python child with the shim preloaded that makes the socket calls itself,
# through ctypes, and reports in JSON.
PRELUDE = textwrap.dedent("""
    import ctypes, json, os, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fread.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.fopen64.restype = ctypes.c_void_p
    libc.fopen64.argtypes = [ctypes.c_char_p, ctypes.c_char_p]

    def get(fd, level, optname, buf, optlen):
        n = ctypes.c_uint(optlen)
        rc = libc.getsockopt(fd, level, optname, buf, ctypes.byref(n))
        return rc, ctypes.get_errno() if rc else 0, n.value

    def set(fd, level, optname, buf, optlen):
        rc = libc.setsockopt(fd, level, optname, buf, optlen)
        return rc, ctypes.get_errno() if rc else 0

    def slurp(path, mode=b"r", fopen=libc.fopen):
        f = fopen(path.encode(), mode)
        if not f:
            return None, ctypes.get_errno()
        buf = ctypes.create_string_buffer(1 << 16)
        n = libc.fread(buf, 1, len(buf), f)
        libc.fclose(f)
        return buf.raw[:n].decode(), 0
""")


def child(ns: str, path: str, code: str, preload: bool = True) -> dict:
    done = shimmed(ns, path, sys.executable, "-c", PRELUDE + textwrap.dedent(code), preload=preload)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_shim_is_built_without_python():
    assert os.path.isfile(SHIM)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", SHIM], capture_output=True,
                               text=True, check=True).stdout.split()
    assert not [s for s in undefined if s.startswith("Py") or s.startswith("_Py")]
    defined = subprocess.run(["nm", "-D", "--defined-only", SHIM], capture_output=True,
                             text=True, check=True).stdout.split()
    assert {"getsockopt", "setsockopt", "fopen", "fopen64"} <= set(defined)


def test_list_fresh_table(stub, fresh_netns, fresh_filter):
    info, entries, _ = fresh_filter
    s = stub(kernel_like(info, entries))
    done = shimmed(fresh_netns, s.path, "iptables-legacy", "-S")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"]

    size = codec.parse_getinfo(info)["size"]
    assert ops(s) == [(proto.Op.GETSOCKOPT, IPT_SO_GET_INFO), (proto.Op.GETSOCKOPT, IPT_SO_GET_ENTRIES)]
    ino = netns.ident(fresh_netns)
    assert ino != netns.ident()
    for r in s.requests:
        h = r.header
        assert (h["magic"], h["version"], h["family"], h["netns_cookie"], h["netns_fd"]) == \
               (proto.MAGIC, proto.VERSION, NFPROTO_IPV4, 0, -1)
        assert h["netns_inum"] == r.netns_ino == ino
        assert h["pid"] > 0 and h["pid"] != os.getpid()
        assert h["len"] == len(r.payload)
    get_info, get_entries = s.requests
    # Of iptables' buffers, what the kernel reads: GET_INFO's table name (iptables
    # leaves the rest uninitialised), GET_ENTRIES' header, not the room for the entries.
    assert (len(get_info.payload), get_info.header["optlen"]) == (32, 84)
    assert get_info.payload[:7] == b"filter\0"
    assert (len(get_entries.payload), get_entries.header["optlen"]) == (40, 40 + size)
    assert get_entries.payload[:7] == b"filter\0"
    assert struct.unpack_from("=I", get_entries.payload, 32)[0] == size


def test_save_lists_tables_from_the_service(stub, fresh_netns, fresh_filter):
    info, entries, _ = fresh_filter
    s = stub(kernel_like(info, entries))
    done = shimmed(fresh_netns, s.path, "iptables-legacy-save")
    assert done.returncode == 0, done.stderr
    assert "*filter" in done.stdout and ":INPUT ACCEPT [0:0]" in done.stdout
    assert s.requests[0].header["op"] == proto.Op.TABLE_NAMES
    assert (s.requests[0].header["family"], s.requests[0].header["len"]) == (NFPROTO_IPV4, 0)

    s6 = stub(lambda req: (0, b""))
    done = shimmed(fresh_netns, s6.path, "ip6tables-legacy-save")
    assert done.returncode == 0, done.stderr
    assert [(r.header["op"], r.header["family"]) for r in s6.requests] == \
           [(proto.Op.TABLE_NAMES, NFPROTO_IPV6)]


def test_replace_hands_old_counters_back(stub, fresh_netns, fresh_filter):
    """iptables -A: the old counters the service returns for SET_REPLACE reach
    iptables, which carries the policies' into its SET_ADD_COUNTERS."""
    info, entries, _ = fresh_filter
    old = b"".join(struct.pack("=QQ", i + 1, 1000 * (i + 1)) for i in range(4))
    s = stub(kernel_like(info, entries, counters=old))
    done = shimmed(fresh_netns, s.path, "iptables-legacy", "-A", "INPUT", "-s", "10.0.0.1", "-j", "DROP")
    assert done.returncode == 0, done.stderr
    assert ops(s) == [(proto.Op.GETSOCKOPT, IPT_SO_GET_INFO), (proto.Op.GETSOCKOPT, IPT_SO_GET_ENTRIES),
                      (proto.Op.SETSOCKOPT, IPT_SO_SET_REPLACE), (proto.Op.SETSOCKOPT, IPT_SO_SET_ADD_COUNTERS)]
    replace, add = s.requests[2].payload, s.requests[3].payload
    parsed = codec.parse_replace(replace)
    assert len(parsed.entries) == 5 and parsed.entries[0].ip.src == socket.inet_aton("10.0.0.1")
    assert struct.unpack_from("=I", replace, 84)[0] == 4           # num_counters
    assert add[:7] == b"filter\0" and struct.unpack_from("=I", add, 32)[0] == 5
    counters = [struct.unpack_from("=QQ", add, 40 + 16 * i) for i in range(5)]
    # INPUT's policy moved one entry down, behind the new rule; the rule starts at 0.
    assert counters == [(0, 0), (1, 1000), (2, 2000), (3, 3000), (0, 0)]


def test_revisions_and_errors_map_to_errno(stub, fresh_netns, fresh_filter):
    info, entries, _ = fresh_filter
    normal = kernel_like(info, entries)

    def answer(req):
        h = req.header
        if h["optname"] == IPT_SO_GET_REVISION_MATCH and req.payload[29] == 3:
            return -errno.EPROTONOSUPPORT, b""
        if h["optname"] == IPT_SO_GET_REVISION_TARGET:
            return -errno.ENOENT, b""
        return normal(req)

    s = stub(answer)
    done = shimmed(fresh_netns, s.path, "iptables-legacy", "-A", "INPUT", "-m", "conntrack",
                   "--ctstate", "NEW", "-j", "MARK", "--set-mark", "1")
    assert done.returncode == 0, done.stderr
    revisions = [(r.header["optname"], r.payload[:29].rstrip(b"\0").decode(), r.payload[29])
                 for r in s.requests if r.header["optname"] in (66, 67)]
    assert all(len(r.payload) == 30 for r in s.requests if r.header["optname"] in (66, 67))
    # EPROTONOSUPPORT: iptables falls back to the next revision it knows...
    assert revisions[:2] == [(IPT_SO_GET_REVISION_MATCH, "conntrack", 3),
                             (IPT_SO_GET_REVISION_MATCH, "conntrack", 2)]
    # ...ENOENT: down to 0, and it says it found none.
    assert revisions[2:] == [(IPT_SO_GET_REVISION_TARGET, "MARK", r) for r in (2, 1, 0)]
    assert "MARK revision 0 not supported" in done.stderr
    rule = codec.parse_replace(s.requests[-2].payload).entries[0]
    assert (rule.matches[0].name, rule.matches[0].revision, rule.target.revision) == ("conntrack", 2, 0)

    s = stub(lambda req: (-errno.EHOSTDOWN, b""))
    done = shimmed(fresh_netns, s.path, "iptables-legacy", "-S")
    assert done.returncode != 0 and os.strerror(errno.EHOSTDOWN) in done.stderr

    s = stub(lambda req: (-errno.EHOSTDOWN, b""))
    done = shimmed(fresh_netns, s.path, "ip6tables-legacy", "-S")
    assert done.returncode != 0 and os.strerror(errno.EHOSTDOWN) in done.stderr
    first = s.requests[0]
    assert (first.header["family"], first.header["optname"], first.header["len"],
            first.header["optlen"]) == (NFPROTO_IPV6, IPT_SO_GET_INFO, 32, 84)


def test_counters_land_at_the_callers_pointer(stub, fresh_netns, fresh_filter):
    """setsockopt(IPT_SO_SET_REPLACE) called directly: the reply's payload is
    written to ipt_replace.counters, and never more than num_counters of them."""
    blob = fresh_filter[2]
    counters = bytes(range(64))
    replies = iter([counters, counters, counters[:48], counters])
    s = stub(lambda req: (0, next(replies)))
    out = child(fresh_netns, s.path, f"""
        blob = {blob!r}
        results = {{}}
        for case, level, num in (("v4", 0, 4), ("v6", 41, 4), ("three", 0, 3), ("too many", 0, 3)):
            # 16 guard bytes past the room for four counters
            room = ctypes.create_string_buffer(b"\\xee" * 80, 80)
            repl = bytearray(blob)
            repl[84:88] = num.to_bytes(4, "little")
            repl[88:96] = ctypes.addressof(room).to_bytes(8, "little")
            s = socket.socket(socket.AF_INET6 if level else socket.AF_INET, socket.SOCK_RAW, 255)
            rc, err = set(s.fileno(), level, 64, bytes(repl), len(repl))
            results[case] = [rc, err, room.raw.hex()]
        print(json.dumps(results))
    """)
    assert out["v4"] == [0, 0, counters.hex() + "ee" * 16]
    assert out["v6"] == [0, 0, counters.hex() + "ee" * 16]
    assert out["three"] == [0, 0, counters[:48].hex() + "ee" * 32]
    # More counters than the caller made room for: refused, nothing written.
    assert out["too many"] == [-1, errno.EPROTO, "ee" * 80]
    assert [r.header["family"] for r in s.requests] == [NFPROTO_IPV4, NFPROTO_IPV6, NFPROTO_IPV4, NFPROTO_IPV4]
    for r, num in zip(s.requests, (4, 4, 3, 3)):
        assert (r.header["op"], r.header["optname"]) == (proto.Op.SETSOCKOPT, IPT_SO_SET_REPLACE)
        assert r.payload[:84] + r.payload[96:] == blob[:84] + blob[96:]
        assert struct.unpack_from("=IQ", r.payload, 84)[0] == num


def test_replies_are_bounded_by_the_caller(stub, fresh_netns):
    replies = iter([(0, b"A" * 20), (0, b"B" * 100), (0, b"C" * 16)])
    s = stub(lambda req: next(replies))
    out = child(fresh_netns, s.path, """
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)
        buf = ctypes.create_string_buffer(b"x" * 96, 96)
        short = get(s.fileno(), 0, 64, buf, 84) + (buf.raw.hex(),)
        buf = ctypes.create_string_buffer(b"y" * 96, 96)
        over = get(s.fileno(), 0, 64, buf, 84) + (buf.raw.hex(),)
        # A counters payload for a SET that has no counters pointer to give.
        rc = set(s.fileno(), 0, 65, b"z" * 40, 40)
        print(json.dumps(dict(short=short, over=over, add=rc)))
    """)
    assert out["short"] == [0, 0, 20, (b"A" * 20 + b"x" * 76).hex()]
    assert out["over"] == [-1, errno.EPROTO, 84, (b"y" * 96).hex()]
    assert out["add"] == [-1, errno.EPROTO]
    # GET_INFO carries the table's name, what the kernel reads; a set its whole optval
    assert [(len(r.payload), r.header["optlen"]) for r in s.requests] == [(32, 84), (32, 84),
                                                                          (40, 40)]


def test_a_bad_optlen_is_efault_as_in_the_kernel(stub, fresh_netns):
    """The kernel reads and writes *optlen with get_user()/put_user(): an unmapped or
    read-only optlen is EFAULT, never a crash of the caller; the same calls without the
    shim are the reference."""
    s = stub(lambda req: (0, b"A" * 20))
    code = """
        import mmap
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)
        buf = ctypes.create_string_buffer(96)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        page = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        ctypes.c_uint.from_address(page).value = 84
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mprotect(page, 4096, mmap.PROT_READ)
        libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_void_p]
        out = {}
        for name, optlen in (("null", None), ("unmapped", 8), ("read-only", page)):
            rc = libc.getsockopt(s.fileno(), 0, 64, buf, optlen)
            out[name] = [rc, ctypes.get_errno() if rc else 0]
        print(json.dumps(out))
    """
    out = child(fresh_netns, s.path, code)
    assert out["null"] == out["unmapped"] == [-1, errno.EFAULT], out
    # answered, but the length cannot be written back: ip_getsockopt()'s put_user()
    assert out["read-only"] == [-1, errno.EFAULT], out
    kernel = child(fresh_netns, s.path, code, preload=False)
    assert kernel["null"] == kernel["unmapped"] == [-1, errno.EFAULT], kernel


def test_a_get_carries_only_what_the_kernel_reads(stub, fresh_netns):
    """iptables passes a buffer as large as the table for GET_ENTRIES, and a caller may
    pass any size: the kernel reads only the ipt_get_entries header and answers an
    optlen that is not the header plus its size EINVAL. So does the shim with the
    service's answer (service.get_answer, here through `bpfilter check`'s responder),
    and the service is sent the header, not the buffer."""
    responder = check._Responder(Family.IPV4)

    def answer(req):
        try:
            return responder.handle(types.SimpleNamespace(**req.header), req.payload, None)
        except BpfilterError as err:
            return -err.errno, str(err).encode()

    s = stub(answer)
    code = """
        import mmap
        huge = 64 << 20
        # mapped, not touched: a shim that sent the whole buffer could
        buf = mmap.mmap(-1, huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        head = ctypes.c_char.from_buffer(buf)
        ctypes.memmove(ctypes.addressof(head), b"filter", 6)
        at = ctypes.c_void_p(ctypes.addressof(head))
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)
        out = dict(huge=get(s.fileno(), 0, 65, at, huge), short=get(s.fileno(), 0, 65, at, 39))
        print(json.dumps(out))
    """
    out = child(fresh_netns, s.path, code)
    kernel = child(fresh_netns, s.path, code, preload=False)
    assert out == kernel == dict(huge=[-1, errno.EINVAL, 64 << 20], short=[-1, errno.EINVAL, 39])
    assert [(r.header["optname"], r.header["optlen"], r.header["len"], len(r.payload))
            for r in s.requests] == [(IPT_SO_GET_ENTRIES, 64 << 20, 40, 40),
                                     (IPT_SO_GET_ENTRIES, 39, 0, 0)]
    assert s.requests[0].payload == b"filter" + bytes(34)


def test_concurrent_calls_and_both_fopens(stub, fresh_netns):
    """Threads calling at once each get their own reply; fopen64 is answered like fopen."""
    def answer(req):
        if req.header["op"] == proto.Op.TABLE_NAMES:
            return 0, {NFPROTO_IPV4: b"filter\nraw\n", NFPROTO_IPV6: b"mangle\n"}[req.header["family"]]
        return 0, req.payload[::-1]

    s = stub(answer)
    out = child(fresh_netns, s.path, """
        import threading
        bad = []
        def worker(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)
            for i in range(25):
                # the name, what a GET_INFO carries, comes back reversed
                mine = f"{n}:{i}".encode().ljust(32, b".")
                buf = ctypes.create_string_buffer(mine, 84)
                if get(sock.fileno(), 0, 64, buf, 84) != (0, 0, 32) or buf.raw[:32] != mine[::-1]:
                    bad.append((n, i))
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps(dict(bad=bad, v4=slurp("/proc/net/ip_tables_names", fopen=libc.fopen64),
                              v6=slurp("/proc/net/ip6_tables_names", fopen=libc.fopen64),
                              v4_plain=slurp("/proc/net/ip_tables_names"))))
    """)
    assert out["bad"] == []
    assert out["v4"] == out["v4_plain"] == ["filter\nraw\n", 0] and out["v6"] == ["mangle\n", 0]
    assert len(s.requests) == 8 * 25 + 3
    assert len({r.header["pid"] for r in s.requests[:200]}) == 8    # one per thread


def test_other_calls_reach_the_kernel(stub, fresh_netns):
    """Whatever is not iptables' goes to the kernel: the same results with and without the shim."""
    s = stub(lambda req: (0, b""))
    code = """
        r = {}
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r["set rcvbuf"] = set(u.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF,
                              (4096).to_bytes(4, "little"), 4)
        buf = ctypes.create_string_buffer(4)
        r["get rcvbuf"] = get(u.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF, buf, 4) + (buf.raw.hex(),)
        buf = ctypes.create_string_buffer(b"filter".ljust(84, b"\\0"), 84)
        six = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 255)
        four = socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)
        r["v6 socket, SOL_IP"] = get(six.fileno(), 0, 64, buf, 84)
        r["v4 socket, SOL_IPV6"] = get(four.fileno(), 41, 64, buf, 84)
        r["v4 socket, level 1"] = get(four.fileno(), 1, 64, buf, 84)
        r["ipt optname 68"] = get(four.fileno(), 0, 68, buf, 84)
        r["ip6t optname 66"] = get(six.fileno(), 41, 66, buf, 84)
        r["ipt set 66"] = set(four.fileno(), 0, 66, buf, 84)
        r["v6 socket, set SOL_IP"] = set(six.fileno(), 0, 64, buf, 84)
        r["not a socket"] = get(0, 0, 64, buf, 84)
        r["bad fd"] = set(999, 0, 64, buf, 84)
        r["dev"] = slurp("/proc/net/dev")
        r["names for writing"] = slurp("/proc/net/ip_tables_names", b"w")
        r["names elsewhere"] = slurp("/proc/self/net/ip_tables_names")
        print(json.dumps(r))
    """
    kernel = child(fresh_netns, s.path, code, preload=False)
    assert child(fresh_netns, s.path, code) == kernel
    assert kernel["get rcvbuf"][0] == 0 and "lo:" in kernel["dev"][0]
    assert s.requests == []


def test_unreachable_service(stub, fresh_netns):
    gone = os.path.join(tempfile.mkdtemp(prefix="bpft-shim-"), "nobody.sock")
    try:
        done = shimmed(fresh_netns, gone, "iptables-legacy", "-S")
        assert done.returncode != 0
        line = f"bpfilter: cannot reach the bpfilter service at {gone}: {os.strerror(errno.ENOENT)}"
        assert line in done.stderr.splitlines()
        assert os.strerror(errno.ECONNREFUSED) in done.stderr

        # A socket file nobody listens on any more
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(gone)
        done = shimmed(fresh_netns, gone, "iptables-legacy-save")
        assert done.returncode != 0
        assert f"bpfilter: cannot reach the bpfilter service at {gone}: " \
               f"{os.strerror(errno.ECONNREFUSED)}" in done.stderr.splitlines()
    finally:
        shutil.rmtree(os.path.dirname(gone))

    s = stub(lambda req: None)          # takes the request, hangs up without a reply
    done = shimmed(fresh_netns, s.path, "iptables-legacy", "-S")
    assert done.returncode != 0
    assert f"bpfilter: lost the bpfilter service at {s.path}: " \
           f"{os.strerror(errno.ECONNRESET)}" in done.stderr.splitlines()


def test_exec_runs_the_command_with_the_shim(stub, fresh_netns, fresh_filter):
    info, entries, _ = fresh_filter
    s = stub(kernel_like(info, entries))
    env = dict(os.environ, BPFILTER_SOCKET=s.path)
    done = subprocess.run(["ip", "netns", "exec", fresh_netns, sys.executable, "-m", "bpfilter",
                           "exec", "--", "iptables-legacy", "-S"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"]
    assert ops(s) == [(proto.Op.GETSOCKOPT, IPT_SO_GET_INFO), (proto.Op.GETSOCKOPT, IPT_SO_GET_ENTRIES)]

    env["LD_PRELOAD"] = "libm.so.6"
    done = subprocess.run([sys.executable, "-m", "bpfilter", "exec", "--", "sh", "-c",
                           'printf "%s\\n%s" "$LD_PRELOAD" "$BPFILTER_SOCKET"'],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{SHIM}:libm.so.6", s.path]

    done = subprocess.run([sys.executable, "-m", "bpfilter", "exec", "--", "no-such-command-here"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 127 and "cannot run no-such-command-here" in done.stderr


def test_env_gives_every_later_command_the_shim(stub, fresh_netns, fresh_filter):
    """`eval "$(bpfilter env)"` once, and plain iptables commands reach the service;
    evaluated again, it preloads the shim once, before what was preloaded already."""
    info, entries, _ = fresh_filter
    s = stub(kernel_like(info, entries))
    env = dict(os.environ, BPFILTER_SOCKET=s.path, LD_PRELOAD="libm.so.6")
    script = ('eval "$(bpfilter_env)" && eval "$(bpfilter_env)" && iptables-legacy -S && '
              'printf "%s\\n%s\\n" "$LD_PRELOAD" "$BPFILTER_SOCKET"')
    done = subprocess.run(["ip", "netns", "exec", fresh_netns, "bash", "-c",
                           f'bpfilter_env() {{ "{sys.executable}" -m bpfilter env; }}; {script}'],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT",
                                        f"{SHIM}:libm.so.6", s.path]
    assert ops(s) == [(proto.Op.GETSOCKOPT, IPT_SO_GET_INFO),
                      (proto.Op.GETSOCKOPT, IPT_SO_GET_ENTRIES)]


def test_exec_starts_the_service_outside_ip_netns_exec(fresh_netns):
    """No service yet: exec starts the real one, in the host's mount namespace
    (not the private one `ip netns exec` gives), and iptables then talks to it."""
    work = tempfile.mkdtemp(prefix="bpft-exec-")
    path, bpffs = os.path.join(work, "service.sock"), os.path.join(work, "bpffs")
    env = dict(os.environ, BPFILTER_SOCKET=path, BPFILTER_BPFFS=bpffs)
    try:
        def bpfilter_exec(*argv):
            done = subprocess.run(["ip", "netns", "exec", fresh_netns, sys.executable, "-m",
                                   "bpfilter", "exec", "--", *argv],
                                  env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        bpfilter_exec("iptables-legacy", "-A", "INPUT", "-s", "10.1.2.3", "-j", "DROP")
        assert "-A INPUT -s 10.1.2.3/32 -j DROP" in bpfilter_exec("iptables-legacy", "-S").splitlines()
        with open(path + ".pid") as f:
            daemon = int(f.read())
        assert os.readlink(f"/proc/{daemon}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    finally:
        subprocess.run([sys.executable, "-m", "bpfilter", "flush", "--socket", path, "--bpffs", bpffs],
                       env=env, capture_output=True)
        with open("/proc/self/mounts") as f:
            if f" {bpffs} " in f.read():
                subprocess.run(["umount", bpffs], check=True)
        shutil.rmtree(work)


def test_editable_install_builds_the_shim(tmp_path):
    """A plain `pip install -e .` (of a copy of this tree, into a new venv) compiles the shim."""
    src = tmp_path / "src"
    shutil.copytree(MAIN, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "*.so", "results"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    # only what the venv installed: a PYTHONPATH (a work tree's, say) would be found first
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps",
                           "--disable-pip-version-check", "-e", src],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    origin = subprocess.run([venv / "bin" / "python", "-c",
                             "import importlib.util; print(importlib.util.find_spec('bpfilter._preload').origin)"],
                            capture_output=True, text=True, check=True, cwd=tmp_path,
                            env=env).stdout.strip()
    assert origin.startswith(str(src / "umh" / "bpfilter" / "_preload"))
    undefined = subprocess.run(["nm", "-D", "--undefined-only", origin], capture_output=True,
                               text=True, check=True).stdout
    assert "Py" not in undefined


def _header_numbers(tmp_path, *exprs: str) -> list[int]:
    """C expressions of kmod/bpfilter_proto.h, as the compiler has them."""
    source = tmp_path / "numbers.c"
    source.write_text('#include <stddef.h>\n#include <stdio.h>\n#include "bpfilter_proto.h"\n'
                      'int main(void) {\n' +
                      "".join(f'printf("%llu\\n", (unsigned long long)({e}));\n' for e in exprs) +
                      'return 0; }\n')
    binary = tmp_path / "numbers"
    subprocess.run(["gcc", "-I", os.path.join(MAIN, "kmod"), "-o", str(binary), str(source)],
                   check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    return [int(n) for n in out.split()]


def test_ioctl_numbers_match_the_header(tmp_path):
    """proto.py's /dev/bpfilter ioctls are the header's _IOW() values, and their
    argument has the header's layout."""
    numbers = _header_numbers(tmp_path, "BPFILTER_IOC_CONNTRACK_GET", "BPFILTER_IOC_CONNTRACK_PUT",
                              "sizeof(struct bpfilter_conntrack)",
                              "offsetof(struct bpfilter_conntrack, family)")
    built = proto.conntrack.build(dict(netns_fd=-1, family=0x0a0b0c0d))
    assert numbers == [proto.IOC_CONNTRACK_GET, proto.IOC_CONNTRACK_PUT,
                       len(built), built.index(bytes([0x0d, 0x0c, 0x0b, 0x0a]))]
    fields = [f.name for f in proto.nat_attach.subcons]
    numbers = _header_numbers(tmp_path, "BPFILTER_IOC_NAT_ATTACH", "BPFILTER_IOC_NAT_DETACH",
                              "BPFILTER_IOC_NAT_QUERY",
                              "sizeof(struct bpfilter_nat_attach)",
                              *(f"offsetof(struct bpfilter_nat_attach, {f})" for f in fields),
                              *(f"BPFILTER_NAT_{how.name}" for how in proto.NatHow))
    offsets = [proto.nat_attach.subcons[i].sizeof() for i in range(len(fields))]
    assert numbers == [proto.IOC_NAT_ATTACH, proto.IOC_NAT_DETACH, proto.IOC_NAT_QUERY,
                       proto.nat_attach.sizeof(),
                       *(sum(offsets[:i]) for i in range(len(fields))),
                       *(how.value for how in proto.NatHow)]

    fields = [f.name for f in proto.xt_match.subcons]
    numbers = _header_numbers(tmp_path, "BPFILTER_IOC_XT_MATCH_CREATE",
                              "BPFILTER_IOC_XT_MATCH_DESTROY", "BPFILTER_IOC_XT_MATCH_LIST",
                              "sizeof(struct bpfilter_xt_match)",
                              *(f"offsetof(struct bpfilter_xt_match, {f})" for f in fields),
                              *(f"BPFILTER_XT_{v.name}" for v in proto.XtVerdict),
                              "sizeof(struct bpfilter_xt_instance_ref)",
                              "offsetof(struct bpfilter_xt_instance_ref, id)")
    offsets = [proto.xt_match.subcons[i].sizeof() for i in range(len(fields))]
    assert numbers == [proto.IOC_XT_MATCH_CREATE, proto.IOC_XT_MATCH_DESTROY,
                       proto.IOC_XT_MATCH_LIST,
                       proto.xt_match.sizeof(), *(sum(offsets[:i]) for i in range(len(fields))),
                       *(v.value for v in proto.XtVerdict), proto.xt_instance_ref.sizeof(), 8]


def test_request_and_reply_are_the_headers(tmp_path):
    """proto.py's request and reply: the header's fields, at its offsets, of its sizes,
    with its magic, version and payload limit."""
    layouts = []
    for c_name, header in (("bpfilter_request", proto.request), ("bpfilter_reply", proto.reply)):
        at = 0
        for field in header.subcons:
            layouts.append((f"offsetof(struct {c_name}, {field.name})", at))
            layouts.append((f"sizeof(((struct {c_name} *)0)->{field.name})", field.sizeof()))
            at += field.sizeof()
        layouts.append((f"sizeof(struct {c_name})", at))
    layouts += [("BPFILTER_MAGIC", proto.MAGIC), ("BPFILTER_PROTO_VERSION", proto.VERSION),
                ("BPFILTER_MAX_PAYLOAD", proto.MAX_PAYLOAD)]
    numbers = _header_numbers(tmp_path, *(expr for expr, _ in layouts))
    assert dict(zip((e for e, _ in layouts), numbers)) == dict(layouts)


def test_get_reads_is_the_headers(tmp_path):
    """What a get's request carries of optval: proto.get_reads (the service's check)
    is bpfilter_get_reads (bpfilter.ko's and the shim's), for every option of both
    families and the lengths around each struct's."""
    cases = [(family, optname, optlen) for family in (NFPROTO_IPV4, NFPROTO_IPV6)
             for optname in range(62, 72)
             for optlen in (0, 1, 29, 30, 31, 32, 39, 40, 41, 83, 84, 85, 1 << 20, 2**32 - 1)]
    numbers = _header_numbers(tmp_path, *(f"bpfilter_get_reads({f}, {n}, {l}u)" for f, n, l in cases))
    assert dict(zip(cases, numbers)) == {c: proto.get_reads(*c) for c in cases}
    assert proto.get_reads(NFPROTO_IPV6, 68, 30) == proto.get_reads(NFPROTO_IPV4, 66, 30) == 30
