# bpfilter.ko's lifetime under attack (tests/test_kmod.py): the helper with a noexec
# /tmp, helpers killed for a timeout (what each leaves behind), a flood of refusals in
# the kernel log, a compile worker when its helper is killed, and rmmod racing with
# callers, opens of /dev/bpfilter and a dying helper, round after round. Needs the
# module in /lib/modules/$(uname -r)/extra and the shared libraries of a Debian system.
# Each check prints its outcome and goes on, so that one run shows every failure.
. /etc/bpfilter-vm/lib.sh
ROUNDS=${ROUNDS:-25}
set_timeout() { echo "$1" >/sys/module/bpfilter/parameters/timeout; }
# never `modprobe ip_tables` behind our back once bpfilter.ko is gone
ipt() { ns=$1; shift; ip netns exec "$ns" iptables-legacy --modprobe=/bin/false "$@"; }
list() { ipt "$1" -L INPUT -n >/dev/null 2>&1; }
extractions() { ls -d /tmp/_MEI* /run/_MEI* 2>/dev/null | wc -l; }
children() { for s in /proc/[0-9]*/stat; do [ "$(cut -d' ' -f4 "$s" 2>/dev/null)" = "$1" ] && { p=${s#/proc/}; echo "${p%%/*}"; }; done; return 0; }
alive() { [ -e "/proc/$1" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }
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
	list a || echo "stalled: refused"
	set_timeout 60
done
list a && echo "after the stalls: ok"
tries=0
until [ "$(extractions)" -le 1 ]; do
	tries=$((tries + 1)); [ $tries -lt 50 ] || break
	sleep 0.1
done
echo "extractions: $(extractions)"

say ratelimit
# refusals as fast as 8 callers can make them; bpfilter.ko logs each helper's reason
start=$(date +%s)
for c in 1 2 3 4 5 6 7 8; do
	(for i in 1 2 3 4 5 6 7 8 9 10; do
		ipt a -A INPUT -m statistic --mode random --probability 0.5 -j ACCEPT 2>/dev/null &&
			echo "accepted?"
	done) &
done
wait
echo "refusals: 80 in $(( $(date +%s) - start )) s"
echo "logged: $(dmesg | grep -c "match 'statistic'")"

say forked
# a long run is compiled with a forked worker (PARALLEL_MIN rules); the helper is
# killed while it works
awk 'BEGIN {
	print "*filter"; print ":INPUT ACCEPT [0:0]"; print ":FORWARD ACCEPT [0:0]"
	print ":OUTPUT ACCEPT [0:0]"
	for (i = 0; i < 20001; i++)
		printf "-A INPUT -s 10.%d.%d.%d/32 -j DROP\n", int(i / 65536), int(i / 256) % 256, i % 256
	print "COMMIT" }' >/tmp/big.rules
list b
set_timeout 900
helper=$(helper_pid)
ip netns exec b iptables-legacy-restore --modprobe=/bin/false </tmp/big.rules >/dev/null 2>&1 &
restore=$!
worker=
deadline=$(( $(date +%s) + 400 ))
until [ -n "$worker" ] || [ "$(date +%s)" -gt $deadline ]; do
	worker=$(children "$helper")
	sleep 0.1
done
if [ -n "$worker" ]; then
	echo "worker: started"
	kill -9 "$helper"
	sleep 2
	alive "$worker" && echo "worker after the helper's death: alive" ||
		echo "worker after the helper's death: gone"
	held=$(helper_pid)
	echo "device held after the helper's death: ${held:+by $held}${held:-no}"
else
	echo "worker: none"
fi
kill -9 $restore 2>/dev/null || true
wait $restore || true
set_timeout 20
rmmod bpfilter &
unload=$!
tries=0
while alive $unload; do
	tries=$((tries + 1)); [ $tries -lt 600 ] || break
	sleep 0.1
done
if alive $unload; then
	echo "rmmod: stuck"
	[ -n "$worker" ] && kill -9 "$worker"
fi
wait $unload || true
loaded bpfilter && echo "bpfilter: loaded" || echo "bpfilter: unloaded"
echo "extractions: $(extractions)"

say race
# rmmod while the helper starts, while callers call, with a helper killed under it,
# and opens of /dev/bpfilter all along (refused: only the helper may)
round=0
stuck=0
while [ $round -lt $ROUNDS ]; do
	modprobe bpfilter
	(while :; do list a; done) &
	callers=$!
	(while :; do cat /dev/bpfilter 2>/dev/null; done) &
	opener=$!
	case $((round % 4)) in
	1) sleep 0.$((round % 10)) ;;
	2) list b || true ;;
	3) list b || true
	   (sleep 0.$((round % 10)); kill -9 $(helper_pid) 2>/dev/null) & ;;
	esac
	tries=0
	# a call in flight holds the module (EBUSY): again
	until rmmod bpfilter 2>/dev/null; do
		tries=$((tries + 1)); [ $tries -lt 600 ] || break
		sleep 0.1
	done
	kill $callers $opener
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
dmesg | sed -n 's/^\[ *\([0-9.]*\)\] \(bpfilter: .*\)/\1 \2/p' | grep -v "match 'statistic'" | tail -60
