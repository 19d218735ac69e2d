"""The bpf(2) syscall, called through cffi in ABI mode (no compiler needed).

Each command gets its own cffi struct with the exact layout of its part of
``union bpf_attr``, and the call passes that struct's size: the kernel zeroes
the rest of the union and only insists that bytes past what it knows are zero,
so a short struct is always accepted.

File descriptors are plain ints (close them with ``os.close``); the kernel
opens every bpf fd close-on-exec.
"""
import errno as _errno
import os
import platform
import re
import sys

import cffi

from .btf import Btf
from .btfgen import functions_btf

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_LOAD = 18
BPF_BTF_GET_FD_BY_ID = 19
BPF_BTF_GET_NEXT_ID = 23
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34
BPF_ITER_CREATE = 33
# Taken before any other BPF_ name exists, so it holds the commands only.
_CMD_NAMES = {value: name for name, value in globals().items() if name.startswith("BPF_")}

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_RINGBUF = 27

# enum bpf_prog_type
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_SYSCALL = 31
BPF_PROG_TYPE_NETFILTER = 32

# enum bpf_attach_type
BPF_NETFILTER = 45
BPF_TRACE_ITER = 28

# enum bpf_link_type
BPF_LINK_TYPE_NETFILTER = 10

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4       # (lookups too)

# map_create flags
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8

# link_create.netfilter.flags: have the link enable nf_defrag for the netns
BPF_F_NETFILTER_IP_DEFRAG = 1 << 0

from ..netfilter import (NF_ACCEPT, NF_DROP, NF_INET_FORWARD, NF_INET_LOCAL_IN,  # noqa: F401,E402
                         NF_INET_LOCAL_OUT, NF_INET_NUMHOOKS, NF_INET_POST_ROUTING,
                         NF_INET_PRE_ROUTING, NF_IP_PRI_CONNTRACK_DEFRAG, NF_IP_PRI_FILTER,
                         NF_IP_PRI_FIRST, NF_IP_PRI_LAST, NFPROTO_IPV4, NFPROTO_IPV6)

_SYS_BPF = {"x86_64": 321, "aarch64": 280}

BPF_OBJ_NAME_LEN = 16
BPF_LOG_LEVEL1 = 1
_LOG_MIN = 128              # the kernel rejects smaller log buffers
_LOG_MAX = 64 << 20

ffi = cffi.FFI()
ffi.cdef("""
long syscall(long number, ...);

struct bpf_map_create_attr {
    uint32_t map_type;
    uint32_t key_size;
    uint32_t value_size;
    uint32_t max_entries;
    uint32_t map_flags;
    uint32_t inner_map_fd;
    uint32_t numa_node;
    char map_name[16];
    uint32_t map_ifindex;
    uint32_t btf_fd;
    uint32_t btf_key_type_id;
    uint32_t btf_value_type_id;
};

struct bpf_btf_load_attr {
    uint64_t btf;
    uint64_t btf_log_buf;
    uint32_t btf_size;
    uint32_t btf_log_size;
    uint32_t btf_log_level;
};

struct bpf_map_elem_attr {
    uint32_t map_fd;
    uint64_t key;
    uint64_t value;         /* next_key for BPF_MAP_GET_NEXT_KEY */
    uint64_t flags;
};

struct bpf_prog_load_attr {
    uint32_t prog_type;
    uint32_t insn_cnt;
    uint64_t insns;
    uint64_t license;
    uint32_t log_level;
    uint32_t log_size;
    uint64_t log_buf;
    uint32_t kern_version;
    uint32_t prog_flags;
    char prog_name[16];
    uint32_t prog_ifindex;
    uint32_t expected_attach_type;
    uint32_t prog_btf_fd;
    uint32_t func_info_rec_size;
    uint64_t func_info;
    uint32_t func_info_cnt;
    uint32_t line_info_rec_size;
    uint64_t line_info;
    uint32_t line_info_cnt;
    uint32_t attach_btf_id;
    uint32_t attach_prog_fd;
    uint32_t core_relo_cnt;
    uint64_t fd_array;
    uint64_t core_relos;
    uint32_t core_relo_rec_size;
    uint32_t log_true_size;
};

struct bpf_batch_attr {
    uint64_t in_batch;
    uint64_t out_batch;
    uint64_t keys;
    uint64_t values;
    uint32_t count;
    uint32_t map_fd;
    uint64_t elem_flags;
    uint64_t flags;
};

struct bpf_link_detach_attr {
    uint32_t link_fd;
};

struct bpf_obj_attr {
    uint64_t pathname;
    uint32_t bpf_fd;
    uint32_t file_flags;
    int32_t path_fd;
};

struct bpf_test_run_attr {
    uint32_t prog_fd;
    uint32_t retval;
    uint32_t data_size_in;
    uint32_t data_size_out;
    uint64_t data_in;
    uint64_t data_out;
    uint32_t repeat;
    uint32_t duration;
    uint32_t ctx_size_in;
    uint32_t ctx_size_out;
    uint64_t ctx_in;
    uint64_t ctx_out;
    uint32_t flags;
    uint32_t cpu;
    uint32_t batch_size;
};

struct bpf_id_attr {
    uint32_t id;            /* start_id for the *_GET_NEXT_ID commands */
    uint32_t next_id;
    uint32_t open_flags;
};

struct bpf_info_attr {
    uint32_t bpf_fd;
    uint32_t info_len;
    uint64_t info;
};

struct bpf_link_create_attr {
    uint32_t prog_fd;
    uint32_t target_fd;
    uint32_t attach_type;
    uint32_t flags;
    uint32_t nf_pf;
    uint32_t nf_hooknum;
    int32_t nf_priority;
    uint32_t nf_flags;
};

struct bpf_prog_info {
    uint32_t type;
    uint32_t id;
    uint8_t tag[8];
    uint32_t jited_prog_len;
    uint32_t xlated_prog_len;
    uint64_t jited_prog_insns;
    uint64_t xlated_prog_insns;
    uint64_t load_time;
    uint32_t created_by_uid;
    uint32_t nr_map_ids;
    uint64_t map_ids;
    char name[16];
};

struct bpf_map_info {
    uint32_t type;
    uint32_t id;
    uint32_t key_size;
    uint32_t value_size;
    uint32_t max_entries;
    uint32_t map_flags;
    char name[16];
};

struct bpf_btf_info {
    uint64_t btf;
    uint32_t btf_size;
    uint32_t id;
    uint64_t name;
    uint32_t name_len;
    uint32_t kernel_btf;
};

struct bpf_link_info {
    uint32_t type;
    uint32_t id;
    uint32_t prog_id;
    uint32_t pad;           /* the kind-specific union is 8-aligned */
    uint32_t nf_pf;
    uint32_t nf_hooknum;
    int32_t nf_priority;
    uint32_t nf_flags;
};
""")
_libc = ffi.dlopen(None)


class BpfError(OSError):
    def __init__(self, err: int, cmd: str, message: str = ""):
        self.cmd = cmd
        text = f"{cmd}: {message}: {os.strerror(err)}" if message else f"{cmd}: {os.strerror(err)}"
        super().__init__(err, text)


class VerifierError(BpfError):
    def __init__(self, err: int, message: str, log: str):
        self.log = log
        # The reason is the last line before the closing statistics.
        last = next((line for line in reversed(log.splitlines())
                     if line.strip() and not line.startswith(("processed ", "verification time"))), "")
        super().__init__(err, "BPF_PROG_LOAD", f"{message} rejected by the verifier: {last}")

    def __str__(self):
        tail = "\n".join(self.log.rstrip().splitlines()[-20:])
        return f"{super().__str__()}\nverifier log (last lines; .log has it all):\n{tail}"


def _sys_bpf(cmd: int, attr) -> int:
    try:
        number = _SYS_BPF[platform.machine()]
    except KeyError:
        raise OSError(_errno.ENOSYS, f"bpf(2) syscall number unknown for {platform.machine()}") from None
    return _libc.syscall(ffi.cast("long", number), ffi.cast("long", cmd),
                         ffi.cast("void *", attr), ffi.cast("long", ffi.sizeof(attr[0])))


def _call(cmd: int, attr, message: str = "") -> int:
    ret = _sys_bpf(cmd, attr)
    if ret < 0:
        raise BpfError(ffi.errno, _CMD_NAMES[cmd], message)
    return ret


def _ptr(buf) -> int:
    return int(ffi.cast("uintptr_t", buf))


def _obj_name(name: str) -> bytes:
    """The kernel takes at most 15 characters from [A-Za-z0-9_.] for object names."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)[:BPF_OBJ_NAME_LEN - 1].encode()


# -- maps -----------------------------------------------------------------

def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, inner_map_fd: int = 0,
               btf: "tuple[int, int, int] | None" = None) -> int:
    """`btf` is (BTF fd, key type id, value type id), which a map whose value holds
    a bpf_spin_lock needs."""
    attr = ffi.new("struct bpf_map_create_attr *")
    if btf is not None:
        attr.btf_fd, attr.btf_key_type_id, attr.btf_value_type_id = btf
    attr.map_type = map_type
    attr.key_size = key_size
    attr.value_size = value_size
    attr.max_entries = max_entries
    attr.map_flags = flags
    attr.inner_map_fd = inner_map_fd
    attr.map_name = _obj_name(name)
    return _call(BPF_MAP_CREATE, attr, f"map {name!r}")


def btf_load(raw: bytes) -> int:
    """Load raw BTF (types for map keys and values); its fd."""
    buf = ffi.from_buffer(raw)
    attr = ffi.new("struct bpf_btf_load_attr *")
    attr.btf = _ptr(buf)
    attr.btf_size = len(raw)
    return _call(BPF_BTF_LOAD, attr, "BTF")


def _elem_attr(fd: int, key, value=None, flags: int = 0):
    attr = ffi.new("struct bpf_map_elem_attr *")
    attr.map_fd = fd
    attr.key = _ptr(key) if key is not None else 0
    attr.value = _ptr(value) if value is not None else 0
    attr.flags = flags
    return attr


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    kbuf = ffi.from_buffer(key)
    vbuf = ffi.from_buffer(value)
    _call(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, kbuf, vbuf, flags))


def map_lookup(fd: int, key: bytes, value_size: int, flags: int = 0) -> "bytes | None":
    """``value_size`` must be percpu_value_size(...) for per-CPU maps; `flags`:
    BPF_F_LOCK copies a value holding a bpf_spin_lock under it."""
    kbuf = ffi.from_buffer(key)
    vbuf = ffi.new("char[]", value_size)
    if _sys_bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, kbuf, vbuf, flags)) < 0:
        err = ffi.errno
        if err == _errno.ENOENT:
            return None
        raise BpfError(err, "BPF_MAP_LOOKUP_ELEM")
    return ffi.buffer(vbuf)[:]


def map_items(fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, one by one (what goes meanwhile is left out)."""
    out, key = [], None
    while (key := map_next_key(fd, key, key_size)) is not None:
        value = map_lookup(fd, key, value_size)
        if value is not None:
            out.append((key, value))
    return out


def map_delete(fd: int, key: bytes) -> bool:
    kbuf = ffi.from_buffer(key)
    if _sys_bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, kbuf)) < 0:
        err = ffi.errno
        if err == _errno.ENOENT:
            return False
        raise BpfError(err, "BPF_MAP_DELETE_ELEM")
    return True


def map_next_key(fd: int, key: "bytes | None", key_size: int) -> "bytes | None":
    """The key after ``key`` (the first key for None), or None at the end."""
    kbuf = ffi.from_buffer(key) if key is not None else None
    nbuf = ffi.new("char[]", key_size)
    if _sys_bpf(BPF_MAP_GET_NEXT_KEY, _elem_attr(fd, kbuf, nbuf)) < 0:
        err = ffi.errno
        if err == _errno.ENOENT:
            return None
        raise BpfError(err, "BPF_MAP_GET_NEXT_KEY")
    return ffi.buffer(nbuf)[:]


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Write `count` consecutive keys and values in one call (a 100k-key table would
    otherwise cost 100k syscalls)."""
    kbuf, vbuf = ffi.from_buffer(keys), ffi.from_buffer(values)
    done = 0
    key_size, value_size = len(keys) // max(count, 1), len(values) // max(count, 1)
    while done < count:
        attr = ffi.new("struct bpf_batch_attr *")
        attr.map_fd = fd
        attr.keys = _ptr(kbuf) + done * key_size
        attr.values = _ptr(vbuf) + done * value_size
        attr.count = count - done
        if _sys_bpf(BPF_MAP_UPDATE_BATCH, attr) < 0:
            raise BpfError(ffi.errno, "BPF_MAP_UPDATE_BATCH", f"map fd {fd}")
        done += attr.count


def map_delete_batch(fd: int, keys: bytes, count: int) -> None:
    """Delete `count` consecutive keys, every one of which must be there."""
    kbuf = ffi.from_buffer(keys)
    done = 0
    key_size = len(keys) // max(count, 1)
    while done < count:
        attr = ffi.new("struct bpf_batch_attr *")
        attr.map_fd = fd
        attr.keys = _ptr(kbuf) + done * key_size
        attr.count = count - done
        if _sys_bpf(BPF_MAP_DELETE_BATCH, attr) < 0:
            raise BpfError(ffi.errno, "BPF_MAP_DELETE_BATCH", f"map fd {fd}")
        done += attr.count


_rcu_gate: "list[int]" = []   # an array of maps and the map it is updated with


def wait_for_programs() -> None:
    """Return once every BPF program that was running has finished: after a program
    was swapped out, nothing runs it any more. Updating an array of maps from here
    makes the kernel wait for that (maybe_wait_bpf_programs(), a synchronize_rcu()):
    it is how the kernel's own BPF selftests wait for programs too."""
    if not _rcu_gate:
        inner = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, "bpfilter_rcu_in")
        outer = map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, "bpfilter_rcu",
                           inner_map_fd=inner)
        _rcu_gate[:] = [outer, inner]
    outer, inner = _rcu_gate
    map_update(outer, b"\0\0\0\0", inner.to_bytes(4, "little"))


def map_lookup_batch(fd: int, key_size: int, value_size: int, count: int) -> tuple[bytes, bytes]:
    """Every key and value (value_size per key; per-CPU maps: percpu_value_size), in
    the map's order, for a map holding `count` keys."""
    keys = ffi.new("char[]", max(count, 1) * key_size)
    values = ffi.new("char[]", max(count, 1) * value_size)
    cursor = ffi.new("char[]", max(key_size, 8))
    got = 0
    while got < count:
        attr = ffi.new("struct bpf_batch_attr *")
        attr.map_fd = fd
        attr.in_batch = _ptr(cursor) if got else 0
        attr.out_batch = _ptr(cursor)
        attr.keys = _ptr(keys) + got * key_size
        attr.values = _ptr(values) + got * value_size
        attr.count = count - got
        failed = _sys_bpf(BPF_MAP_LOOKUP_BATCH, attr) < 0
        got += attr.count
        if failed:
            if ffi.errno == _errno.ENOENT:
                break
            raise BpfError(ffi.errno, "BPF_MAP_LOOKUP_BATCH", f"map fd {fd}")
    return ffi.buffer(keys, got * key_size)[:], ffi.buffer(values, got * value_size)[:]


def cpu_list_count(text: str) -> int:
    """How many CPUs a sysfs CPU list such as "0-1" or "0,2-3" names."""
    count = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def possible_cpus() -> int:
    """Per-CPU maps hold one slot per *possible* CPU, not per online one."""
    with open("/sys/devices/system/cpu/possible") as f:
        return cpu_list_count(f.read())


def percpu_value_size(value_size: int) -> int:
    return (value_size + 7) // 8 * 8 * possible_cpus()


# -- programs -------------------------------------------------------------

def _prog_load_attr(prog_type, insns_buf, insn_cnt, name, license_buf,
                    expected_attach_type, fd_array_buf, func_info, attach_btf_id=0):
    attr = ffi.new("struct bpf_prog_load_attr *")
    attr.prog_type = prog_type
    attr.insns = _ptr(insns_buf)
    attr.insn_cnt = insn_cnt
    attr.license = _ptr(license_buf)
    attr.prog_name = _obj_name(name)
    attr.expected_attach_type = expected_attach_type
    attr.attach_btf_id = attach_btf_id
    attr.fd_array = _ptr(fd_array_buf) if fd_array_buf is not None else 0
    if func_info is not None:
        btf_fd, records, count = func_info
        attr.prog_btf_fd = btf_fd
        attr.func_info = _ptr(records)
        attr.func_info_rec_size = 8
        attr.func_info_cnt = count
    return attr


# The verifier gives up with EAGAIN when a signal is pending (a child exiting, a
# debugger's stop): the load is tried again, as libbpf does.
_PROG_LOAD_ATTEMPTS = 5


def _prog_load(attr) -> int:
    for _ in range(_PROG_LOAD_ATTEMPTS):
        fd = _sys_bpf(BPF_PROG_LOAD, attr)
        if fd >= 0 or ffi.errno != _errno.EAGAIN:
            break
    return fd


def prog_load(prog_type: int, insns: bytes, name: str, license: str = "GPL",
              expected_attach_type: int = 0, fd_array: "list[int] | None" = None,
              log_size: int = 1 << 20, functions: "list[tuple[int, str]] | None" = None,
              attach_btf_id: int = 0) -> int:
    """Load a program; on rejection raise VerifierError carrying the whole log.

    ``fd_array`` backs BPF_PSEUDO_MAP_IDX loads and kfunc calls into module
    BTF (insn.off indexes it). ``functions``, (first instruction, name) of the
    main program and of each subprogram, declares them in BTF: a program passing
    a callback must. ``attach_btf_id``: the vmlinux function a tracing program
    attaches to (an iterator's bpf_iter_* target). The first attempt runs without a log, which is much faster
    for big programs; only a failure is repeated with one.
    """
    if len(insns) % 8:
        raise ValueError(f"program {name!r}: {len(insns)} bytes is not a whole number of instructions")
    if functions is None:
        return _prog_load_logged(prog_type, insns, name, license, expected_attach_type,
                                 fd_array, log_size, None, attach_btf_id)
    blob, type_ids = functions_btf([fname for _, fname in functions])
    btf_fd = btf_load(blob)
    try:
        records = ffi.new("uint32_t[]", [v for (slot, _), tid in zip(functions, type_ids)
                                         for v in (slot, tid)])
        return _prog_load_logged(prog_type, insns, name, license, expected_attach_type,
                                 fd_array, log_size, (btf_fd, records, len(functions)),
                                 attach_btf_id)
    finally:
        os.close(btf_fd)


def _prog_load_logged(prog_type, insns, name, license, expected_attach_type, fd_array,
                      log_size, func_info, attach_btf_id=0) -> int:
    insns_buf = ffi.from_buffer(insns)
    license_buf = ffi.new("char[]", license.encode())
    fd_array_buf = ffi.new("int[]", fd_array) if fd_array else None
    attr = _prog_load_attr(prog_type, insns_buf, len(insns) // 8, name, license_buf,
                           expected_attach_type, fd_array_buf, func_info, attach_btf_id)
    fd = _prog_load(attr)
    if fd >= 0:
        return fd
    first_err = ffi.errno

    size = max(log_size, _LOG_MIN)
    while True:
        log_buf = ffi.new("char[]", size)
        attr = _prog_load_attr(prog_type, insns_buf, len(insns) // 8, name, license_buf,
                               expected_attach_type, fd_array_buf, func_info, attach_btf_id)
        attr.log_level = BPF_LOG_LEVEL1
        attr.log_buf = _ptr(log_buf)
        attr.log_size = size
        fd = _prog_load(attr)
        if fd >= 0:
            return fd
        err = ffi.errno
        # ENOSPC: the log was cut; log_true_size says how much it needs.
        if err == _errno.ENOSPC and size < _LOG_MAX:
            size = min(max(attr.log_true_size + 1, size * 2), _LOG_MAX)
            continue
        log = ffi.string(log_buf).decode(errors="replace")
        if not log:
            raise BpfError(first_err, "BPF_PROG_LOAD", f"program {name!r}")
        raise VerifierError(err, f"program {name!r}", log)


def prog_test_run(prog_fd: int, data: bytes, ctx: "bytes | None" = None,
                  repeat: int = 1) -> "tuple[int, int]":
    """Run a loaded program on ``data``; (return value, mean run time in ns)."""
    data_buf = ffi.from_buffer(data)
    ctx_buf = ffi.from_buffer(ctx) if ctx else None
    attr = ffi.new("struct bpf_test_run_attr *")
    attr.prog_fd = prog_fd
    attr.data_in = _ptr(data_buf)
    attr.data_size_in = len(data)
    if ctx_buf is not None:
        attr.ctx_in = _ptr(ctx_buf)
        attr.ctx_size_in = len(ctx)
    attr.repeat = repeat
    _call(BPF_PROG_TEST_RUN, attr)
    return attr.retval, attr.duration


_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD


def nf_hook_state_ctx(hook: int, pf: int) -> bytes:
    """A ``struct nf_hook_state`` with only hook and pf set, laid out per the running kernel."""
    btf = Btf.vmlinux()
    ctx = bytearray(btf.struct_size("nf_hook_state"))
    for field, value in (("hook", hook), ("pf", pf)):
        off, size = btf.member("nf_hook_state", field)
        ctx[off:off + size] = value.to_bytes(size, sys.byteorder)
    return bytes(ctx)


def nf_test_run(prog_fd: int, hook: int, packet_ip: bytes, repeat: int = 1) -> "tuple[int, int]":
    """Test-run a netfilter program on an IP packet as if at ``hook``; (verdict, ns).

    What bpf_prog_test_run_nf (net/bpf/test_run.c) wants:

    * ctx_in, if given, is a ``struct nf_hook_state`` of at most the kernel's
      size whose in, out, net, sk and okfn are all NULL; only pf (IPv4 or
      IPv6, else EINVAL) and hook are taken from it. Without ctx it runs as
      IPv4 LOCAL_OUT.
    * For LOCAL_OUT the data is the bare IP packet (at least 20 bytes) and
      skb->protocol is set from pf; the skb's network header is not reset.
    * For every other hook the data must start with a 14-byte Ethernet
      header: the kernel runs eth_type_trans() against the netns' loopback
      device, pulls the header off (the program sees skb->data at the IP
      header) and insists that the ethertype agrees with pf (EINVAL, or
      EPROTO for a non-IP ethertype). A zero destination MAC matches
      loopback's address, so the packet counts as PACKET_HOST.
    * state->in/out: the kernel chooses them by switching on the hook
      *before* copying the caller's hook, i.e. always as for LOCAL_OUT:
      out = the calling netns' loopback device, in = NULL, whatever the hook.
    * The data (plus the kernel's headroom) must fit in a page, flags, cpu
      and batch_size must be 0, and there is no data_out.

    The address family comes from the IP version nibble of ``packet_ip``.
    """
    version = packet_ip[0] >> 4 if packet_ip else 0
    if version not in (4, 6):
        raise ValueError(f"not an IP packet (version {version})")
    pf, ethertype = (NFPROTO_IPV4, _ETH_P_IP) if version == 4 else (NFPROTO_IPV6, _ETH_P_IPV6)
    data = packet_ip
    if hook != NF_INET_LOCAL_OUT:
        data = bytes(12) + ethertype.to_bytes(2, "big") + packet_ip
    return prog_test_run(prog_fd, data, nf_hook_state_ctx(hook, pf), repeat)


# -- links, pins, ids -----------------------------------------------------

def link_create_netfilter(prog_fd: int, pf: int, hooknum: int, priority: int,
                          flags: int = 0) -> int:
    """Attach a BPF_PROG_TYPE_NETFILTER program to a hook of the caller's netns.

    The hook lives until the last fd (or pin) of the link is gone. The kernel
    refuses priority NF_IP_PRI_FIRST/NF_IP_PRI_LAST (ERANGE), a priority at
    or before NF_IP_PRI_CONNTRACK_DEFRAG with BPF_F_NETFILTER_IP_DEFRAG
    (ERANGE), and a second BPF hook at the same pf/hook/priority (EBUSY).
    """
    attr = ffi.new("struct bpf_link_create_attr *")
    attr.prog_fd = prog_fd
    attr.attach_type = BPF_NETFILTER
    attr.nf_pf = pf
    attr.nf_hooknum = hooknum
    attr.nf_priority = priority
    attr.nf_flags = flags
    return _call(BPF_LINK_CREATE, attr, f"netfilter pf {pf} hook {hooknum} priority {priority}")


def iter_link_create(prog_fd: int) -> int:
    """A BPF_TRACE_ITER program's link (for an iterator that takes no parameters)."""
    attr = ffi.new("struct bpf_link_create_attr *")
    attr.prog_fd = prog_fd
    attr.attach_type = BPF_TRACE_ITER
    return _call(BPF_LINK_CREATE, attr, f"iterator of program fd {prog_fd}")


def iter_create(link_fd: int) -> int:
    """A new pass of an iterator: read() the fd to the end to run it."""
    attr = ffi.new("struct bpf_link_detach_attr *")   # {link_fd}, as bpf_iter_create's attr
    attr.link_fd = link_fd
    return _call(BPF_ITER_CREATE, attr, f"iterator link fd {link_fd}")


def link_detach(link_fd: int) -> None:
    """Unhook a link now, whoever else still holds or pins it.

    Needed because a netfilter link holds a reference on its network namespace:
    a namespace deleted while bpfilter's links are pinned would live on, unreachable,
    until they are detached."""
    attr = ffi.new("struct bpf_link_detach_attr *")
    attr.link_fd = link_fd
    _call(BPF_LINK_DETACH, attr, f"link fd {link_fd}")


def obj_pin(fd: int, path: str) -> None:
    path_buf = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct bpf_obj_attr *")
    attr.pathname = _ptr(path_buf)
    attr.bpf_fd = fd
    _call(BPF_OBJ_PIN, attr, path)


def obj_get(path: str) -> int:
    path_buf = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct bpf_obj_attr *")
    attr.pathname = _ptr(path_buf)
    return _call(BPF_OBJ_GET, attr, path)


def pinned_maps(root: str, names, make) -> dict:
    """The maps `names` pinned under the bpffs directory `root` (a restarted service's
    programs still read them), each missing one made by make(name) and pinned there;
    name -> fd. On failure, none is left open."""
    fds: dict = {}
    try:
        for name in names:
            path = os.path.join(root, name)
            if os.path.exists(path):
                fds[name] = obj_get(path)
            else:
                fds[name] = make(name)
                obj_pin(fds[name], path)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _get_fd_by_id(cmd: int, obj_id: int) -> int:
    attr = ffi.new("struct bpf_id_attr *")
    attr.id = obj_id
    return _call(cmd, attr, f"id {obj_id}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return _get_fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)


def map_get_fd_by_id(map_id: int) -> int:
    return _get_fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id)


def link_get_fd_by_id(link_id: int) -> int:
    return _get_fd_by_id(BPF_LINK_GET_FD_BY_ID, link_id)


def _next_id(cmd: int, start: int) -> "int | None":
    attr = ffi.new("struct bpf_id_attr *")
    attr.id = start
    if _sys_bpf(cmd, attr) < 0:
        err = ffi.errno
        if err == _errno.ENOENT:
            return None
        raise BpfError(err, _CMD_NAMES[cmd])
    return attr.next_id


def prog_get_next_id(start: int = 0) -> "int | None":
    return _next_id(BPF_PROG_GET_NEXT_ID, start)


def map_get_next_id(start: int = 0) -> "int | None":
    return _next_id(BPF_MAP_GET_NEXT_ID, start)


def link_get_next_id(start: int = 0) -> "int | None":
    return _next_id(BPF_LINK_GET_NEXT_ID, start)


def kernel_btf_fd(name: str) -> int:
    """A file descriptor of the kernel's BTF object named `name` (a module's name,
    or vmlinux): what a program's fd_array holds for calls to a module's kfuncs."""
    btf_id = 0
    while (btf_id := _next_id(BPF_BTF_GET_NEXT_ID, btf_id)) is not None:
        try:
            fd = _get_fd_by_id(BPF_BTF_GET_FD_BY_ID, btf_id)
        except BpfError as e:
            if e.errno == _errno.ENOENT:   # unloaded meanwhile
                continue
            raise
        buf = ffi.new("char[]", 64)
        info = ffi.new("struct bpf_btf_info *")
        info.name, info.name_len = _ptr(buf), 64
        try:
            _obj_info(fd, info)
        except BaseException:
            os.close(fd)
            raise
        if info.kernel_btf and ffi.string(buf).decode() == name:
            return fd
        os.close(fd)
    raise BpfError(_errno.ENOENT, "BPF_BTF_GET_NEXT_ID", f"no kernel BTF named {name!r}")


# -- object info ----------------------------------------------------------

def _obj_info(fd: int, info) -> None:
    attr = ffi.new("struct bpf_info_attr *")
    attr.bpf_fd = fd
    attr.info_len = ffi.sizeof(info[0])
    attr.info = _ptr(info)
    _call(BPF_OBJ_GET_INFO_BY_FD, attr, f"fd {fd}")


def prog_info(fd: int) -> dict:
    info = ffi.new("struct bpf_prog_info *")
    _obj_info(fd, info)
    map_ids = []
    if info.nr_map_ids:
        # The kernel fills map_ids only when handed a buffer and its length.
        ids = ffi.new("uint32_t[]", info.nr_map_ids)
        count = info.nr_map_ids
        info = ffi.new("struct bpf_prog_info *")
        info.nr_map_ids = count
        info.map_ids = _ptr(ids)
        _obj_info(fd, info)
        map_ids = list(ids)[:min(count, info.nr_map_ids)]
    return {
        "id": info.id,
        "type": info.type,
        "name": ffi.string(info.name).decode(),
        "tag": bytes(info.tag).hex(),
        "xlated_prog_len": info.xlated_prog_len,
        "jited_prog_len": info.jited_prog_len,
        "load_time": info.load_time,
        "nr_map_ids": info.nr_map_ids,
        "map_ids": map_ids,
    }


def prog_xlated_insns(fd: int) -> bytes:
    """The program as the verifier rewrote it (what bpftool's `dump xlated` shows)."""
    size = prog_info(fd)["xlated_prog_len"]
    buf = ffi.new("uint8_t[]", size)
    info = ffi.new("struct bpf_prog_info *")
    info.xlated_prog_len = size
    info.xlated_prog_insns = _ptr(buf)
    _obj_info(fd, info)
    return bytes(ffi.buffer(buf, min(size, info.xlated_prog_len)))


def map_info(fd: int) -> dict:
    info = ffi.new("struct bpf_map_info *")
    _obj_info(fd, info)
    return {
        "id": info.id,
        "type": info.type,
        "key_size": info.key_size,
        "value_size": info.value_size,
        "max_entries": info.max_entries,
        "map_flags": info.map_flags,
        "name": ffi.string(info.name).decode(),
    }


def link_info(fd: int) -> dict:
    info = ffi.new("struct bpf_link_info *")
    _obj_info(fd, info)
    out = {"id": info.id, "type": info.type, "prog_id": info.prog_id}
    if info.type == BPF_LINK_TYPE_NETFILTER:
        out.update(pf=info.nf_pf, hooknum=info.nf_hooknum,
                   priority=info.nf_priority, flags=info.nf_flags)
    return out
