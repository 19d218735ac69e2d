#!/usr/bin/env bash
# Set up, then run the whole test suite against the real kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec python3 -m pytest "$@"
