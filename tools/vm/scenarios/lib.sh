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
# unloaded MODULE: unload() that waits longer (what holds the module may let go of it
# only after the helper's next sweep) and says whether it went, rather than failing
unloaded() {
	tries=0
	until rmmod "$1" 2>/dev/null; do
		tries=$((tries + 1)); [ $tries -lt 150 ] || break
		sleep 0.1
	done
	loaded "$1" && echo "$1: in use" || echo "$1: unloaded"
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
# serve NS SECONDS PORT...: UDP echo and TCP accept on each port, in the background
# (with SERVE_PEERS=peers, a line per datagram or connection says where it came from).
serve() {
	ns=$1 seconds=$2; shift 2
	for port in "$@"; do rm -f "/tmp/serve.$ns.$port"; done
	for port in "$@"; do
		ip netns exec $ns udp serve "$port" "$seconds" ${SERVE_PEERS:-} >"/tmp/serve.$ns.$port" &
	done
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

# IPv6 between namespaces, with only the probes crossing the hooks: no interface has a
# link-local address (no DAD, no router solicitation), neighbours are static (no
# neighbour discovery), and settle waits out the MLD reports of the solicited-node
# groups the addresses joined.

# link NS DEV MAC ADDR/LEN PEER-NS PEER-DEV PEER-MAC PEER-ADDR/LEN: a veth with an
# address and a static neighbour at each end
link() {
	ip link add "$2" netns "$1" address "$3" type veth peer name "$6" netns "$5" address "$7"
	for end in "$1 $2 $4 ${8%/*} $7" "$5 $6 $8 ${4%/*} $3"; do
		set -- $end
		ip -n "$1" link set "$2" addrgenmode none
		ip -n "$1" addr add "$3" dev "$2" nodad
		ip -n "$1" neigh add "$4" lladdr "$5" dev "$2" nud permanent
		ip -n "$1" link set "$2" up
	done
}
fresh() {
	for ns in "$@"; do
		ip netns del "$ns" 2>/dev/null || true
		ip netns add "$ns"
		ip -n "$ns" link set lo up
		# REJECT's answers are ICMPv6 errors, which the kernel rate-limits per peer
		ip netns exec "$ns" sh -c 'echo 0 >/proc/sys/net/ipv6/icmp/ratelimit'
	done
}
settle() { sleep 3; }
# lan -- fw -- wan, fw routing between them (which gives it the subnet-router anycast
# addresses 2001:db8:1:: and 2001:db8:2::) and blackholing 2001:db8:dead::/48; lan
# can also send from addresses fw has no route back to (blackholed, and none at all)
router() {
	fresh fw lan wan
	ip netns exec fw sh -c 'echo 1 >/proc/sys/net/ipv6/conf/all/forwarding'
	link fw vin0 02:bf:06:01:00:01 2001:db8:1::1/64 lan eth0 02:bf:06:01:00:02 2001:db8:1::2/64
	link fw vout0 02:bf:06:02:00:01 2001:db8:2::1/64 wan eth0 02:bf:06:02:00:02 2001:db8:2::2/64
	ip -n lan route add default via 2001:db8:1::1
	ip -n wan route add default via 2001:db8:2::1
	ip -n fw route add blackhole 2001:db8:dead::/48
	ip -n lan neigh add 2001:db8:1:: lladdr 02:bf:06:01:00:01 dev eth0 nud permanent
	ip -n lan addr add 2001:db8:dead::2/128 dev eth0 nodad
	ip -n lan addr add 2001:db8:ffff::2/128 dev eth0 nodad
	settle
}
# peers NS PORT: what `serve` (with SERVE_PEERS=peers or headers) on PORT in NS saw,
# in order
peers() { grep -E '^((udp|tcp) from|  )' "/tmp/serve.$1.$2" | sed "s/^/$1:$2 /" || true; }
# finish_probes "NS PORT"...: the servers stopped, then what each of those saw
finish_probes() {
	kill $(jobs -p) 2>/dev/null || true
	wait
	for server in "$@"; do peers $server; done
}

# bridged GUEST BRIDGE HOST-ADDR/LEN GUEST-ADDR/LEN: the host fw with the bridge BRIDGE
# (its address HOST-ADDR) and GUEST behind it, its default route through fw; wan
# outside, on fw's vout0 (10.2.0.0/24); fw forwards IPv4
bridged() {
	for ns in fw $1 wan; do ip netns del $ns 2>/dev/null || true; ip netns add $ns; done
	ip -n fw link add $2 type bridge
	ip -n fw addr add $3 dev $2
	ip link add veth0 netns fw type veth peer name eth0 netns $1
	ip -n fw link set veth0 master $2
	ip link add vout0 netns fw type veth peer name eth0 netns wan
	ip -n fw addr add 10.2.0.1/24 dev vout0
	ip -n $1 addr add $4 dev eth0
	ip -n wan addr add 10.2.0.2/24 dev eth0
	for ns in fw $1 wan; do ip -n $ns link set lo up; done
	for dev in $2 veth0 vout0; do ip -n fw link set $dev up; done
	for ns in $1 wan; do ip -n $ns link set eth0 up; done
	ip -n $1 route add default via ${3%/*}
	ip netns exec fw sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
}

# lan -- fw -- wan over IPv4: fw routes between lan (10.1.0.0/24, its vin0) and wan
# (10.2.0.0/24, its vout0), and its own connections go to wan
router4() {
	for ns in fw lan wan; do ip netns del $ns 2>/dev/null || true; ip netns add $ns; done
	ip link add vin0 netns fw type veth peer name eth0 netns lan
	ip link add vout0 netns fw type veth peer name eth0 netns wan
	ip -n fw addr add 10.1.0.1/24 dev vin0
	ip -n fw addr add 10.2.0.1/24 dev vout0
	ip -n lan addr add 10.1.0.2/24 dev eth0
	ip -n wan addr add 10.2.0.2/24 dev eth0
	for ns in fw lan wan; do ip -n $ns link set lo up; done
	for dev in vin0 vout0; do ip -n fw link set $dev up; done
	for ns in lan wan; do ip -n $ns link set eth0 up; done
	ip -n lan route add default via 10.1.0.1
	ip -n wan route add default via 10.2.0.1
	ip -n fw route add default via 10.2.0.2
	ip netns exec fw sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
}

# router4 as a Kubernetes node: wan also holds the endpoints of the last Service of
# tools/bench/kubeproxy.py's rulesets, and of the affine one before it
kube_node() {
	router4
	for ep in 10.96.0.1 10.96.0.2 10.96.0.3 10.96.0.4; do ip -n wan addr add $ep/32 dev eth0; done
	ip -n fw route add 10.96.0.0/24 via 10.2.0.2
}

# router, over IPv6, as a node of an IPv6 cluster (kubeproxy.py's ipv6 rulesets): the
# Services' addresses routed towards wan, and lan connecting to them from its own
# network's address (not one fw has no route back to)
kube6_node() {
	router
	for ep in fd00:96::1 fd00:96::2 fd00:96::3 fd00:96::4; do
		ip -n wan addr add $ep/128 dev eth0 nodad
	done
	ip -n fw route add fd00:96::/64 via 2001:db8:2::2
	ip -n fw route add fd00:30::/64 via 2001:db8:2::2
	ip -n lan route add fd00:30::/64 via 2001:db8:1::1 src 2001:db8:1::2
}

# ask NAME NS ADDR PORT [SIZE [FROM]]: a UDP probe's outcome
ask() { echo "$1 udp $3 $4${6:+ from $6}: $(ip netns exec $2 udp ask $3 $4 $5 $6)"; }

# legacy_xtables: whether this kernel has the legacy iptables tables at all
# (CONFIG_NETFILTER_XTABLES_LEGACY, optional since 6.17: Debian's rt kernel has none)
legacy_xtables() {
	grep -q '/iptable_filter\.ko' /lib/modules/$(uname -r)/modules.builtin ||
		[ -n "$(find /lib/modules/$(uname -r)/kernel/net/ipv4/netfilter \
			-name 'iptable_filter.ko*' 2>/dev/null)" ]
}

# reference_then_bpfilter MODULE...: the scenario's `phases` run first against the
# kernel's ip_tables and ip6_tables (the reference; none on a kernel without legacy
# xtables, where the test compares with another kernel's reference), then, with those
# and MODULE... unloaded (and the namespaces $NAMESPACES, by default fw, lan and wan,
# deleted), against bpfilter.ko. bpfilter's refusals name the rule: the kernel log's
# lines are shown whatever ends the script.
reference_then_bpfilter() {
	trap 'say log; dmesg | sed -n "s/^\[ *\([0-9.]*\)\] \(bpfilter: .*\)/\1 \2/p"' EXIT
	if legacy_xtables; then
		phases reference
		say unload ip_tables ip6_tables
		for ns in ${NAMESPACES:-fw lan wan}; do ip netns del $ns; done
	else
		say reference
		echo "none: this kernel has no legacy xtables"
		say unload ip_tables ip6_tables
	fi
	for m in "$@" ip_tables ip6_tables; do
		case $m in
		ip_tables | ip6_tables)
			# and the tables the scenario's commands loaded beside those named
			for user in $(sed -n "s/^$m [0-9]* [0-9]* \([^ ]*\).*/\1/p" /proc/modules |
				tr , ' '); do
				[ "$user" = - ] || { loaded $user && unload $user; }
			done ;;
		esac
		loaded $m && unload $m
	done
	for m in ip_tables ip6_tables; do
		loaded $m && echo "$m: loaded" || echo "$m: not loaded"
	done
	depmod -a
	modprobe bpfilter
	phases bpfilter
}
