"""A throwaway qemu guest with Debian's 6.12 cloud kernel, for what the host's kernel
cannot be trusted with: loading bpfilter.ko, owning the iptables socket options,
keeping ip_tables unloaded.

    from harness import run_scenario
    result = run_scenario("iptables-legacy -L", extra_files={"/usr/bin/x": "build/x"})
    result.status, result.output

The kernel, its headers and busybox come from Debian's archive through apt (no install,
only `apt-get download`) and are unpacked once into $BPFILTER_VM_CACHE (default
~/.cache/bpfilter-vm). iptables-legacy, ip, bpftool and dash (the guest's sh) are the
host's own, with the shared libraries ldd names. The initramfs holding all that is built once per kernel
and host tools; each run appends a small second archive (scenario, extra files,
module), which the kernel unpacks over the first.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Callable, Mapping, Optional

log = logging.getLogger("bpfilter.vm")

HERE = Path(__file__).resolve().parent
# the shell functions scenarios share, in every guest as /etc/bpfilter-vm/lib.sh
SCENARIO_LIB = HERE / "scenarios" / "lib.sh"
FLAVOUR = "cloud-amd64"
DEFAULT_TIMEOUT = 180
APPEND = "console=ttyS0 panic=-1 oops=panic"

# Host programs copied into the guest, found on this PATH. Debian's busybox prefers
# its own applets to anything on PATH (its `ip` cannot do netns), so the guest's sh is
# dash, as on Debian, and busybox only provides commands nothing else does.
# nft: bpfilter asks the kernel through nftables how its IPv6 extension-header walk ends.
HOST_TOOLS = ("dash", "ip", "bpftool", "xtables-legacy-multi", "nft")
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Shipped with whatever they depend on; everything else stays out of the guest, and
# what is shipped is only loaded on demand (modprobe), so ip_tables stays unloaded
# until a scenario uses it.
GUEST_MODULES = (
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
    "kernel/drivers/net/veth.ko",
    "kernel/net/bridge/bridge.ko",
)
# The guest is merged-/usr like the host, so a path ldd prints resolves in both.
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}

BEGIN = b"@@BPFILTER-VM-BEGIN@@\n"
END = re.compile(rb"\n@@BPFILTER-VM-END status=(\d+)@@\n")


class VMError(RuntimeError):
    """The guest could not be prepared, or ended without reporting a result."""


@dataclasses.dataclass
class Result:
    status: int
    output: str
    console: str  # the kernel's log and anything else on ttyS0
    seconds: float  # from starting qemu to the guest's result


def cache_dir() -> Path:
    path = Path(os.environ.get("BPFILTER_VM_CACHE") or Path.home() / ".cache" / "bpfilter-vm")
    # Absolute: the headers' Makefile is rewritten to include from here.
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise VMError(f"{' '.join(cmd)} failed:\n{proc.stderr or proc.stdout}")
    return proc


def system_libraries() -> dict[str, str]:
    """Guest path -> host file for the C library and zlib, which every Debian system has
    and the frozen helper links against; the guest otherwise only holds what its own
    tools need."""
    listed = _run(["dpkg", "-L", "libc6", "zlib1g"]).stdout.split()
    return {path: str(Path(path).resolve()) for path in listed
            if re.fullmatch(r"(/usr)?/lib/x86_64-linux-gnu/[^/]+\.so[.0-9]*", path)}


@functools.lru_cache(maxsize=None)
def kernel_release() -> str:
    """The guest's `uname -r`: $BPFILTER_VM_KVER, or the newest 6.12 cloud kernel in
    apt's lists (from bookworm-security, or backports where setup.sh had to add it)."""
    pinned = os.environ.get("BPFILTER_VM_KVER")
    if pinned:
        return pinned
    names = _run(["apt-cache", "search", "--names-only",
                  rf"^linux-headers-6\.12\.[0-9]+\+deb12-{FLAVOUR}$"]).stdout
    found = re.findall(rf"^linux-headers-(6\.12\.(\d+)\+deb12-{FLAVOUR}) ", names, re.M)
    if not found:
        raise VMError(f"apt knows no {FLAVOUR} 6.12 kernel: run tools/vm/setup.sh, which "
                      "adds the suite that has it and updates apt's lists")
    return max(found, key=lambda kver_patch: int(kver_patch[1]))[0]


def _fetch(packages: list[str], dest: Path,
           prepare: Optional[Callable[[Path], None]] = None) -> Path:
    """The packages' files unpacked under dest, downloaded the first time only;
    prepare(tree) finishes the unpacked tree before it moves to dest."""
    if dest.is_dir():
        return dest
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        debs = work / "debs"
        debs.mkdir()
        try:
            # apt's unprivileged downloader cannot write into root's cache.
            _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages],
                 cwd=debs)
        except VMError as e:
            raise VMError(f"{e}apt's lists may be out of date: run tools/vm/setup.sh") from None
        for deb in sorted(debs.iterdir()):
            _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        if prepare:
            prepare(work / "root")
        try:
            (work / "root").rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
            return dest  # another run got there first
    finally:
        shutil.rmtree(work)
    log.info("fetched %s in %.1f s", " ".join(packages), time.monotonic() - started)
    return dest


def kernel_tree(kver: Optional[str] = None) -> Path:
    """The unpacked kernel packages of kver: boot/, lib/modules/ (with depmod's
    indexes), usr/src/linux-headers-*, usr/lib/linux-kbuild-*."""
    kver = kver or kernel_release()
    abi = kver.removesuffix(f"-{FLAVOUR}")
    dest = cache_dir() / f"kernel-{kver}"

    def prepare(tree: Path):
        # Debian's per-flavour Makefile includes the common one by its installed path.
        makefile = tree / "usr/src" / f"linux-headers-{kver}" / "Makefile"
        makefile.write_text(makefile.read_text().replace(
            "include /usr/src/", f"include {dest}/usr/src/"))
        # The package leaves modules.dep to its postinst; the guest's subset needs it.
        _run(["depmod", "-b", str(tree), kver])

    return _fetch([f"linux-image-{kver}-unsigned", f"linux-headers-{kver}",
                   f"linux-headers-{abi}-common", f"linux-kbuild-{abi}"], dest, prepare)


def kernel_build_dir(kver: Optional[str] = None) -> Path:
    """Where `make -C DIR M=$PWD modules` builds an out-of-tree module for the guest."""
    kver = kver or kernel_release()
    return kernel_tree(kver) / "usr/src" / f"linux-headers-{kver}"


def _busybox() -> Path:
    # Static, and only a toolbox around the programs under test: the first one fetched
    # serves for good.
    return _fetch(["busybox-static"], cache_dir() / "busybox") / "bin/busybox"


def _udp_sender() -> Path:
    source = HERE / "udp.c"
    binary = cache_dir() / f"udp-{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}"
    if not binary.exists():
        _run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", f"{binary}.tmp", str(source)])
        os.rename(f"{binary}.tmp", binary)
    return binary


class Cpio:
    """A cpio archive in the "newc" format, the one the kernel unpacks as initramfs.
    Paths are relative to the guest's /; missing parent directories are added."""

    def __init__(self, out: IO[bytes], existing_dirs: frozenset[str] = frozenset()):
        self.out = out
        self.dirs = set(existing_dirs)
        self.ino = 0

    def _entry(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        self.ino += 1
        name = path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self.out.write(header + name + b"\0" * (-(len(header) + len(name)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def _parents(self, path: str):
        parent = os.path.dirname(path)
        if parent and parent not in self.dirs:
            self.dir(parent)

    def dir(self, path: str, mode: int = 0o755):
        self._parents(path)
        self.dirs.add(path)
        self._entry(path, stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644):
        self._parents(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str):
        self._parents(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int):
        self._parents(path)
        self._entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def close(self):
        self._entry("TRAILER!!!", 0)


def guest_path(path: str) -> str:
    """path as the guest's merged-/usr tree stores it, relative to /."""
    head, _, rest = path.strip("/").partition("/")
    head = MERGED_USR.get(head, head)
    return f"{head}/{rest}" if rest else head


def _host_file(path: str) -> tuple[str, Path]:
    """Where a host file goes in the guest, and the file whose bytes it gets."""
    return guest_path(os.path.join(os.path.realpath(os.path.dirname(path)),
                                   os.path.basename(path))), Path(os.path.realpath(path))


def _host_programs() -> list[str]:
    """The host tools and iptables' extensions (which it loads with dlopen)."""
    found = []
    for name in HOST_TOOLS:
        path = shutil.which(name, path=TOOL_PATH)
        if not path:
            raise VMError(f"{name} is not installed: run tools/vm/setup.sh")
        found.append(path)
    return found + sorted(map(str, Path("/usr/lib").glob("*/xtables/*.so")))


def _with_libraries(programs: list[str]) -> dict[str, Path]:
    """Guest path -> host file for programs and every shared library they load."""
    libs = set()
    for line in _run(["ldd", *programs]).stdout.splitlines():
        match = re.match(r"\s+(?:\S+ => )?(/\S+) \(0x", line)
        if match:
            libs.add(match.group(1))
    return dict(_host_file(p) for p in [*programs, *libs])


def _module_subset(kver: str, root: Path):
    """Writes root/lib/modules/<kver> holding GUEST_MODULES and their dependencies,
    uncompressed (busybox's modprobe can neither unpack .xz nor ask the kernel to) and
    indexed by the host's depmod."""
    src = kernel_tree(kver) / "lib/modules" / kver
    deps = {}
    for line in (src / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
    todo = [m for m in deps if m.startswith(GUEST_MODULES)]
    wanted = set()
    while todo:
        module = todo.pop()
        if module not in wanted:
            wanted.add(module)
            todo.extend(deps[module])
    dest = root / "lib/modules" / kver
    for module in wanted:
        out = dest / module.removesuffix(".xz")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(lzma.decompress((src / module).read_bytes()))
    for index in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy(src / index, dest / index)
    _run(["depmod", "-b", str(root), kver])


def _add_tree(cpio: Cpio, root: Path, under: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        base = under if rel == "." else f"{under}/{rel}"
        cpio.dir(base)
        for name in sorted(filenames):
            cpio.file(f"{base}/{name}", (Path(dirpath) / name).read_bytes())


def _base_initramfs(kver: str) -> tuple[Path, frozenset[str]]:
    """The archive every run starts from, and the directories it creates."""
    busybox = _busybox()
    udp = _udp_sender()
    programs = _host_programs()
    key = hashlib.sha256()
    for part in (kver, str(busybox), str(udp), Path(__file__).read_bytes(),
                 (HERE / "init.sh").read_bytes()):
        key.update(part if isinstance(part, bytes) else part.encode())
    # A library upgraded alone leaves the archive consistent, so the programs decide.
    for program in programs:
        st = os.stat(program)
        key.update(f"{program}:{st.st_size}:{st.st_mtime_ns}".encode())
    image = cache_dir() / f"base-{key.hexdigest()[:16]}.cpio"
    dirs_file = image.with_suffix(".dirs")
    if image.exists() and dirs_file.exists():
        return image, frozenset(dirs_file.read_text().split("\n"))

    started = time.monotonic()
    userland = _with_libraries(programs)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="base.") as work:
        modules = Path(work) / "modules"
        _module_subset(kver, modules)
        built = Path(work) / "base.cpio"
        with open(built, "wb") as out:
            cpio = Cpio(out)
            for d in ("proc", "sys", "dev", "run", "root", "etc/bpfilter-vm"):
                cpio.dir(d)
            cpio.dir("tmp", 0o1777)
            cpio.chardev("dev/console", 5, 1)  # init's stdio, before devtmpfs is mounted
            for link, target in MERGED_USR.items():
                cpio.dir(target)
                cpio.symlink(link, target)
            cpio.file("init", (HERE / "init.sh").read_bytes(), 0o755)
            cpio.file("usr/bin/busybox", busybox.read_bytes(), 0o755)
            cpio.file("usr/bin/udp", udp.read_bytes(), 0o755)
            for guest, host in sorted(userland.items()):
                cpio.file(guest, host.read_bytes(), 0o755)
            # iptables-legacy & co. are names of one multi-call binary.
            multi = shutil.which("xtables-legacy-multi", path=TOOL_PATH)
            for alias in sorted(Path(multi).parent.glob("*-legacy*")):
                if alias.is_symlink() and os.path.realpath(alias) == os.path.realpath(multi):
                    cpio.symlink(guest_path(str(alias)), "xtables-legacy-multi")
            cpio.symlink("usr/bin/sh", "dash")
            taken = {os.path.basename(g) for g in userland} | {"busybox", "sh", "init", "linuxrc"}
            for applet in _run([str(busybox), "--list-full"]).stdout.split():
                if os.path.basename(applet) not in taken:
                    cpio.symlink(guest_path(applet), "/usr/bin/busybox")
            _add_tree(cpio, modules / "lib/modules", "usr/lib/modules")
            cpio.close()
        dirs_file.write_text("\n".join(sorted(cpio.dirs)))
        built.rename(image)
    for old in cache_dir().glob("base-*"):
        if old not in (image, dirs_file):
            old.unlink()
    log.info("built the initramfs (%d MiB) in %.1f s", image.stat().st_size >> 20,
             time.monotonic() - started)
    return image, frozenset(cpio.dirs)


def _boot(kernel: Path, initrd: Path, timeout: float,
          console_to: Optional[IO[str]], memory_mb: int = 1024) -> tuple[bytes, bytes, float]:
    """Runs the guest to its power-off: (console, ttyS1's bytes, seconds)."""
    output = initrd.parent / "ttyS1"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb), "-smp", "1",
           "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", APPEND,
           "-serial", "stdio", "-serial", f"file:{output}"]
    console = bytearray()

    def pump(stream):
        while chunk := os.read(stream.fileno(), 65536):
            console.extend(chunk)
            if console_to:
                console_to.write(chunk.decode(errors="replace"))
                console_to.flush()

    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise VMError("qemu-system-x86_64 is not installed: run tools/vm/setup.sh") from None
    reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join()
        raise VMError(f"the guest did not finish in {timeout} s; its console ended with:\n"
                      + _tail(console)) from None
    reader.join()
    seconds = time.monotonic() - started
    return bytes(console), output.read_bytes() if output.exists() else b"", seconds


def _tail(console: bytes, lines: int = 40) -> str:
    return "\n".join(console.decode(errors="replace").splitlines()[-lines:])


def run_scenario(script: str, extra_files: Optional[Mapping[str, str]] = None,
                 module: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 console_to: Optional[IO[str]] = None, memory_mb: int = 1024) -> Result:
    """Boots a fresh guest, runs script with sh (dash) as root in /tmp and returns its
    exit status and output (stdout and stderr together). The script may read
    /etc/bpfilter-vm/lib.sh, the functions the scenarios share.

    extra_files maps a path in the guest to a host file copied there (mode kept).
    module, a host .ko built against kernel_build_dir(), is loaded (dependencies first)
    before the script runs, which finds its guest path in $BPFILTER_VM_MODULE; a module
    that does not load makes the status 125. console_to receives the kernel's console
    as it comes. memory_mb is the guest's memory.
    """
    kver = kernel_release()
    kernel = kernel_tree(kver) / "boot" / f"vmlinuz-{kver}"
    base, base_dirs = _base_initramfs(kver)
    with tempfile.TemporaryDirectory(prefix="bpfilter-vm.") as tmp:
        initrd = Path(tmp) / "initrd"
        with open(initrd, "wb") as out:
            with open(base, "rb") as src:
                shutil.copyfileobj(src, out)
            # Unpacked over the base archive, whose directories are left alone: an entry
            # would reset their mode (/tmp's 1777).
            cpio = Cpio(out, base_dirs)
            cpio.file("etc/bpfilter-vm/scenario", script.encode())
            cpio.file("etc/bpfilter-vm/lib.sh", SCENARIO_LIB.read_bytes())
            for guest, host in (extra_files or {}).items():
                cpio.file(guest_path(guest), Path(host).read_bytes(),
                          stat.S_IMODE(os.stat(host).st_mode))
            if module:
                where = f"/lib/modules/{kver}/extra/{os.path.basename(module)}"
                cpio.file(guest_path(where), Path(module).read_bytes())
                cpio.file("etc/bpfilter-vm/module", where.encode())
            cpio.close()
        console, raw, seconds = _boot(kernel, initrd, timeout, console_to, memory_mb)
    start = raw.find(BEGIN)
    end = END.search(raw, start + len(BEGIN)) if start >= 0 else None
    if not end:
        raise VMError("the guest ended without a result; its console ended with:\n"
                      + _tail(console) + "\nand its output with:\n" + _tail(raw))
    log.info("boot to result in %.1f s", seconds)
    return Result(status=int(end.group(1)),
                  output=raw[start + len(BEGIN):end.start()].decode(errors="replace"),
                  console=console.decode(errors="replace"), seconds=seconds)
