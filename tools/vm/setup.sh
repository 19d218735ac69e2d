#!/usr/bin/env bash
# What tools/vm/run.py needs on a Debian host (run as root, any number of times): qemu,
# the tools copied into the guest, a static C library for the guest's own small tools,
# and debootstrap, which makes the root of the guest kernel's Debian release that its
# modules are built in (harness.build_root: that release's kbuild and compiler; a
# kernel's packages come through the harness's own view of that release's archive).
set -euo pipefail

# qemu runs the guest; iptables, iproute2, bpftool, dash and nft are copied into it;
# gcc and libc6-dev build the guest's static tools; kmod's depmod indexes its modules.
packages=(qemu-system-x86 iptables iproute2 bpftool dash nftables kmod gcc libc6-dev make
          debootstrap debian-archive-keyring xz-utils)

export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
