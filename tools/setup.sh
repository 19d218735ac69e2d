#!/usr/bin/env bash
# Everything bpfilter needs on a fresh Debian machine (run as root): the reference
# iptables/nftables, iproute2 and bpftool from Debian, and the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
# strace: the codec tests capture what the binaries pass; nfct, nfacct: commands of
# iptables' own .t test files (tests/iptables_suite.py); ufw: Debian's own, run through
# bpfilter (tests/test_ufw.py; installing it enables nothing)
packages=(iptables nftables iproute2 bpftool tcpdump kmod strace nfct nfacct ufw)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The qemu guest, its Debian 6.12 kernel and a module toolchain (tests marked vm).
bash tools/vm/setup.sh
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
