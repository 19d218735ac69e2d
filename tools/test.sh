#!/usr/bin/env bash
# Set up, then run the whole test suite against the real kernel. The tests in a qemu
# guest (marker vm) run once per kernel CI covers: Debian 13's 6.12 (the default) and
# trixie-backports' newest 7.x cloud, each in a process of its own beside the tests
# on this host, which are followed by those marked kernels (they pick their guests'
# kernels themselves, and run once). The parts mostly wait (on guests that wait on
# timeouts, on the network, on the kernel), so they take about as long as the longest
# of them, not their sum. The guests' output follows; the status is the first failing
# part's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# built once, before the parts that need it start
bash tools/build-helper.sh --helper-only
# (trixie-backports keeps only its newest 7.x)
FIRST_KERNEL=${BPFILTER_VM_FIRST_KERNEL:-6.12:cloud:trixie}
SECOND_KERNEL=${BPFILTER_VM_SECOND_KERNEL:-7:cloud:trixie-backports}
logs=$(mktemp -d /tmp/bpfilter-vm-tests.XXXXXX)
declare -A pids
# on any exit, no part left running (nor its guests)
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$logs"' EXIT
trap 'exit 130' INT TERM
for kernel in "$FIRST_KERNEL" "$SECOND_KERNEL"; do
    BPFILTER_VM_KVER= BPFILTER_VM_KERNEL=$kernel python3 -m pytest "$@" -m "vm and not kernels" \
        >"$logs/$kernel" 2>&1 &
    pids["$kernel"]=$!
done
status=0
python3 -m pytest "$@" -m "not vm" || status=$?
statuses=("$status")
# then, in this part's place: at most three guests at once on two cores
kernels_status=0
python3 -m pytest "$@" -m "kernels and not conformance" || kernels_status=$?
statuses+=("$kernels_status")
for part in "$FIRST_KERNEL" "$SECOND_KERNEL"; do
    part_status=0
    wait "${pids[$part]}" || part_status=$?
    statuses+=("$part_status")
    echo "=== the tests in a qemu guest (-m vm), $part: status $part_status ==="
    cat "$logs/$part"
done
pids=()
# 5: pytest selected nothing (arguments naming only another part's tests)
for s in "${statuses[@]}"; do
    [ "$s" = 0 ] || [ "$s" = 5 ] || exit "$s"
done
