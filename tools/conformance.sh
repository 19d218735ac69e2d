#!/usr/bin/env bash
# iptables' own test files through bpfilter.ko in a qemu guest, case by case against
# ip_tables (tests/test_kmod.py, marker conformance): minutes of guest time, so kept
# out of tools/test.sh's run, as the benchmarks are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export PYTHONPATH="$PWD/umh:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m pytest "$@" -m conformance tests/test_kmod.py
