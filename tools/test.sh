#!/usr/bin/env bash
# Set up, then run the whole test suite against the real kernel. The tests in a qemu
# guest (marker vm: TCG, one core each) run beside the others, which mostly use one
# core too: the two halves take about as long as the longer of them, not their sum.
# Their output follows the other half's; the status is the worse of the two.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
vm_log=$(mktemp /tmp/bpfilter-vm-tests.XXXXXX)
python3 -m pytest "$@" -m vm >"$vm_log" 2>&1 &
vm=$!
status=0
python3 -m pytest "$@" -m "not vm" || status=$?
vm_status=0
wait "$vm" || vm_status=$?
echo "=== the tests in a qemu guest (-m vm) ==="
cat "$vm_log"
rm -f "$vm_log"
# 5: pytest selected nothing (arguments naming only the other half's tests)
[ "$status" = 5 ] && status=0
[ "$vm_status" = 5 ] && vm_status=0
[ "$status" != 0 ] && exit "$status"
exit "$vm_status"
