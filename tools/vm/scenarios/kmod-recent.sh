# -m recent and -m nfacct through bpfilter.ko (tests/test_kmod.py): the kernel's own
# xt_recent and xt_nfacct, which the module sets up for the rule and runs for the
# programs, so that their state is the kernel's: /proc/net/xt_recent/NAME, nfnetlink's
# accounting objects. Port knocking, a flood limit and an accounted port on srv, asked
# from two of cli's addresses over IPv4 and IPv6, first with the kernel's ip_tables
# (the reference), then, unloaded, with bpfilter.ko: the same answers, the same lists,
# the same accounting, the same counters.
. /etc/bpfilter-vm/lib.sh

namespaces() {
	fresh srv cli
	link srv eth0 02:bf:07:00:00:02 fd00::2/64 cli eth0 02:bf:07:00:00:01 fd00::1/64
	ip -n cli addr add fd00::3/64 dev eth0 nodad
	ip -n srv neigh add fd00::3 lladdr 02:bf:07:00:00:01 dev eth0 nud permanent
	ip -n srv addr add 198.18.0.2/24 dev eth0
	ip -n cli addr add 198.18.0.1/24 dev eth0
	ip -n cli addr add 198.18.0.3/24 dev eth0
	ip netns exec srv nfacct add udp_in
	settle
}

# A knock on 7001 (dropped) opens 7002 to its sender for a minute; 7003 takes three
# datagrams a minute from an address, its fourth is dropped; 7004 closes 7002 again;
# 7005 is accounted in the object udp_in.
RULES='*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --dport 7001 -m recent --set --name knock --rsource -j DROP
-A INPUT -p udp -m udp --dport 7002 -m recent --rcheck --seconds 60 --name knock --rsource -j ACCEPT
-A INPUT -p udp -m udp --dport 7002 -j DROP
-A INPUT -p udp -m udp --dport 7003 -m recent --update --seconds 60 --hitcount 3 --name flood --rsource -j DROP
-A INPUT -p udp -m udp --dport 7003 -m recent --set --name flood --rsource -j ACCEPT
-A INPUT -p udp -m udp --dport 7004 -m recent --remove --name knock --rsource -j ACCEPT
-A INPUT -p udp -m udp --dport 7005 -m nfacct --nfacct-name udp_in -j ACCEPT
COMMIT'

# lists NAME...: their addresses, as the kernel lists them (the timestamps left out)
lists() {
	for name in "$@"; do
		echo "list $name: $(ip netns exec srv sed 's/ ttl:.*//' /proc/net/xt_recent/$name | sort | tr '\n' ' ')"
	done
}

recent_probes() {
	namespaces
	echo "$RULES" | ip netns exec srv iptables-legacy-restore
	echo "$RULES" | ip netns exec srv ip6tables-legacy-restore
	serve srv 60 7001 7002 7003 7004 7005
	for server in 198.18.0.2 fd00::2; do
		case $server in *:*) one=fd00::1 two=fd00::3 ;; *) one=198.18.0.1 two=198.18.0.3 ;; esac
		ask closed cli $server 7002 1 $one
		ask knock cli $server 7001 1 $one
		ask knocked cli $server 7002 1 $one
		ask other cli $server 7002 1 $two
		for n in 1 2 3 4; do ask "flood $n" cli $server 7003 1 $one; done
		ask "flood other" cli $server 7003 1 $two
		ask accounted cli $server 7005 100 $two
	done
	lists knock flood
	echo "udp_in: $(ip netns exec srv nfacct get udp_in)"
	echo "no such object: $(ip netns exec srv iptables-legacy -A INPUT -m nfacct --nfacct-name nosuch 2>&1 | head -1)"
	# a replace sets every rule up anew: the lists, found by name, stay as they were
	ip netns exec srv iptables-legacy -A INPUT -p tcp -m recent --rcheck --name knock -j ACCEPT
	lists knock
	ask "after a replace" cli 198.18.0.2 7002 1 198.18.0.1
	# the administrator's writes: flush, add, and the rules see them
	ip netns exec srv sh -c 'echo / >/proc/net/xt_recent/knock'
	ask flushed cli 198.18.0.2 7002 1 198.18.0.1
	ip netns exec srv sh -c 'echo +198.18.0.3 >/proc/net/xt_recent/knock'
	ask added cli 198.18.0.2 7002 1 198.18.0.3
	ask remove cli 198.18.0.2 7004 1 198.18.0.3
	ask removed cli 198.18.0.2 7002 1 198.18.0.3
	lists knock
	# what xt_recent's checkentry refuses, with the kernel's errno (its bound on
	# --hitcount depends on the kernel's version: either way, the same)
	echo "hitcount 300: $(ip netns exec srv iptables-legacy -A INPUT -m recent --rcheck --hitcount 300 --name big 2>&1 | head -1)"
	echo "--set --seconds: $(ip netns exec srv iptables-legacy -A INPUT -m recent --set --seconds 5 --name big 2>&1 | head -1)"
	ip netns exec srv iptables-legacy -L INPUT -v -n -x
	ip netns exec srv ip6tables-legacy -L INPUT -v -n -x
	finish_probes
	# a list goes with the last rule naming it
	ip netns exec srv iptables-legacy -F
	ip netns exec srv ip6tables-legacy -F
	echo "lists left: $(ip netns exec srv ls /proc/net/xt_recent 2>&1 | tr '\n' ' ')"
}

phases() {
	say "$1 recent"
	recent_probes
}

NAMESPACES="srv cli"
reference_then_bpfilter iptable_filter ip6table_filter xt_recent xt_nfacct nfnetlink_acct xt_tcpudp

say bpfilter helper killed
# The instances are the module's, not the helper's: the rules go on with their lists.
namespaces
echo "$RULES" | ip netns exec srv iptables-legacy-restore
serve srv 20 7001 7002
ask knock cli 198.18.0.2 7001 1 198.18.0.1
kill -9 "$(helper_pid)"
echo "helper killed"
ask knocked cli 198.18.0.2 7002 1 198.18.0.1
lists knock
finish_probes

say bpfilter helper killed in a load
# A helper killed once it set a load's kernel matches up, before the load is pinned:
# the next helper gives back what no table names (the list goes), and the table is
# what it was. Its rules are left to code by the classifier: verifying them takes
# seconds, the time to kill the helper once the list exists.
awk 'BEGIN {
	print "*filter"; print ":INPUT ACCEPT [0:0]"; print ":FORWARD ACCEPT [0:0]"
	print ":OUTPUT ACCEPT [0:0]"
	print "-A INPUT -p udp -m recent --set --name half"
	for (i = 0; i < 5000; i++)
		printf "-A INPUT -p tcp -m tcp --dport %d --tcp-flags SYN,ACK SYN -j DROP\n", i + 1
	print "COMMIT" }' >/tmp/half.rules
ip netns exec cli iptables-legacy -S >/dev/null   # a helper, found before the load
helper=$(helper_pid)
# not through a function: $! is then iptables-legacy-restore itself, in srv
ip netns exec srv iptables-legacy-restore </tmp/half.rules 2>/dev/null &
restore=$!
tries=0
until [ -e /proc/$restore/net/xt_recent/half ]; do
	tries=$((tries + 1)); [ $tries -lt 30000 ] || break
	sleep 0.01
done
kill -9 "$helper"
wait || true
echo "rules naming half: $(ip netns exec srv iptables-legacy -S INPUT | grep -c half || true)"
echo "lists: $(ip netns exec srv ls /proc/net/xt_recent | tr '\n' ' ')"
dmesg | grep -o "gave back [0-9]* kernel match instance(s) no table names" | tail -1

say rmmod
# Deleting the namespace destroys what its rules had set up (when the helper next
# sweeps, or as the namespace goes): the lists, and with the last one xt_recent is free
# to go.
ip netns exec cli iptables-legacy -S >/dev/null   # a helper again, to sweep
ip netns del srv
unloaded xt_recent
ip netns del cli
unloaded bpfilter
