#!/usr/bin/env bash
# Builds bpfilter.ko's helper, the translator service frozen with PyInstaller into one
# executable (build/bpfilter-umh), then the module with that helper embedded.
#
#   tools/build-helper.sh                 helper, then the module for the running kernel
#   tools/build-helper.sh --kdir DIR      ... for the kernel whose build directory is DIR
#   tools/build-helper.sh --helper-only   the helper alone (what a DKMS source tree needs)
#   tools/build-helper.sh --helper-only --out FILE   the helper built afresh into FILE
#
# The helper is rebuilt only when the package's sources, Python or PyInstaller change;
# the same sources give the same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

kdir=/lib/modules/$(uname -r)/build
module=yes
while [ $# -gt 0 ]; do
    case $1 in
    --kdir) kdir=$2; shift 2 ;;
    --helper-only) module=no; shift ;;
    --out) out=$(realpath "$2"); shift 2 ;;
    *) echo "usage: $0 [--kdir DIR] [--helper-only [--out FILE]]" >&2; exit 2 ;;
    esac
done

python=${PYTHON:-python3}
helper=build/bpfilter-umh
work=build/pyinstaller
if [ -n "${out:-}" ]; then
    helper=$out
    work=$out.work
    rm -f "$helper.key"
fi

# one build at a time (the test suite's halves may each ask for it)
mkdir -p build
exec 9>build/.helper.lock
flock 9

if ! "$python" -c 'import PyInstaller' 2>/dev/null; then
    "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore pyinstaller
fi

# What the frozen helper is made of: a different interpreter or freezer gives a
# different executable even from the same sources.
key=$({
    "$python" -c 'import sys, PyInstaller; print(sys.version, sys.executable, PyInstaller.__version__)'
    sha256sum "$0"
    find umh/bpfilter -name '*.py' -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
} | sha256sum | cut -d' ' -f1)

if [ -x "$helper" ] && [ "$(cat "$helper.key" 2>/dev/null)" = "$key" ]; then
    echo "helper: $helper is up to date"
else
    started=$SECONDS
    mkdir -p "$work"
    cat >"$work/bpfilter-umh.py" <<'EOF'
import sys

from bpfilter.cli import main

sys.exit(main())
EOF
    # The preload shim (an extension next to the package) serves `bpfilter exec`, never
    # the module's helper, and bpfilter_lab (the tests' lab, the demo) is no part of
    # bpfilter. construct imports numpy and cryptography lazily, for constructs bpfilter
    # never uses, cffi needs no compiler toolchain in ABI mode, and the standard
    # library's network, mail and markup modules serve nothing here: left in, they
    # would make the helper six times bigger and slower to unpack at every start
    # (hashlib falls back to its built-in hashes without OpenSSL).
    excluded=(bpfilter._preload bpfilter_lab numpy cryptography yaml setuptools distutils
              charset_normalizer ssl asyncio http xml email lzma bz2 tkinter
              unittest pydoc pytest _hashlib readline decimal _decimal)
    # Same sources, same bytes: marshalled sets ordered as a fixed hash seed orders
    # them, and no build time in what PyInstaller writes.
    PYTHONHASHSEED=0 SOURCE_DATE_EPOCH=0 "$python" -m PyInstaller --noconfirm --clean \
        --log-level WARN --onefile --strip --name bpfilter-umh --distpath "$work/dist" \
        --workpath "$work/work" \
        --specpath "$work" --paths "$root/umh" --collect-submodules bpfilter \
        "${excluded[@]/#/--exclude-module=}" "$work/bpfilter-umh.py"
    mv "$work/dist/bpfilter-umh" "$helper"
    echo "$key" >"$helper.key"
    echo "helper: built $helper ($(stat -c %s "$helper") bytes) in $((SECONDS - started)) s"
fi

if [ $module = yes ]; then
    make -C "$kdir" M="$root" modules
fi
