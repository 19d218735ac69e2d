#!/usr/bin/env bash
# What tools/vm/run.py needs on a Debian bookworm host (run as root, any number of
# times): qemu, the tools copied into the guest, a toolchain for the guest's static
# helper and for out-of-tree modules, and an apt that can fetch the 6.12 cloud kernel.
set -euo pipefail

# qemu runs the guest; iptables, iproute2, bpftool and dash are copied into it; gcc-12
# (the compiler Debian built the kernel with), make and pahole (module BTF; the
# headers' kbuild calls it) build modules; libc6-dev has the static libc of the helper;
# dkms builds bpfilter.ko from its installed sources (tests/test_kmod.py).
packages=(qemu-system-x86 iptables iproute2 bpftool dash kmod gcc gcc-12 libc6-dev make dwarves
          dkms)

export DEBIAN_FRONTEND=noninteractive

# The guest's kernel and headers: bookworm carries linux-6.12 as a security update;
# where a host's sources lack it, backports has it too.
kernel_suite() {
    local headers='^linux-headers-6\.12\.[0-9]+\+deb12-cloud-amd64$'
    [ -n "$(apt-cache search --names-only "$headers")" ] && return
    echo "deb http://deb.debian.org/debian bookworm-backports main" \
        >/etc/apt/sources.list.d/bpfilter-vm-backports.list
    apt-get update -qq
    [ -n "$(apt-cache search --names-only "$headers")" ] ||
        { echo "no 6.12 cloud kernel in apt's sources" >&2; exit 1; }
}

# Fresh lists every time: the kernel the harness resolves must still be on the mirror.
apt-get update -qq
kernel_suite
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
