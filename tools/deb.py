#!/usr/bin/env python3
"""Debian packages from this tree, with Debian's own tooling (debhelper, dh-dkms,
dh-python), in a root of the Debian release they are for (tools/vm/harness.build_root):

    python3 tools/deb.py [--release trixie] [--out dist]      (or: make deb)

The frozen helper bpfilter-dkms carries is built first, here, by
tools/build-helper.sh: on this host's C library, the oldest the package supports
(the helper then runs on every newer one). Then dpkg-buildpackage -b in the root,
then lintian, whose every warning is either fixed or overridden with its reason
(debian/*.lintian-overrides); an error fails the build. Out: the .deb files and
lintian's report in --out.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "vm"))
import harness  # noqa: E402

# the package's version, DKMS's as the package installs it
VERSION = re.search(r'^PACKAGE_VERSION="(.+)"', (ROOT / "dkms.conf").read_text(), re.M)[1]


def build_depends() -> str:
    control = (ROOT / "debian/control").read_text()
    field = re.search(r"^Build-Depends:(.*(?:\n[ \t].*)*)", control, re.M)[1]
    return ", ".join(d.strip() for d in field.replace("\n", " ").split(",") if d.strip())


def libc_version(ldd_version: str) -> tuple[int, ...]:
    """From `ldd --version`'s first line, e.g. "ldd (Debian GLIBC 2.41-12) 2.41"."""
    return tuple(int(n) for n in ldd_version.splitlines()[0].rsplit(" ", 1)[1].split("."))


def source_tree(dest: Path) -> None:
    """The tracked files, and the helper built beforehand."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    (dest / "prebuilt").mkdir()
    shutil.copy2(ROOT / "build/bpfilter-umh", dest / "prebuilt/bpfilter-umh")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", default="trixie")
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    subprocess.run(["bash", str(ROOT / "tools/build-helper.sh"), "--helper-only"], check=True)
    root = harness.build_root(args.release)
    host_libc = libc_version(subprocess.run(["ldd", "--version"], check=True,
                                            capture_output=True, text=True).stdout)
    root_libc = libc_version(harness.in_root(root, ["ldd", "--version"]).stdout)
    if host_libc > root_libc:
        print(f"the helper would need the C library {host_libc} of this host, newer than "
              f"{args.release}'s {root_libc}: build on the oldest release supported",
              file=sys.stderr)
        return 1
    harness.install_in_root(root, ["apt-get", "satisfy", "-y", "-q", "--no-install-recommends",
                                   build_depends() + ", build-essential, lintian, fakeroot"])
    work = root / "build" / "deb"
    if work.exists():
        shutil.rmtree(work)
    source_tree(work / f"bpfilter-{VERSION}")
    try:
        with harness.using_root(root):
            harness.in_root(root, ["sh", "-c", f"cd /build/deb/bpfilter-{VERSION} && "
                                               "dpkg-buildpackage -b -us -uc"])
    except harness.VMError as e:
        print(e, file=sys.stderr)
        return 1
    changes, = work.glob("*.changes")
    lint = harness.in_root(root, ["lintian", "--info", "--display-info", "--fail-on",
                                  "error,warning", f"/build/deb/{changes.name}"], check=False)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.deb"):
        old.unlink()
    for deb in work.glob("*.deb"):
        shutil.copy2(deb, args.out / deb.name)
        print(f"built {args.out / deb.name}")
    (args.out / "lintian.txt").write_text(lint.stdout + lint.stderr)
    print(f"lintian ({'clean' if lint.returncode == 0 else 'FAILED'}):\n{lint.stdout}{lint.stderr}",
          end="")
    return lint.returncode


if __name__ == "__main__":
    sys.exit(main())
