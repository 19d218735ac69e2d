#!/usr/bin/env bash
# Set up, then run the whole test suite against the real kernel. The tests in a qemu
# guest (marker vm) run once per kernel CI covers: Debian 13's 6.12 (the default) and
# trixie-backports' 7.3 cloud; those marked kernels pick their guests' kernels
# themselves and run once. Each of those parts runs in a process of its own beside the
# tests on this host: they mostly wait (on guests that wait on timeouts, on the
# network, on the kernel), so the parts take about as long as the longest of them, not
# their sum. Their output follows this host's part's; the status is the worst of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# built once, before the parts that need it start
bash tools/build-helper.sh --helper-only
SECOND_KERNEL=${BPFILTER_VM_SECOND_KERNEL:-7.3:cloud:trixie-backports}
logs=$(mktemp -d /tmp/bpfilter-vm-tests.XXXXXX)
declare -A pids
python3 -m pytest "$@" -m "vm and not kernels" >"$logs/default kernel" 2>&1 &
pids["default kernel"]=$!
BPFILTER_VM_KERNEL=$SECOND_KERNEL python3 -m pytest "$@" -m "vm and not kernels" \
    >"$logs/$SECOND_KERNEL" 2>&1 &
pids["$SECOND_KERNEL"]=$!
python3 -m pytest "$@" -m kernels >"$logs/their own kernels" 2>&1 &
pids["their own kernels"]=$!
status=0
python3 -m pytest "$@" -m "not vm" || status=$?
statuses=("$status")
for part in "default kernel" "$SECOND_KERNEL" "their own kernels"; do
    part_status=0
    wait "${pids[$part]}" || part_status=$?
    statuses+=("$part_status")
    echo "=== the tests in a qemu guest (-m vm), $part ==="
    cat "$logs/$part"
done
rm -rf "$logs"
# 5: pytest selected nothing (arguments naming only another part's tests)
for s in "${statuses[@]}"; do
    [ "$s" = 0 ] || [ "$s" = 5 ] || exit "$s"
done
