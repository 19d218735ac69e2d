"""The Debian packages (`make deb`: tools/deb.py) on a clean Debian 13 root: DKMS builds
bpfilter.ko there for every kernel whose headers are installed (Debian 13's 6.12,
trixie-backports' 7.3 cloud, and its rt kernel, which has no legacy xtables); each
module, taken from that root, is loaded on its kernel in the VM, where the unmodified
iptables-legacy filters real traffic with the answers and counters ip_tables gives in
the same scenario (on the rt kernel, which has none: the cloud kernel's of the same
release). The helper, built on this host's C library, runs on Debian 13's; the
bpfilter command runs on Debian 13's Python and its packaged libraries."""
import lzma
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "vm"))
sys.path.insert(0, str(ROOT / "tools"))
import deb  # noqa: E402
import harness  # noqa: E402
from test_kmod import (  # noqa: E402
    REALWORLD_ANSWERS, _realworld_files, _same_answers_and_counters, reference_then_bpfilter)

pytestmark = [pytest.mark.vm, pytest.mark.kernels]

# Debian 13's 6.12, and the newest 7.x of trixie-backports (it keeps only its newest),
# cloud, then rt of the same release
KERNELS = ("6.12:cloud:trixie", "7:cloud:trixie-backports")
# IPv4 filter rulesets of kmod-realworld.sh: REJECT, conntrack, limit, LOG, user chains
RULESETS = ("fail2ban", "ufw")
# The root's own namespaces, PID 1 included: a bpfilter service moves to PID 1's network
# and mount namespaces (see daemon.py), which must be the root's, not this host's.
SANDBOX = ("unshare", "--pid", "--fork", "--mount-proc", "--propagation", "unchanged", "--net")


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("debs")
    done = subprocess.run([sys.executable, str(ROOT / "tools/deb.py"), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr   # lintian clean included
    return sorted(out.glob("*.deb"))


@pytest.fixture(scope="module")
def installed(debs):
    """The clean root, the kernels' headers installed, then the packages."""
    root = harness.clean_root("trixie", harness.cache_dir() / "clean-trixie-deb-test")
    kernels = [harness.kernel(spec) for spec in KERNELS]
    kernels.append(harness.kernel(f"{kernels[-1].release}-rt-amd64"))
    harness.install_in_root(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                   *(f"linux-headers-{k.kver}" for k in kernels)])
    (root / "tmp/debs").mkdir()
    for package in debs:
        shutil.copy(package, root / "tmp/debs")
    # as a user installs a downloaded package: apt resolves what it depends on
    harness.install_in_root(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                   *(f"/tmp/debs/{package.name}" for package in debs
                                     if "dbgsym" not in package.name)])
    yield root, kernels
    shutil.rmtree(root)


def _module(root: Path, kver: str) -> Path:
    built, = (root / "lib/modules" / kver / "updates/dkms").glob("bpfilter.ko*")
    return built


def test_dkms_built_the_module_for_every_kernel_with_headers(installed):
    root, kernels = installed
    status = harness.in_root(root, ["dkms", "status"]).stdout
    for k in kernels:
        assert f"bpfilter/{deb.VERSION}, {k.kver}, x86_64: installed" in status, status
        info = subprocess.run(["modinfo", "-F", "vermagic", str(_module(root, k.kver))],
                              capture_output=True, text=True, check=True).stdout
        assert info.startswith(f"{k.kver} "), info
    # not loaded at boot unless the administrator enables it
    assert not list((root / "etc/modules-load.d").glob("bpfilter*"))
    assert (root / "usr/share/bpfilter-dkms/modules-load.d/bpfilter.conf").read_text() \
        .splitlines()[-1] == "bpfilter"


def test_the_helper_runs_on_the_newest_c_library(installed):
    """The helper bpfilter-dkms carries, built on this host's C library (the oldest
    supported), serves the unmodified iptables-legacy on Debian 13's, newer, through the
    bpfilter package's client, in a namespace of its own."""
    root, _ = installed
    helper = f"/usr/src/bpfilter-{deb.VERSION}/build/bpfilter-umh"
    script = f"""{helper} serve --socket /run/umh.sock 2>/run/umh.log &
for i in $(seq 100); do [ -S /run/umh.sock ] && break; sleep 0.1; done
bpfilter exec --socket /run/umh.sock -- iptables-legacy -A INPUT -p udp --dport 9 -j DROP
bpfilter exec --socket /run/umh.sock -- iptables-legacy -S INPUT
kill $!; wait; ldd --version | head -1; cat /run/umh.log"""
    done = harness.in_root(root, [*SANDBOX, "sh", "-c", script], system=True)
    assert "-A INPUT -p udp -m udp --dport 9 -j DROP" in done.stdout, done.stdout + done.stderr
    assert re.search(r"table filter replaced in", done.stdout), done.stdout   # the helper did
    assert "GLIBC 2.41" in done.stdout, done.stdout


def test_the_helper_is_reproducible(debs, tmp_path):
    """The same sources give the same bytes: the helper built afresh elsewhere is the
    one the package carries."""
    fresh = tmp_path / "bpfilter-umh"
    subprocess.run(["bash", str(ROOT / "tools/build-helper.sh"), "--helper-only", "--out",
                    str(fresh)], check=True, capture_output=True)
    dkms, = [package for package in debs if package.name.startswith("bpfilter-dkms_")]
    subprocess.run(["dpkg-deb", "-x", str(dkms), str(tmp_path / "deb")], check=True)
    packaged = tmp_path / "deb" / f"usr/src/bpfilter-{deb.VERSION}/build/bpfilter-umh"
    assert fresh.read_bytes() == packaged.read_bytes()


def test_the_bpfilter_command_on_debians_python(installed):
    """The bpfilter package on Debian 13's Python, construct, cffi and pyroute2: the
    unmodified iptables-legacy through it in a namespace of its own."""
    root, _ = installed
    script = ("bpfilter exec -- iptables-legacy -A INPUT -p udp --dport 9 -j DROP && "
              "bpfilter exec -- iptables-legacy -S INPUT; bpfilter flush")
    done = harness.in_root(root, [*SANDBOX, "sh", "-c", script], system=True)
    assert "-A INPUT -p udp -m udp --dport 9 -j DROP" in done.stdout, done.stdout + done.stderr


def test_the_packaged_module_filters_on_each_kernel(installed, tmp_path):
    root, kernels = installed
    phases = tmp_path / "phases"
    phases.write_text(" ".join(RULESETS) + "\n")
    runs = {}
    for k in kernels:
        module = tmp_path / f"bpfilter-{k.kver}.ko"
        packed = _module(root, k.kver)
        module.write_bytes(lzma.decompress(packed.read_bytes()) if packed.suffix == ".xz"
                           else packed.read_bytes())
        files = {**_realworld_files(k.kver, module), "/etc/bpfilter-vm/phases": str(phases)}
        runs[k.kver] = reference_then_bpfilter("kmod-realworld.sh", files, timeout=900,
                                                  kver=k.kver), k
    def has_reference(sections: dict) -> bool:
        return "reference" not in sections   # (a kernel without ip_tables: "reference: none")

    for s, k in runs.values():
        # the rt kernel has no ip_tables: its reference is the cloud kernel's
        reference = s if has_reference(s) else next(
            r for r, other in runs.values() if other.release == k.release and has_reference(r))
        for name in RULESETS:
            for answer in REALWORLD_ANSWERS[name]:
                assert f"{name} {answer}\n" in reference[f"reference {name}"]
            _same_answers_and_counters(reference[f"reference {name}"], s[f"bpfilter {name}"], name)
    rt, = [s for s, k in runs.values() if k.flavour.startswith("rt")]
    assert "none: this kernel has no legacy xtables" in rt["reference"]
    assert all(has_reference(s) for s, k in runs.values() if not k.flavour.startswith("rt"))
