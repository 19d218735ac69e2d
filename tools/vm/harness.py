"""A throwaway qemu guest with one of Debian's kernels (kernel(): Debian 13's 6.12
unless told), for what the host's kernel cannot be trusted with: loading bpfilter.ko,
owning the iptables socket options, keeping ip_tables unloaded.

    from harness import run_scenario
    result = run_scenario("iptables-legacy -L", extra_files={"/usr/bin/x": "build/x"})
    result.status, result.output

The kernel and busybox come from Debian's archive through apt (no install, only
`apt-get download`, with the harness's own view of the release's suites) and are
unpacked once into $BPFILTER_VM_CACHE (default ~/.cache/bpfilter-vm); modules for it
are built in a root of its Debian release (build_root, build_module). iptables-legacy,
ip, bpftool and dash (the guest's sh) are the host's own, with the shared libraries ldd
names. The initramfs holding all that is built once per kernel and host tools; each
run appends a small second archive (scenario, extra files, module), which the kernel
unpacks over the first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
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
    "kernel/net/bridge/br_netfilter.ko",
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


@contextlib.contextmanager
def _locked(name: str, shared: bool = False):
    """One process at a time (or, `shared`, any number of them but none holding it
    alone) for what several test runs (one per kernel) share."""
    with open(cache_dir() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def using_root(root: Path):
    """Held while building in root: apt changes it only when no one is (install_in_root)."""
    return _locked(root.name, shared=True)


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


# A kernel is chosen by $BPFILTER_VM_KERNEL, "SERIES:FLAVOUR:SUITE" (the newest release of
# the series that suite's mirror has, e.g. "7:rt:trixie-backports": backports keeps only
# its newest), or pinned by $BPFILTER_VM_KVER, a `uname -r` (e.g.
# "7.3.4+deb13-cloud-amd64"). Debian 13's 6.12 unless told.
DEFAULT_KERNEL = "6.12:cloud:trixie"
# the distribution a kernel's "+debN" belongs to
DEBIAN_RELEASES = {"12": "bookworm", "13": "trixie", "14": "forky"}
ARCHIVE_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# how long apt's lists of a distribution are trusted before they are fetched again
LISTS_MAX_AGE = 6 * 3600


@dataclasses.dataclass(frozen=True)
class Kernel:
    release: str        # "7.3.4+deb13"
    flavour: str        # "cloud-amd64"
    distribution: str   # "trixie": its packages are found in its suites

    @property
    def kver(self) -> str:
        return f"{self.release}-{self.flavour}"

    def __str__(self) -> str:
        return self.kver


def host_distribution() -> str:
    return re.search(r"^VERSION_CODENAME=(\S+)", Path("/etc/os-release").read_text(), re.M)[1]


def _apt_options(distribution: str) -> list[str]:
    """apt-get/apt-cache options for a private view of `distribution`'s suites (its
    own sources, lists and cache under the cache directory), its lists fetched when
    missing or stale: the host's apt configuration is neither needed nor touched."""
    base = cache_dir() / f"apt-{distribution}"
    lists = base / "lists"
    sources = base / "sources.list"
    options = ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
               "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={base / 'cache'}",
               "-o", "Dir::State::status=/dev/null", "-o", "APT::Sandbox::User=root"]
    stamp = lists / "updated"
    with _locked(f"apt-{distribution}"):
        if not stamp.exists() or time.time() - stamp.stat().st_mtime > LISTS_MAX_AGE:
            (lists / "partial").mkdir(parents=True, exist_ok=True)
            (base / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
            sources.write_text(_sources_list(distribution))
            _run(["apt-get", *options, "-q", "update"])
            stamp.touch()
    return options


def _sources_list(distribution: str) -> str:
    """An apt sources.list of the release's suites: its own, updates, backports, security."""
    debian, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    suites = [(debian, distribution), (debian, f"{distribution}-updates"),
              (debian, f"{distribution}-backports"), (security, f"{distribution}-security")]
    return "".join(f"deb [signed-by={ARCHIVE_KEYRING}] {mirror} {suite} main\n"
                   for mirror, suite in suites)


def _known(distribution: str, pattern: str) -> list[str]:
    """Package names of `distribution` matching the regular expression."""
    listed = _run(["apt-cache", *_apt_options(distribution), "search", "--names-only",
                   pattern]).stdout
    return [line.split(" - ")[0] for line in listed.splitlines()]


def _depends(distribution: str, package: str) -> list[str]:
    """The package names its Depends field names (alternatives and versions dropped)."""
    shown = _run(["apt-cache", *_apt_options(distribution), "show", "--no-all-versions",
                  package]).stdout
    field = re.search(r"^Depends: (.*)$", shown, re.M)
    if not field:
        return []
    # "a (>= 1) | b, c" -> a, c
    return [re.match(r"\s*([^\s(|]+)", dep)[1] for dep in field[1].split(",")]


@functools.lru_cache(maxsize=None)
def kernel(spec: Optional[str] = None) -> Kernel:
    """The guest's kernel: `spec` ("SERIES:FLAVOUR:SUITE", or a `uname -r`), else
    $BPFILTER_VM_KVER, else $BPFILTER_VM_KERNEL, else DEFAULT_KERNEL."""
    spec = spec or os.environ.get("BPFILTER_VM_KVER") or os.environ.get("BPFILTER_VM_KERNEL") \
        or DEFAULT_KERNEL
    pinned = re.fullmatch(r"(\d[^-]*\+deb(\d+))-(.+)", spec)
    if pinned:
        release, debian, flavour = pinned.groups()
        if debian not in DEBIAN_RELEASES:
            raise VMError(f"{spec}: no Debian release is known for +deb{debian}")
        return Kernel(release, flavour, DEBIAN_RELEASES[debian])
    parts = spec.split(":")
    if len(parts) != 3:
        raise VMError(f"{spec}: a kernel is SERIES:FLAVOUR:SUITE (e.g. "
                      "7:cloud:trixie-backports) or a release (e.g. 7.3.4+deb13-cloud-amd64)")
    series, flavour, suite = parts
    flavour = flavour if flavour.endswith("-amd64") else f"{flavour}-amd64"
    distribution = suite.split("-")[0]
    # the newest release of the series ("7": any 7.x) the mirror has, in that suite only
    candidates = _known(distribution, rf"^linux-headers-{re.escape(series)}(\.[0-9]+)+\+deb[0-9]+-"
                                      rf"{flavour}$")
    found = []
    if candidates:
        # one section per package: "linux-headers-...:" then its versions and suites
        policy = _run(["apt-cache", *_apt_options(distribution), "policy", *candidates]).stdout
        sections = re.split(r"^(\S+):$", policy, flags=re.M)
        for name, versions in zip(sections[1::2], sections[2::2]):
            if re.search(rf" {re.escape(suite)}/main ", versions):
                found.append(name.removeprefix("linux-headers-").removesuffix(f"-{flavour}"))
    if not found:
        raise VMError(f"the mirror's {suite} has no {series} {flavour} kernel")
    newest = max(found, key=lambda r: [int(n) for n in re.findall(r"\d+", r)])
    return Kernel(newest, flavour, distribution)


def kernel_release() -> str:
    """The guest kernel's `uname -r`."""
    return kernel().kver


def _fetch(packages: list[str], dest: Path, distribution: str,
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
        _run(["apt-get", *_apt_options(distribution), "download", "-q", *packages], cwd=debs)
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


def _kernel_packages(k: Kernel) -> list[str]:
    """The packages holding k's image and modules: one -unsigned image package (6.12),
    or what its image package depends on (newer kernels split it into base, binary and
    modules packages, and sign the binary only)."""
    kver = k.kver
    if _known(k.distribution, rf"^linux-image-{re.escape(kver)}-unsigned$"):
        return [f"linux-image-{kver}-unsigned"]
    parts = [d for d in _depends(k.distribution, f"linux-image-{kver}")
             if re.fullmatch(rf"linux-(base|binary|modules)-{re.escape(kver)}", d)]
    if not any(p.startswith("linux-binary-") for p in parts):
        raise VMError(f"linux-image-{kver}: no image package found among its dependencies")
    return parts


def kernel_tree(kver: Optional[str] = None) -> Path:
    """The unpacked kernel packages of kver: lib/modules/KVER (with depmod's indexes,
    the image and config: lib/modules/KVER/vmlinuz and config whatever the packages'
    layout). Its headers are in its build root (kernel_root)."""
    k = kernel(kver)
    kver = k.kver
    dest = cache_dir() / f"linux-{kver}"   # (kernel-*: the layout before image links)

    def prepare(tree: Path):
        # Newer packages install under /usr/lib/modules only (merged /usr)
        if not (tree / "lib").exists():
            (tree / "lib").symlink_to("usr/lib")
        moddir = tree / "lib/modules" / kver
        for name, old in (("vmlinuz", f"boot/vmlinuz-{kver}"), ("config", f"boot/config-{kver}")):
            if not (moddir / name).exists():
                (moddir / name).symlink_to(os.path.relpath(tree / old, moddir.resolve()))
        # The package leaves modules.dep to its postinst; the guest's subset needs it.
        _run(["depmod", "-b", str(tree), kver])

    return _fetch(_kernel_packages(k), dest, k.distribution, prepare)


def kernel_config(kver: Optional[str] = None) -> Path:
    kver = kernel(kver).kver
    return kernel_tree(kver) / "lib/modules" / kver / "config"


# what a build root holds beyond debootstrap's minimal base (the kernel's headers and
# compiler come with linux-headers-KVER)
BUILD_ROOT_PACKAGES = ("make", "gcc", "libc6-dev", "libelf-dev", "dwarves", "kmod", "dkms",
                       "ca-certificates")


def build_root(distribution: str) -> Path:
    """A Debian root of `distribution` for building its kernels' modules and packages
    (its kbuild tools need its C library, its kernels its compiler), made once."""
    return _made_root(cache_dir() / f"root-{distribution}", distribution, BUILD_ROOT_PACKAGES)


def clean_root(distribution: str, dest: Path) -> Path:
    """At dest, a fresh copy of a minimal Debian root of `distribution` (debootstrap's
    minbase, made once): a clean system to install packages on."""
    pristine = _made_root(cache_dir() / f"pristine-{distribution}", distribution, ())
    if dest.exists():
        shutil.rmtree(dest)
    _run(["cp", "-a", str(pristine), str(dest)])
    return dest


def _made_root(dest: Path, distribution: str, packages: tuple[str, ...]) -> Path:
    """dest, a root debootstrap made once (minbase and `packages`)."""
    with _locked(dest.name):
        if not (dest / "etc/bpfilter-build-root").exists():
            _debootstrap(distribution, dest, packages)
    return dest


def _debootstrap(distribution: str, dest: Path, packages: tuple[str, ...]) -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        _run(["debootstrap", "--variant=minbase",
              *([f"--include={','.join(packages)}"] if packages else []),
              distribution, str(work), "http://deb.debian.org/debian"])
        (work / "etc/apt/sources.list").write_text(_sources_list(distribution))
        (work / "etc/bpfilter-build-root").write_text(distribution + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("made the %s root %s in %.1f s", distribution, dest.name, time.monotonic() - started)


def in_root(root: Path, command: list[str], system: bool = False, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
    """command run chrooted in root, with /proc (objtool reads it) mounted in a mount
    namespace of its own, gone with it; `system`: also /sys, /sys/fs/bpf, /dev and a
    /run of its own, for bpfilter itself. A failure raises VMError, unless not `check`."""
    mounts = ['mount -t proc proc "$0/proc"']
    if system:
        mounts += ['mount -t sysfs sysfs "$0/sys"', 'mount -t bpf bpf "$0/sys/fs/bpf"',
                   'mount -t tmpfs tmpfs "$0/run"', 'mount -t devtmpfs devtmpfs "$0/dev"']
    script = " && ".join(mounts) + ' && exec chroot "$0" "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root),
           *command]
    if not check:
        return subprocess.run(cmd, capture_output=True, text=True, **kw)
    return _run(cmd, **kw)


def kernel_root(kver: Optional[str] = None) -> Path:
    """The build root of kver's distribution with kver's headers installed (by apt, as a
    user would: their compiler and kbuild come with them)."""
    k = kernel(kver)
    root = build_root(k.distribution)
    if not (root / "lib/modules" / k.kver / "build").exists():
        install_in_root(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                               f"linux-headers-{k.kver}"])
    return root


def install_in_root(root: Path, apt_command: list[str]) -> None:
    """An apt-get command run in root with fresh lists, one at a time."""
    with _locked(root.name):
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        in_root(root, ["apt-get", "-q", "update"])
        in_root(root, ["env", "DEBIAN_FRONTEND=noninteractive", *apt_command])


def build_external(name: str, files: Mapping[str, Path], kver: Optional[str] = None) -> Path:
    """The out-of-tree module directory `name`, made of `files` (its path -> a host
    file or directory), built for kver in the build root of its Debian release, as that
    release's kbuild and compiler build it, without warnings: the directory (a new
    one each time, so that builds beside each other never share one)."""
    k = kernel(kver)
    root = kernel_root(k.kver)
    builds = root / "build" / k.kver
    builds.mkdir(parents=True, exist_ok=True)
    for old in builds.glob(f"{name}.*"):   # other runs' builds, long done
        if time.time() - old.stat().st_mtime > 24 * 3600:
            shutil.rmtree(old, ignore_errors=True)
    # a directory of its own: another run's build for the same kernel leaves it alone
    work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=builds))
    with using_root(root):
        for path, host in files.items():
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            if Path(host).is_dir():
                shutil.copytree(host, work / path,
                                ignore=shutil.ignore_patterns("*.o", "*.cmd", "*.ko", "*.mod*"))
            else:
                shutil.copy(host, work / path)
        built = in_root(root, ["make", "-C", f"/lib/modules/{k.kver}/build",
                               f"M=/{work.relative_to(root)}", "modules"])
    warnings = [line for line in (built.stdout + built.stderr).splitlines() if "warning:" in line]
    if warnings:
        raise VMError(f"{work.name} for {k.kver} built with warnings:\n" + "\n".join(warnings))
    return work


def build_module(sources: Path, kver: Optional[str] = None) -> Path:
    """bpfilter.ko built from `sources` (Kbuild, kmod/, build/bpfilter-umh) for kver
    (see build_external)."""
    files = {name: sources / name for name in ("Kbuild", "kmod", "build/bpfilter-umh")}
    return build_external("bpfilter", files, kver) / "bpfilter.ko"


def _busybox() -> Path:
    # Static, and only a toolbox around the programs under test: the first one fetched
    # serves for good.
    return _fetch(["busybox-static"], cache_dir() / "busybox", host_distribution()) / "bin/busybox"


def _udp_sender() -> Path:
    source = HERE / "udp.c"
    binary = cache_dir() / f"udp-{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}"
    if not binary.exists():
        static_binary(source, binary)
    return binary


def static_binary(source: Path, binary: Path) -> None:
    """source compiled static into binary, atomically: test runs beside each other may
    compile it at once."""
    fd, tmp = tempfile.mkstemp(prefix=binary.name + ".", dir=binary.parent)
    os.close(fd)
    try:
        _run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", tmp, str(source)])
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    image = cache_dir() / f"base-{kver}-{key.hexdigest()[:16]}.cpio"
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
        listed = Path(work) / "base.dirs"
        listed.write_text("\n".join(sorted(cpio.dirs)))
        os.replace(listed, dirs_file)
        built.rename(image)
    for old in cache_dir().glob(f"base-{kver}-*"):
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
                 console_to: Optional[IO[str]] = None, memory_mb: int = 1024,
                 kver: Optional[str] = None) -> Result:
    """Boots a fresh guest, runs script with sh (dash) as root in /tmp and returns its
    exit status and output (stdout and stderr together). The script may read
    /etc/bpfilter-vm/lib.sh, the functions the scenarios share.

    extra_files maps a path in the guest to a host file copied there (mode kept).
    module, a host .ko built for the kernel (build_module), is loaded (dependencies first)
    before the script runs, which finds its guest path in $BPFILTER_VM_MODULE; a module
    that does not load makes the status 125. console_to receives the kernel's console
    as it comes. memory_mb is the guest's memory. kver: the guest's kernel (see kernel()).
    """
    kver = kernel(kver).kver
    image = kernel_tree(kver) / "lib/modules" / kver / "vmlinuz"
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
        console, raw, seconds = _boot(image, initrd, timeout, console_to, memory_mb)
    start = raw.find(BEGIN)
    end = END.search(raw, start + len(BEGIN)) if start >= 0 else None
    if not end:
        raise VMError("the guest ended without a result; its console ended with:\n"
                      + _tail(console) + "\nand its output with:\n" + _tail(raw))
    log.info("boot to result in %.1f s", seconds)
    return Result(status=int(end.group(1)),
                  output=raw[start + len(BEGIN):end.start()].decode(errors="replace"),
                  console=console.decode(errors="replace"), seconds=seconds)
