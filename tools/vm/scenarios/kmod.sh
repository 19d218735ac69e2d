# bpfilter.ko end to end (tests/test_kmod.py): installed where modprobe finds it, the
# unmodified iptables-legacy drives it, packets between two namespaces are filtered by
# its BPF programs. Needs the module in /lib/modules/$(uname -r)/extra, nocap (nocap.c),
# sockopt (sockopt.c) and the shared libraries a Debian system has (the frozen helper is dynamically linked).
. /etc/bpfilter-vm/lib.sh
# traffic PORT...: 3 datagrams to each port of rcv, then what arrived where.
traffic() {
	rm -f /tmp/port.*
	for port in "$@"; do ip netns exec rcv udp recv "$port" 2 >"/tmp/port.$port" & done
	for port in "$@"; do
		tries=0
		until grep -q listening "/tmp/port.$port"; do
			tries=$((tries + 1)); [ $tries -lt 100 ] || { echo "no receiver on $port"; exit 1; }
			sleep 0.1
		done
	done
	for port in "$@"; do ip netns exec snd udp send 198.18.0.2 "$port" 3 >/dev/null; done
	wait
	line=
	for port in "$@"; do line="$line $port:$(sed -n 's/received //p' "/tmp/port.$port")"; done
	echo "traffic:$line"
}

say install
depmod -a
loaded ip_tables && echo "ip_tables: loaded" || echo "ip_tables: not loaded"
modprobe bpfilter
loaded bpfilter && echo "bpfilter: loaded by modprobe"
stat -c '%A %u %n' /dev/bpfilter /run/bpfilter-umh
# Only the helper bpfilter started may open its device, root or not.
cat /dev/bpfilter 2>&1 || true

ip netns add snd
ip netns add rcv
ip link add veth0 netns snd type veth peer name veth1 netns rcv
ip -n snd addr add 198.18.0.1/24 dev veth0
ip -n rcv addr add 198.18.0.2/24 dev veth1
for ns in snd rcv; do ip -n $ns link set lo up; done
ip -n snd link set veth0 up
ip -n rcv link set veth1 up

say rule
ip netns exec rcv iptables-legacy -A INPUT -p udp --dport 9 -j DROP
traffic 9 10
ip netns exec rcv iptables-legacy -L INPUT -v -n -x
echo "tables: $(ip netns exec rcv cat /proc/net/ip_tables_names)"
echo "tables in the root netns: [$(cat /proc/net/ip_tables_names)]"

say restore
ip netns exec rcv iptables-legacy-restore <<'EOF'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:udp_in - [0:0]
-A INPUT -p udp -j udp_in
-A INPUT -p icmp -j ACCEPT
-A udp_in -p udp --dport 9 -j DROP
-A udp_in -p udp --dport 11 -j DROP
-A udp_in -j RETURN
COMMIT
EOF
traffic 9 10 11
ip netns exec rcv iptables-legacy -L -v -n -x

say save
# With the counters (-c): they go back in through the replace, as into the kernel.
ip netns exec rcv iptables-legacy-save -c | grep -v '^#' >/tmp/save1
cat /tmp/save1
ip netns exec rcv iptables-legacy-restore -c </tmp/save1
ip netns exec rcv iptables-legacy-save -c | grep -v '^#' >/tmp/save2
cmp /tmp/save1 /tmp/save2 && echo "save round trip: equal"

say bpf
bpf_objects
bpftool prog show | grep -E 'name (bpfilter|filter)_' | sed 's/.*name \([^ ]*\).*/program \1/'
loaded ip_tables && echo "ip_tables: loaded" || echo "ip_tables: not loaded"

say unprivileged
nocap ip netns exec rcv iptables-legacy -A INPUT -j DROP 2>&1 | head -1 || true
nocap ip netns exec rcv iptables-legacy -L -n 2>&1 | head -1 || true
echo "rules after: $(ip netns exec rcv iptables-legacy -S | grep -c '^-A')"

say ipv6
ip6tables-legacy -L -n 2>&1 | head -1 || true

say bigget
# IPT_SO_GET_ENTRIES (65) with a 600 MB optlen, not the filter table's header plus
# size: ip_tables reads the header and answers EINVAL; so does bpfilter.ko, which
# copies the header alone (the whole buffer would be over its 512 MB payload limit)
ip netns exec rcv sockopt get 65 629145600 filter
ip netns exec rcv sockopt get 65 39 filter

say memcg
# A replace bpfilter would spend more memory on than the caller's memory cgroup has
# left under its limit: refused as the kernel's charge to that cgroup fails (ENOMEM),
# the rules in force unchanged; a small one from the same cgroup is taken.
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo +memory >/sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/small
echo $((64 << 20)) >/sys/fs/cgroup/small/memory.max
sources() {
	printf '*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n'
	seq 0 $(($1 - 1)) | awk '{ printf "-A INPUT -s 10.%d.%d.%d/32 -j DROP\n", $1 / 65536 % 256, $1 / 256 % 256, $1 % 256 }'
	echo COMMIT
}
in_small() { sh -c 'echo $$ >/sys/fs/cgroup/small/cgroup.procs && exec "$@"' sh "$@"; }
ip netns exec rcv iptables-legacy-save >/tmp/before-memcg
sources 20000 | in_small ip netns exec rcv iptables-legacy-restore 2>&1 | tail -1 || true
echo "rules after: $(ip netns exec rcv iptables-legacy -S | grep -c '^-A')"
sources 100 | in_small ip netns exec rcv iptables-legacy-restore && echo "small restore: ok"
echo "rules after: $(ip netns exec rcv iptables-legacy -S | grep -c '^-A')"
ip netns exec rcv iptables-legacy-restore </tmp/before-memcg

say kill
pid=$(helper_pid)
kill -9 "$pid"
tries=0
while [ -d "/proc/$pid" ]; do tries=$((tries + 1)); [ $tries -lt 100 ] || exit 1; sleep 0.1; done
echo "helper killed"
traffic 9 10 11
ip netns exec rcv iptables-legacy -A INPUT -p udp --dport 12 -j DROP
echo "iptables after the kill: ok"
[ "$(helper_pid)" != "$pid" ] && echo "helper: a new one serves"
traffic 9 10 11 12
ip netns exec rcv iptables-legacy -L INPUT -v -n -x

say stall
echo 3 >/sys/module/bpfilter/parameters/timeout
pid=$(helper_pid)
kill -STOP "$pid"
# One request, no retry (iptables tries twice, the second time with a new helper).
start=$(date +%s)
ip netns exec rcv cat /proc/net/ip_tables_names 2>&1 || true
echo "stalled request answered in $(( $(date +%s) - start )) s"
echo 60 >/sys/module/bpfilter/parameters/timeout
ip netns exec rcv iptables-legacy -S INPUT
traffic 9 10

say death
# The helper dies with a request pending: the caller gets EPIPE at once.
pid=$(helper_pid)
kill -STOP "$pid"
ip netns exec rcv cat /proc/net/ip_tables_names >/tmp/names 2>&1 &
sleep 1
kill -9 "$pid"
wait
cat /tmp/names
ip netns exec rcv iptables-legacy -S INPUT | grep -c '^-A' | sed 's/^/rules after: /'

say conflict
modprobe ip_tables 2>/dev/null && echo "modprobe ip_tables: loaded" || echo "modprobe ip_tables: refused"
loaded ip_tables && echo "ip_tables: loaded" || echo "ip_tables: not loaded"

say rmmod
rmmod bpfilter
loaded bpfilter || echo "bpfilter: unloaded"
bpf_objects_freed
[ -e /run/bpfilter-umh ] && echo "helper file: left" || echo "helper file: removed"
[ -e /proc/net/ip_tables_names ] && echo "ip_tables_names: left" || echo "ip_tables_names: removed"
traffic 9 10

say ip_tables first
modprobe ip_tables && echo "modprobe ip_tables: loaded"
modprobe bpfilter 2>/dev/null && echo "modprobe bpfilter: loaded" || echo "modprobe bpfilter: refused"
rmmod ip_tables

say log
dmesg | sed -n 's/^\[ *\([0-9.]*\)\] \(bpfilter: .*\)/\1 \2/p'
