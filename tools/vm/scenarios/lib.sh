# What the scenarios share; the harness puts it in every guest as
# /etc/bpfilter-vm/lib.sh, and a scenario reads it with `. /etc/bpfilter-vm/lib.sh`.
set -e
say() { echo "== $*"; }
loaded() { grep -q "^$1 " /proc/modules; }
# A deleted namespace lets go of its tables' modules later (cleanup_net runs
# asynchronously), so rmmod may first find them busy.
unload() {
	tries=0
	until rmmod "$1" 2>/dev/null; do
		tries=$((tries + 1)); [ $tries -lt 50 ] || { rmmod "$1"; return 1; }
		sleep 0.1
	done
}
# The pid of the helper process serving /dev/bpfilter (PyInstaller's bootloader is its parent).
helper_pid() {
	for fd in /proc/[0-9]*/fd/*; do
		[ "$(readlink "$fd" 2>/dev/null)" = /dev/bpfilter ] && { p=${fd#/proc/}; echo "${p%%/*}"; return; }
	done
	return 0
}
bpf_objects() {
	echo "bpf programs: $(bpftool prog show | grep -c -E 'name (bpfilter|filter)_')" \
	     "netfilter links: $(bpftool link show | grep -c -E '^[0-9]+: (type 10|netfilter) ')"
}
# What is left once unpinned links and programs are freed (after an RCU grace period
# and deferred work: wait a while for it).
bpf_objects_freed() {
	tries=0
	until [ "$(bpf_objects)" = "bpf programs: 0 netfilter links: 0" ]; do
		tries=$((tries + 1)); [ $tries -lt 50 ] || break
		sleep 0.1
	done
	bpf_objects
}
# serve NS SECONDS PORT...: UDP echo and TCP accept on each port, in the background.
serve() {
	ns=$1 seconds=$2; shift 2
	for port in "$@"; do rm -f "/tmp/serve.$ns.$port"; done
	for port in "$@"; do ip netns exec $ns udp serve "$port" "$seconds" >"/tmp/serve.$ns.$port" & done
	for port in "$@"; do
		tries=0
		until grep -qs listening "/tmp/serve.$ns.$port"; do
			tries=$((tries + 1)); [ $tries -lt 100 ] || { echo "no server on $port"; exit 1; }
			sleep 0.1
		done
	done
}
# connect NAME NS ADDR PORT: a TCP connection's outcome
connect() { echo "$1 tcp $3 $4: $(ip netns exec $2 udp connect $3 $4)"; }
# ct_count: snd's conntrack entries
ct_count() { ip netns exec snd cat /proc/sys/net/netfilter/nf_conntrack_count; }
