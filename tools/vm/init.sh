#!/bin/sh
# PID 1 of the test guest (dash, busybox for the common commands). The kernel's log
# goes to ttyS0; the scenario's output alone goes to ttyS1 between markers, so no
# printk can interleave with it and the harness can tell a finished scenario, and its
# status, from a crash or a hang.
export PATH=/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
# Module autoloading (ip_tables on first use, veth, xt_* matches) goes through here.
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
hostname vm
ip link set lo up

load_module() {
	deps=$(modinfo -F depends "$1" | tr , ' ')
	[ -z "$deps" ] || modprobe -a $deps || return
	insmod "$1"
}

run() {
	if [ -n "$BPFILTER_VM_MODULE" ]; then
		load_module "$BPFILTER_VM_MODULE" || { echo "loading $BPFILTER_VM_MODULE failed"; return 125; }
	fi
	cd /tmp && sh /etc/bpfilter-vm/scenario </dev/null
}

[ -f /etc/bpfilter-vm/module ] && export BPFILTER_VM_MODULE="$(cat /etc/bpfilter-vm/module)"
# Without output post-processing the harness reads the bytes written ("\n", not "\r\n").
stty -F /dev/ttyS1 -opost
{
	echo "@@BPFILTER-VM-BEGIN@@"
	run
	# The leading newline keeps the marker on its own line; the harness removes it.
	printf '\n@@BPFILTER-VM-END status=%d@@\n' $?
} >/dev/ttyS1 2>&1
# stty sets the mode with TCSADRAIN: it returns once ttyS1 has sent everything, even
# if a background process of the scenario still holds it open and so no close drained it.
stty -F /dev/ttyS1 -opost
poweroff -f
