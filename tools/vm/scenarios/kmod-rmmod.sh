# bpfilter.ko's lifetime under attack (tests/test_kmod.py): the helper with a noexec
# /tmp, helpers killed for a timeout (what each leaves behind), a flood of refusals in
# the kernel log, and rmmod racing with callers, opens of /dev/bpfilter and a dying
# helper, round after round. Needs the module in /lib/modules/$(uname -r)/extra,
# /usr/bin/sockopt (sockopt.c) and the shared libraries of a Debian system. Each check
# prints its outcome and goes on, so that one run shows every failure.
. /etc/bpfilter-vm/lib.sh
# each of the four kinds of round twice: under TCG a round is a whole helper start
ROUNDS=${ROUNDS:-8}
set_timeout() { echo "$1" >/sys/module/bpfilter/parameters/timeout; }
# never `modprobe ip_tables` behind our back once bpfilter.ko is gone
ipt() { ns=$1; shift; ip netns exec "$ns" iptables-legacy --modprobe=/bin/false "$@"; }
list() { ipt "$1" -L INPUT -n >/dev/null 2>&1; }
extractions() { ls -d /tmp/_MEI* /run/_MEI* 2>/dev/null | wc -l; }
depmod -a
ip netns add a
ip netns add b

say noexec
# PyInstaller's bootloader unpacks the helper's libraries and maps them executable
mount -t tmpfs -o noexec tmpfs /tmp
modprobe bpfilter
list a && echo "iptables with a noexec /tmp: ok" || echo "iptables with a noexec /tmp: failed"
umount -l /tmp

say leak
# each stalled helper is killed after `timeout` seconds; a helper starts with 60
for i in 1 2 3; do
	list a || true
	pid=$(helper_pid)
	[ -n "$pid" ] && kill -STOP "$pid"
	set_timeout 3
	# one request: iptables would ask again, and a new helper may answer in time
	ip netns exec a cat /proc/net/ip_tables_names >/dev/null 2>&1 || echo "stalled: refused"
	set_timeout 60
done
list a && echo "after the stalls: ok"
# the helper that serves now removes what the killed ones unpacked
tries=0
until [ "$(extractions)" -le 1 ]; do
	tries=$((tries + 1)); [ $tries -lt 50 ] || break
	sleep 0.1
done
echo "extractions: $(extractions)"

say ratelimit
# IPT_SO_SET_ADD_COUNTERS (65) with 16 bytes, which the helper refuses, explaining why
# (xt_counters_info needs more): bpfilter.ko logs the explanation
start=$(date +%s)
ip netns exec a sockopt flood 200 65 16
echo "refusals: 200 in $(( $(date +%s) - start )) s"
echo "logged: $(dmesg | grep -c 'xt_counters_info needs more')"

say race
# rmmod while the helper starts, while callers call, with a helper killed under it,
# and opens of /dev/bpfilter all along (refused: only the helper may)
round=0
stuck=0
while [ $round -lt $ROUNDS ]; do
	modprobe bpfilter
	(while :; do list a || true; done) &
	callers=$!
	(while :; do cat /dev/bpfilter 2>/dev/null || true; done) &
	opener=$!
	case $((round % 4)) in
	1) sleep 0.$((round % 10)) ;;
	2) list b || true ;;
	3) list b || true
	   (sleep 0.$((round % 10)); kill -9 $(helper_pid) 2>/dev/null || true) & ;;
	esac
	tries=0
	# a call in flight holds the module (EBUSY): again
	until rmmod bpfilter 2>/dev/null; do
		tries=$((tries + 1)); [ $tries -lt 600 ] || break
		sleep 0.1
	done
	kill $callers $opener 2>/dev/null || true
	wait
	if loaded bpfilter; then
		stuck=$((stuck + 1))
		echo "round $round: not unloaded"
		break
	fi
	round=$((round + 1))
done
echo "rounds: $round, unloaded: $((round - stuck))"
loaded bpfilter && echo "bpfilter: loaded" || echo "bpfilter: unloaded"
echo "helper file: $([ -e /run/bpfilter-umh ] && echo present || echo removed)"
echo "extractions: $(extractions)"

say log
dmesg | sed -n 's/^\[ *\([0-9.]*\)\] \(bpfilter: .*\)/\1 \2/p' | grep -v 'xt_counters_info needs more' | tail -60
