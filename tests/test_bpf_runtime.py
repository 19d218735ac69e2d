"""The BPF runtime layer against the real kernel: BTF, bpf(2), netns."""
import errno
import os
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from bpfilter import netns
from bpfilter.bpf import syscall as bpf
from bpfilter.bpf.btf import Btf, BtfError

pytestmark = pytest.mark.kernel


def insn(code, dst=0, src=0, off=0, imm=0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


MOV64_IMM, MOV64_REG, LDX_DW, LDX_W, JEQ_IMM, JNE_IMM, EXIT = 0xB7, 0xBF, 0x79, 0x61, 0x15, 0x55, 0x95

ACCEPT = bytes.fromhex("b700000001000000" "9500000000000000")   # r0 = 1; exit
DROP = insn(MOV64_IMM, 0, imm=bpf.NF_DROP) + insn(EXIT)

# 20-byte IPv4 header, UDP, 127.0.0.1 -> 127.0.0.1, no payload.
IPV4 = bytes.fromhex("4500001400000000401100007f0000017f000001")
# 40-byte IPv6 header, no next header, ::1 -> ::1.
IPV6 = bytes.fromhex("6000000000003b40") + bytes(15) + b"\1" + bytes(15) + b"\1"


def load_nf(insns: bytes, name: str) -> int:
    return bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, insns, name,
                         expected_attach_type=bpf.BPF_NETFILTER)


@pytest.fixture
def accept_prog():
    fd = load_nf(ACCEPT, "test_accept")
    yield fd
    os.close(fd)


@pytest.fixture
def bpffs():
    with open("/proc/self/mounts") as f:
        if any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f):
            with tempfile.TemporaryDirectory(dir="/sys/fs/bpf") as d:
                yield d
            return
    d = tempfile.mkdtemp(prefix="bpffs-")
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=True)
        os.rmdir(d)


# -- BTF --------------------------------------------------------------------

def test_btf_loads_quickly():
    with open("/sys/kernel/btf/vmlinux", "rb") as f:
        raw = f.read()
    start = time.monotonic()
    Btf(raw)
    assert time.monotonic() - start < 1.0
    assert Btf.vmlinux() is Btf.vmlinux()


def test_btf_kfuncs():
    btf = Btf.vmlinux()
    for name in ("bpf_dynptr_from_skb", "bpf_dynptr_slice"):
        type_id = btf.kfunc_id(name)
        assert type_id > 0
        assert btf.kind(type_id) == "func" and btf.name(type_id) == name


def test_btf_members():
    btf = Btf.vmlinux()
    assert btf.member("sk_buff", "len")[1] == 4
    assert btf.member("bpf_nf_ctx", "state") == (0, 8)
    assert btf.member("bpf_nf_ctx", "skb") == (8, 8)
    assert btf.member("nf_hook_state", "hook")[1] == 1
    assert btf.member("nf_hook_state", "pf")[1] == 1
    assert btf.member("net_device", "name")[1] == 16        # IFNAMSIZ char array
    hook_state = btf.struct_size("nf_hook_state")
    assert btf.member("nf_hook_state", "okfn")[0] + 8 <= hook_state
    # A named member of an anonymous union, and descent through a named member.
    assert btf.member("bpf_link_info", "netfilter.priority") == (24, 4)
    assert btf.member("bpf_attr", "link_create.netfilter.pf") == (16, 4)
    # protocol sits inside an anonymous struct of sk_buff: must still resolve.
    off, size = btf.member("sk_buff", "protocol")
    assert size == 2 and 0 < off < btf.struct_size("sk_buff")


def test_btf_bitfields():
    btf = Btf.vmlinux()
    # pkt_type:3 starts the byte the kernel marks with __pkt_type_offset[0]
    marker, _ = btf.member("sk_buff", "__pkt_type_offset")
    assert btf.bitfield("sk_buff", "pkt_type") == (marker * 8, 3)
    with pytest.raises(BtfError, match="sk_buff.len is not a bitfield"):
        btf.bitfield("sk_buff", "len")


def test_btf_enum_values():
    btf = Btf.vmlinux()
    assert btf.enum_value("bpf_prog_type", "BPF_PROG_TYPE_NETFILTER") == 32
    assert btf.enum_value("nf_ip_hook_priorities", "NF_IP_PRI_FIRST") == -(1 << 31)


def test_btf_errors_name_what_is_missing():
    btf = Btf.vmlinux()
    with pytest.raises(BtfError, match="bpf_no_such_kfunc"):
        btf.kfunc_id("bpf_no_such_kfunc")
    with pytest.raises(BtfError, match="no_such_struct"):
        btf.struct_size("no_such_struct")
    with pytest.raises(BtfError, match=r"sk_buff has no member 'no_such_field'"):
        btf.member("sk_buff", "no_such_field")
    with pytest.raises(BtfError, match=r"nf_hook_state\.hook is a int"):
        btf.member("nf_hook_state", "hook.x")
    with pytest.raises(BtfError, match="bitfield"):
        btf.member("sk_buff", "pkt_type")
    with pytest.raises(BtfError, match="NOPE"):
        btf.enum_value("bpf_prog_type", "NOPE")
    with pytest.raises(BtfError, match="no union named 'sk_buff'"):
        btf.type_id("sk_buff", "union")
    assert issubclass(BtfError, LookupError)


def _raw_btf(types: bytes, strings: bytes) -> bytes:
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                       len(strings)) + types + strings


def _moved_to_module(name: str, tmp_path):
    """A kernel whose `struct name` is in a module's BTF rather than vmlinux's, as
    where nf_conntrack is not built in: vmlinux's BTF with the struct's name
    spelled differently, and a split BTF ("module") with the struct, whose members
    keep naming vmlinux's strings and types. Returns the sysfs-like directory, the
    base's type count and the real struct's id."""
    with open("/sys/kernel/btf/vmlinux", "rb") as f:
        raw = bytearray(f.read())
    real = Btf.vmlinux()
    type_id = real.type_id(name, "struct")
    name_off, info, _ = struct.unpack_from("<III", real._types, real._offsets[type_id])
    record = bytes(real._types[real._offsets[type_id]:][:12 + 12 * (info & 0xFFFF)])
    hdr_len, _, _, str_off, str_len = struct.unpack_from("<IIIII", raw, 4)
    where = hdr_len + str_off + name_off
    assert raw[where:where + len(name) + 1] == name.encode() + b"\0"
    raw[where + len(name) - 1] ^= 0x20      # nf_conn -> nf_coN
    module_strings = b"\0" + name.encode() + b"\0"
    split = _raw_btf(struct.pack("<I", str_len + 1) + record[4:], module_strings)
    (tmp_path / "vmlinux").write_bytes(raw)
    (tmp_path / "nf_conntrack").write_bytes(split)
    return tmp_path, len(real._offsets) - 1, type_id


@pytest.fixture
def sysfs_btf(monkeypatch):
    """Points Btf at another /sys/kernel/btf for one test."""
    from bpfilter.bpf import btf as btf_module
    from bpfilter.ext.conntrack import ct_offsets

    def point(directory):
        monkeypatch.setattr(btf_module, "SYSFS_DIR", str(directory))
        monkeypatch.setattr(btf_module, "VMLINUX_PATH", f"{directory}/vmlinux")
        monkeypatch.setattr(Btf, "_vmlinux", None)
        monkeypatch.setattr(Btf, "_modules", {})
        ct_offsets.cache_clear()
    yield point
    ct_offsets.cache_clear()


def test_split_btf_continues_vmlinux_ids_and_strings(tmp_path, sysfs_btf):
    directory, base_count, real_id = _moved_to_module("nf_conn", tmp_path)
    sysfs_btf(directory)
    assert Btf.vmlinux().ids("nf_conn") == []
    module = Btf.module("nf_conntrack")
    new_id = module.type_id("nf_conn", "struct")
    assert new_id == base_count + 1               # the first id after vmlinux's
    real = Btf(open("/sys/kernel/btf/vmlinux", "rb").read())
    # its members: names from vmlinux's strings, types from vmlinux's ids
    for member in ("status", "tuplehash", "ct_net", "mark"):
        assert module.member("nf_conn", member) == real.member("nf_conn", member)
    assert module.struct_size("nf_conn") == real.struct_size("nf_conn")
    assert module.struct_size("sk_buff") == real.struct_size("sk_buff")   # vmlinux's own
    # bpftool reads the same split blob the same way
    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(directory / "nf_conntrack"),
                           "-B", str(directory / "vmlinux")], capture_output=True, text=True,
                          check=True).stdout
    assert f"[{new_id}] STRUCT 'nf_conn' size={real.struct_size('nf_conn')}" in dump
    assert f"'status' type_id={real._find_member(real_id, 'status')[0]}" in dump
    # read once while the module's file stays; a reloaded module's file is read again
    assert Btf.module("nf_conntrack") is module
    reloaded = directory / "nf_conntrack.new"
    reloaded.write_bytes((directory / "nf_conntrack").read_bytes())
    reloaded.rename(directory / "nf_conntrack")
    assert Btf.module("nf_conntrack") is not module


def test_conntrack_offsets_from_the_nf_conntrack_module(tmp_path, sysfs_btf):
    """Where vmlinux's BTF lacks struct nf_conn, conntrack matches read nf_conntrack's."""
    from bpfilter.errors import BpfilterError
    from bpfilter.ext.conntrack import CtOffsets, ct_offsets
    expected = CtOffsets.from_btf(Btf.vmlinux())
    directory, _, _ = _moved_to_module("nf_conn", tmp_path)
    sysfs_btf(directory)
    assert ct_offsets() == expected
    (directory / "nf_conntrack").unlink()
    sysfs_btf(directory)
    with pytest.raises(BpfilterError, match=r"no struct or union named 'nf_conn'.*"
                                            r"module 'nf_conntrack' is not loaded") as refused:
        ct_offsets()
    assert refused.value.errno == errno.EOPNOTSUPP


# -- uapi constants and layouts, checked against the running kernel ---------

def test_constants_match_kernel_enums():
    btf = Btf.vmlinux()
    enums = {"BPF_MAP_TYPE_": "bpf_map_type", "BPF_PROG_TYPE_": "bpf_prog_type",
             "BPF_LINK_TYPE_": "bpf_link_type", "NF_INET_": "nf_inet_hooks",
             "NF_IP_PRI_": "nf_ip_hook_priorities"}
    checked = 0
    for name, value in vars(bpf).items():
        for prefix, enum in enums.items():
            if name.startswith(prefix):
                assert btf.enum_value(enum, name) == value, name
                checked += 1
    for value, name in bpf._CMD_NAMES.items():
        assert btf.enum_value("bpf_cmd", name) == value, name
        checked += 1
    assert btf.enum_value("bpf_attach_type", "BPF_NETFILTER") == bpf.BPF_NETFILTER
    assert checked > 30


LAYOUTS = {
    "bpf_map_create_attr": ("bpf_attr", {f: f for f in (
        "map_type", "key_size", "value_size", "max_entries", "map_flags",
        "inner_map_fd", "numa_node", "map_name", "map_ifindex", "btf_fd", "btf_key_type_id",
        "btf_value_type_id")}),
    "bpf_btf_load_attr": ("bpf_attr", {f: f for f in (
        "btf", "btf_log_buf", "btf_size", "btf_log_size", "btf_log_level")}),
    "bpf_map_elem_attr": ("bpf_attr", {f: f for f in ("map_fd", "key", "value", "flags")}),
    "bpf_prog_load_attr": ("bpf_attr", {f: f for f in (
        "prog_type", "insn_cnt", "insns", "license", "log_level", "log_size", "log_buf",
        "kern_version", "prog_flags", "prog_name", "prog_ifindex", "expected_attach_type",
        "prog_btf_fd", "func_info_rec_size", "func_info", "func_info_cnt",
        "line_info_rec_size", "line_info", "line_info_cnt", "attach_btf_id",
        "attach_prog_fd", "core_relo_cnt", "fd_array", "core_relos",
        "core_relo_rec_size", "log_true_size")}),
    "bpf_obj_attr": ("bpf_attr", {f: f for f in ("pathname", "bpf_fd", "file_flags", "path_fd")}),
    "bpf_test_run_attr": ("bpf_attr", {f: "test." + f for f in (
        "prog_fd", "retval", "data_size_in", "data_size_out", "data_in", "data_out",
        "repeat", "duration", "ctx_size_in", "ctx_size_out", "ctx_in", "ctx_out",
        "flags", "cpu", "batch_size")}),
    "bpf_id_attr": ("bpf_attr", {"id": "start_id", "next_id": "next_id", "open_flags": "open_flags"}),
    "bpf_info_attr": ("bpf_attr", {f: "info." + f for f in ("bpf_fd", "info_len", "info")}),
    "bpf_link_create_attr": ("bpf_attr", {
        "prog_fd": "link_create.prog_fd", "target_fd": "link_create.target_fd",
        "attach_type": "link_create.attach_type", "flags": "link_create.flags",
        "nf_pf": "link_create.netfilter.pf", "nf_hooknum": "link_create.netfilter.hooknum",
        "nf_priority": "link_create.netfilter.priority", "nf_flags": "link_create.netfilter.flags"}),
    "bpf_prog_info": ("bpf_prog_info", {f: f for f in (
        "type", "id", "tag", "jited_prog_len", "xlated_prog_len", "jited_prog_insns",
        "xlated_prog_insns", "load_time", "created_by_uid", "nr_map_ids", "map_ids", "name")}),
    "bpf_map_info": ("bpf_map_info", {f: f for f in (
        "type", "id", "key_size", "value_size", "max_entries", "map_flags", "name")}),
    "bpf_link_info": ("bpf_link_info", {
        "type": "type", "id": "id", "prog_id": "prog_id",
        "nf_pf": "netfilter.pf", "nf_hooknum": "netfilter.hooknum",
        "nf_priority": "netfilter.priority", "nf_flags": "netfilter.flags"}),
}


@pytest.mark.parametrize("cstruct", sorted(LAYOUTS))
def test_cffi_layouts_match_kernel(cstruct):
    btf = Btf.vmlinux()
    kernel_type, fields = LAYOUTS[cstruct]
    ctype = bpf.ffi.typeof(f"struct {cstruct}")
    declared = {name for name, _ in ctype.fields if name != "pad"}
    assert declared == set(fields)
    for field, path in fields.items():
        expected = btf.member(kernel_type, path)
        actual = (bpf.ffi.offsetof(ctype, field), bpf.ffi.sizeof(dict(ctype.fields)[field].type))
        assert actual == expected, f"{cstruct}.{field} vs {kernel_type}.{path}"
    assert bpf.ffi.sizeof(ctype) <= btf.struct_size(kernel_type)


# -- maps -------------------------------------------------------------------

def test_cpu_list_count():
    assert bpf.cpu_list_count("0") == 1
    assert bpf.cpu_list_count("0-1\n") == 2
    assert bpf.cpu_list_count("0,2-3") == 3
    assert bpf.possible_cpus() >= os.cpu_count() >= 1
    assert bpf.percpu_value_size(4) == 8 * bpf.possible_cpus()
    assert bpf.percpu_value_size(16) == 16 * bpf.possible_cpus()


def test_array_map_round_trip():
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, 12, 3, name="test array!")
    try:
        key = struct.pack("<I", 1)
        assert bpf.map_lookup(fd, key, 12) == bytes(12)
        bpf.map_update(fd, key, b"abcdefghijkl")
        assert bpf.map_lookup(fd, key, 12) == b"abcdefghijkl"
        assert bpf.map_lookup(fd, struct.pack("<I", 3), 12) is None
        with pytest.raises(bpf.BpfError) as e:
            bpf.map_update(fd, key, bytes(12), bpf.BPF_NOEXIST)
        assert e.value.errno == errno.EEXIST and e.value.cmd == "BPF_MAP_UPDATE_ELEM"
        keys, k = [], None
        while (k := bpf.map_next_key(fd, k, 4)) is not None:
            keys.append(struct.unpack("<I", k)[0])
        assert keys == [0, 1, 2]
        info = bpf.map_info(fd)
        assert info["type"] == bpf.BPF_MAP_TYPE_ARRAY
        assert (info["key_size"], info["value_size"], info["max_entries"]) == (4, 12, 3)
        assert info["name"] == "test_array_"
        # Found again through the id walk and reopened by id.
        ids, i = [], 0
        while (i := bpf.map_get_next_id(i)) is not None:
            ids.append(i)
        assert info["id"] in ids
        again = bpf.map_get_fd_by_id(info["id"])
        try:
            bpf.map_update(again, key, b"ZZZZZZZZZZZZ")
            assert bpf.map_lookup(fd, key, 12) == b"ZZZZZZZZZZZZ"
        finally:
            os.close(again)
    finally:
        os.close(fd)


def test_hash_map_delete():
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_HASH, 8, 4, 16)
    try:
        assert bpf.map_next_key(fd, None, 8) is None
        bpf.map_update(fd, b"k" * 8, b"vvvv")
        assert bpf.map_next_key(fd, None, 8) == b"k" * 8
        assert bpf.map_delete(fd, b"k" * 8) is True
        assert bpf.map_delete(fd, b"k" * 8) is False
        assert bpf.map_lookup(fd, b"k" * 8, 4) is None
    finally:
        os.close(fd)


def test_percpu_array_map():
    ncpu = bpf.possible_cpus()
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 12, 2, name="pcpu")
    try:
        size = bpf.percpu_value_size(12)
        assert size == 16 * ncpu
        key = struct.pack("<I", 0)
        value = b"".join(struct.pack("<QQ", cpu + 1, 0x100 + cpu) for cpu in range(ncpu))
        # Each slot is padded to 8 bytes; only the first 12 of 16 are the value.
        bpf.map_update(fd, key, value)
        got = bpf.map_lookup(fd, key, size)
        for cpu in range(ncpu):
            lo, hi = struct.unpack_from("<QI", got, 16 * cpu)
            assert (lo, hi) == (cpu + 1, 0x100 + cpu)
    finally:
        os.close(fd)


def test_bad_map_raises_bpf_error():
    with pytest.raises(bpf.BpfError) as e:
        bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 3, 4, 1, name="badkey")
    assert e.value.errno == errno.EINVAL
    assert "BPF_MAP_CREATE" in str(e.value) and "badkey" in str(e.value)
    assert isinstance(e.value, OSError)


# -- programs ---------------------------------------------------------------

def test_prog_load_and_info(accept_prog):
    info = bpf.prog_info(accept_prog)
    assert info["type"] == bpf.BPF_PROG_TYPE_NETFILTER
    assert info["name"] == "test_accept"
    assert info["xlated_prog_len"] == len(ACCEPT)
    assert info["jited_prog_len"] > 0
    assert info["map_ids"] == []
    ids, i = [], 0
    while (i := bpf.prog_get_next_id(i)) is not None:
        ids.append(i)
    assert info["id"] in ids
    again = bpf.prog_get_fd_by_id(info["id"])
    try:
        assert bpf.prog_info(again)["id"] == info["id"]
    finally:
        os.close(again)


def test_prog_name_is_sanitised_and_truncated():
    fd = load_nf(ACCEPT, "iptables-filter/INPUT chain")
    try:
        assert bpf.prog_info(fd)["name"] == "iptables_filter"
    finally:
        os.close(fd)


def test_prog_info_lists_maps():
    mfd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    try:
        # r1 = map (ld_imm64, src=BPF_PSEUDO_MAP_FD); r0 = 1; exit
        prog = insn(0x18, 1, 1, imm=mfd) + insn(0) + ACCEPT
        fd = load_nf(prog, "with_map")
        try:
            assert bpf.prog_info(fd)["map_ids"] == [bpf.map_info(mfd)["id"]]
        finally:
            os.close(fd)
    finally:
        os.close(mfd)


def test_verifier_rejection_carries_log():
    bad = insn(MOV64_REG, 0, 2) + insn(EXIT)     # r0 = r2, never written
    with pytest.raises(bpf.VerifierError) as e:
        load_nf(bad, "uninit")
    assert e.value.errno == errno.EACCES
    assert "R2 !read_ok" in e.value.log
    assert "R2 !read_ok" in str(e.value)
    assert isinstance(e.value, bpf.BpfError)


def test_verifier_log_grows_past_a_small_buffer():
    # 200 instructions of log before the failure: far more than 128 bytes.
    bad = insn(MOV64_IMM, 0, imm=1) * 200 + insn(MOV64_REG, 0, 2) + insn(EXIT)
    with pytest.raises(bpf.VerifierError) as e:
        bpf.prog_load(bpf.BPF_PROG_TYPE_NETFILTER, bad, "growlog",
                      expected_attach_type=bpf.BPF_NETFILTER, log_size=128)
    assert e.value.log.startswith("0: R1=ctx() R10=fp0")
    assert "R2 !read_ok" in e.value.log
    assert len(e.value.log) > 4096


def _interrupted_loads(monkeypatch, times: int) -> list:
    """BPF_PROG_LOAD answers EAGAIN `times` times, as the verifier does when a signal
    is pending, then goes to the kernel; the loads it saw."""
    real, seen = bpf._sys_bpf, []

    def sys_bpf(cmd, attr):
        if cmd == bpf.BPF_PROG_LOAD:
            seen.append(cmd)
            if len(seen) <= times:
                bpf.ffi.errno = errno.EAGAIN
                return -1
        return real(cmd, attr)
    monkeypatch.setattr(bpf, "_sys_bpf", sys_bpf)
    return seen


def test_a_load_the_verifier_gave_up_on_for_a_signal_is_tried_again(monkeypatch):
    seen = _interrupted_loads(monkeypatch, 2)
    fd = load_nf(ACCEPT, "interrupted")
    try:
        assert bpf.prog_info(fd)["name"] == "interrupted" and len(seen) == 3
    finally:
        os.close(fd)


def test_a_load_interrupted_every_time_fails_with_eagain(monkeypatch):
    seen = _interrupted_loads(monkeypatch, 1000)
    with pytest.raises(bpf.BpfError) as e:
        load_nf(ACCEPT, "interrupted")
    assert e.value.errno == errno.EAGAIN
    assert len(seen) == 2 * bpf._PROG_LOAD_ATTEMPTS   # without a log, then with one


def test_netfilter_return_value_is_range_checked():
    with pytest.raises(bpf.VerifierError, match=r"should have been in \[0, 1\]"):
        load_nf(insn(MOV64_IMM, 0, imm=7) + insn(EXIT), "ret7")


# -- test runs --------------------------------------------------------------

@pytest.mark.parametrize("hook", range(bpf.NF_INET_NUMHOOKS))
@pytest.mark.parametrize("packet", [IPV4, IPV6], ids=["ipv4", "ipv6"])
def test_nf_test_run_every_hook(accept_prog, hook, packet):
    retval, duration = bpf.nf_test_run(accept_prog, hook, packet)
    assert retval == bpf.NF_ACCEPT
    assert duration >= 0


def test_nf_test_run_drop_and_repeat():
    fd = load_nf(DROP, "test_drop")
    try:
        assert bpf.nf_test_run(fd, bpf.NF_INET_LOCAL_IN, IPV4, repeat=100)[0] == bpf.NF_DROP
    finally:
        os.close(fd)


def test_nf_test_run_requirements(accept_prog):
    local_in = bpf.nf_hook_state_ctx(bpf.NF_INET_LOCAL_IN, bpf.NFPROTO_IPV4)
    # Hooks other than LOCAL_OUT need an Ethernet header in front.
    with pytest.raises(bpf.BpfError) as e:
        bpf.prog_test_run(accept_prog, IPV4, local_in)
    assert e.value.errno == errno.EINVAL
    # ... whose ethertype must match pf.
    ipv6_eth = bytes(12) + b"\x86\xdd" + IPV6
    with pytest.raises(bpf.BpfError) as e:
        bpf.prog_test_run(accept_prog, ipv6_eth, local_in)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(bpf.BpfError) as e:
        bpf.prog_test_run(accept_prog, bytes(12) + b"\x08\x06" + IPV4, local_in)
    assert e.value.errno == errno.EPROTO
    # No ctx: IPv4 LOCAL_OUT on the bare packet.
    assert bpf.prog_test_run(accept_prog, IPV4)[0] == bpf.NF_ACCEPT
    with pytest.raises(bpf.BpfError):
        bpf.prog_test_run(accept_prog, IPV4[:19])


def _skb_len_is(length: int) -> bytes:
    btf = Btf.vmlinux()
    return (insn(LDX_DW, 2, 1, btf.member("bpf_nf_ctx", "skb")[0])
            + insn(LDX_W, 3, 2, btf.member("sk_buff", "len")[0])
            + insn(MOV64_IMM, 0, imm=0)
            + insn(JNE_IMM, 3, off=1, imm=length)
            + insn(MOV64_IMM, 0, imm=1)
            + insn(EXIT))


def _state_dev_set(field: str) -> bytes:
    btf = Btf.vmlinux()
    return (insn(LDX_DW, 2, 1, btf.member("bpf_nf_ctx", "state")[0])
            + insn(LDX_DW, 3, 2, btf.member("nf_hook_state", field)[0])
            + insn(MOV64_IMM, 0, imm=0)
            + insn(JEQ_IMM, 3, off=1, imm=0)
            + insn(MOV64_IMM, 0, imm=1)
            + insn(EXIT))


def test_nf_test_run_skb_starts_at_ip_header():
    fd = load_nf(_skb_len_is(len(IPV4)), "skb_len")
    try:
        for hook in range(bpf.NF_INET_NUMHOOKS):
            assert bpf.nf_test_run(fd, hook, IPV4)[0] == 1, hook
    finally:
        os.close(fd)


def test_nf_test_run_devices():
    """Documents the kernel: state->out is loopback and state->in NULL at every hook."""
    results = {}
    for field in ("in", "out"):
        fd = load_nf(_state_dev_set(field), f"dev_{field}")
        try:
            results[field] = [bpf.nf_test_run(fd, h, IPV4)[0] for h in range(bpf.NF_INET_NUMHOOKS)]
        finally:
            os.close(fd)
    assert results == {"in": [0] * 5, "out": [1] * 5}, \
        "bpf_prog_test_run_nf picks devices differently now: update nf_test_run's docstring"


# -- netns, links, pins -----------------------------------------------------

def test_netns_entered_and_restored(fresh_netns):
    home = netns.ident()
    assert home == os.stat("/proc/self/ns/net").st_ino
    target = netns.ident(fresh_netns)
    assert target != home
    home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        with netns.entered(fresh_netns):
            assert netns.ident() == target
            with netns.entered(f"/proc/self/fd/{home_fd}"):    # nesting, by path
                assert netns.ident() == home
            assert netns.ident() == target
    finally:
        os.close(home_fd)
    assert netns.ident() == home
    with pytest.raises(FileNotFoundError):
        with netns.entered("bpft-does-not-exist"):
            pass
    assert netns.ident() == home


def _udp_loopback_works() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(1)
        try:
            tx.sendto(b"ping", rx.getsockname())
        except PermissionError:     # NF_DROP at LOCAL_OUT: EPERM to the sender
            return False
        try:
            return rx.recv(16) == b"ping"
        except socket.timeout:
            return False


def test_netfilter_link_in_netns(fresh_netns, accept_prog, bpffs):
    drop = load_nf(DROP, "test_drop")
    pinned = os.path.join(bpffs, "link")
    try:
        with netns.entered(fresh_netns):
            assert _udp_loopback_works()
            link = bpf.link_create_netfilter(drop, bpf.NFPROTO_IPV4, bpf.NF_INET_LOCAL_OUT, -100)
            try:
                info = bpf.link_info(link)
                assert info["type"] == bpf.BPF_LINK_TYPE_NETFILTER
                assert info["prog_id"] == bpf.prog_info(drop)["id"]
                assert (info["pf"], info["hooknum"], info["priority"], info["flags"]) == \
                    (bpf.NFPROTO_IPV4, bpf.NF_INET_LOCAL_OUT, -100, 0)
                assert not _udp_loopback_works()

                # One BPF hook per pf/hook/priority; the extremes are netfilter's.
                with pytest.raises(bpf.BpfError) as e:
                    bpf.link_create_netfilter(accept_prog, bpf.NFPROTO_IPV4, bpf.NF_INET_LOCAL_OUT, -100)
                assert e.value.errno == errno.EBUSY
                for prio in (bpf.NF_IP_PRI_FIRST, bpf.NF_IP_PRI_LAST):
                    with pytest.raises(bpf.BpfError) as e:
                        bpf.link_create_netfilter(accept_prog, bpf.NFPROTO_IPV4, bpf.NF_INET_LOCAL_IN, prio)
                    assert e.value.errno == errno.ERANGE

                ids, i = [], 0
                while (i := bpf.link_get_next_id(i)) is not None:
                    ids.append(i)
                assert info["id"] in ids

                bpf.obj_pin(link, pinned)
            finally:
                os.close(link)
            # The pin keeps the hook in place after the fd is gone.
            assert not _udp_loopback_works()
            again = bpf.obj_get(pinned)
            try:
                assert bpf.link_info(again) == info
                by_id = bpf.link_get_fd_by_id(info["id"])
                assert bpf.link_info(by_id)["id"] == info["id"]
                os.close(by_id)
            finally:
                os.close(again)
            os.unlink(pinned)
            # Dropping the pin releases the link from a workqueue, not at once.
            deadline = time.monotonic() + 5
            while not _udp_loopback_works():
                assert time.monotonic() < deadline, "hook still in place after unpinning"
                time.sleep(0.05)
        # The link was made in the other netns: ours is untouched.
        assert _udp_loopback_works()
    finally:
        os.close(drop)
        if os.path.exists(pinned):
            os.unlink(pinned)


def test_obj_get_missing_path(bpffs):
    with pytest.raises(bpf.BpfError) as e:
        bpf.obj_get(os.path.join(bpffs, "nothing"))
    assert e.value.errno == errno.ENOENT and "BPF_OBJ_GET" in str(e.value)

