#!/usr/bin/env bash
# The main job: set up, then filter real traffic between namespaces with bpfilter,
# side by side with the kernel's own iptables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec python3 -m bpfilter_lab demo "$@"
