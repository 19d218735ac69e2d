# bpfilter.ko answers several callers at once (tests/test_kmod.py): while one
# namespace's big replace is compiled, another namespace's listing is answered, as
# quickly as when nothing else runs. Needs the module in /lib/modules/$(uname -r)/extra
# and the shared libraries of a Debian system.
. /etc/bpfilter-vm/lib.sh
# centiseconds since boot
now() { read up _ </proc/uptime; echo "${up%.*}${up#*.}"; }
# iptables-legacy serialises every command on the host through one lock file, whatever
# the namespace (the kernel's ip_tables alike): each namespace gets its own here, so
# that what waits, if anything, is bpfilter.
ipt() { ns=$1; shift; XTABLES_LOCKFILE=/tmp/xtables.$ns ip netns exec "$ns" "$@"; }
# list NS: one listing, and how long it took, in centiseconds
list() {
	start=$(now)
	ipt "$1" iptables-legacy --modprobe=/bin/false -L INPUT -n >/dev/null
	echo $(( $(now) - start ))
}
depmod -a
modprobe bpfilter
ip netns add a
ip netns add b

say alone
list b >/dev/null   # the helper started
times=
for i in 1 2 3; do times="$times $(list b)"; done
echo "listing in b alone (cs):$times"

say beside a replace
awk 'BEGIN {
	print "*filter"; print ":INPUT ACCEPT [0:0]"; print ":FORWARD ACCEPT [0:0]"
	print ":OUTPUT ACCEPT [0:0]"
	for (i = 0; i < 15001; i++)
		printf "-A INPUT -s 10.%d.%d.%d/32 -j DROP\n", int(i / 65536), int(i / 256) % 256, i % 256
	print "COMMIT" }' >/tmp/big.rules
echo 900 >/sys/module/bpfilter/parameters/timeout
# not through ipt(): $! is then iptables-legacy-restore itself (ip netns exec execs it)
XTABLES_LOCKFILE=/tmp/xtables.a ip netns exec a iptables-legacy-restore --modprobe=/bin/false \
	</tmp/big.rules &
restore=$!
# until a's replace is with the helper: iptables-restore waits in setsockopt (54)
in_setsockopt() { [ "$(cut -d' ' -f1 /proc/$restore/syscall 2>/dev/null)" = 54 ]; }
deadline=$(( $(date +%s) + 300 ))
until in_setsockopt || [ "$(date +%s)" -gt $deadline ]; do sleep 0.1; done
in_setsockopt && echo "a: replacing"
times=
for i in 1 2 3; do times="$times $(list b)"; done
echo "listing in b beside a's replace (cs):$times"
in_setsockopt && echo "a: still replacing" || echo "a: done already"
wait $restore && echo "a: restored" || echo "a: restore failed"
echo "rules in a: $(ipt a iptables-legacy --modprobe=/bin/false -S INPUT | grep -c -- '-j DROP')"

say rmmod
rmmod bpfilter && echo "bpfilter: unloaded"
