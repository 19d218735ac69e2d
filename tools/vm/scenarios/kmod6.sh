# The guest's unmodified ip6tables-legacy through bpfilter.ko (tests/test_kmod.py):
# REJECT with each --reject-with, addrtype, and a stateful ruleset reading the
# kernel's IPv6 conntrack. The same probes run first against the kernel's ip6_tables
# (the reference), then, ip6_tables unloaded, against bpfilter.ko; the answers the
# peers see and the `-L -v` counters must be the same. Needs bpfilter.ko in
# /lib/modules/$(uname -r)/extra and the shared libraries of a Debian system.
#
# Only the probes may cross the hooks, or the counters would not be exact: each phase
# builds its namespaces with lib.sh's link, fresh and settle, which say how.
. /etc/bpfilter-vm/lib.sh

# snd -- rcv: one link
pair() {
	fresh snd rcv
	link snd veth0 02:bf:06:00:00:01 2001:db8::1/64 rcv veth1 02:bf:06:00:00:02 2001:db8::2/64
	settle
}
listing() { ip netns exec "$1" ip6tables-legacy -L -v -n -x; }

# rcv answers for the firewall: REJECT with each answer ip6tables has, over UDP and
# TCP (tcp-reset only for TCP), once from a user chain, and at OUTPUT.
REJECTS="icmp6-no-route:20 icmp6-adm-prohibited:21 icmp6-addr-unreachable:22
icmp6-port-unreachable:23 icmp6-policy-fail:24 icmp6-reject-route:25"
reject_probes() {
	pair
	{
		echo "*filter"
		echo ":INPUT ACCEPT [0:0]"
		echo ":FORWARD ACCEPT [0:0]"
		echo ":OUTPUT ACCEPT [0:0]"
		echo ":reject_chain - [0:0]"
		for r in $REJECTS; do
			echo "-A INPUT -p udp -m udp --dport ${r#*:} -j REJECT --reject-with ${r%:*}"
			echo "-A INPUT -p tcp -m tcp --dport ${r#*:} -j REJECT --reject-with ${r%:*}"
		done
		echo "-A INPUT -p tcp -m tcp --dport 26 -j REJECT --reject-with tcp-reset"
		echo "-A INPUT -p udp -m udp --dport 27 -j reject_chain"
		echo "-A INPUT -p udp -m udp --dport 28 -j DROP"
		echo "-A OUTPUT -p udp -m udp --dport 29 -j REJECT --reject-with icmp6-adm-prohibited"
		echo "-A reject_chain -j REJECT"
		echo "COMMIT"
	} | ip netns exec rcv ip6tables-legacy-restore
	echo "tables: $(ip netns exec rcv cat /proc/net/ip6_tables_names)"
	serve rcv 30 20 21 22 23 24 25 26 27 28 30
	serve snd 30 29
	for r in $REJECTS; do
		ask reject snd 2001:db8::2 ${r#*:}
		connect reject snd 2001:db8::2 ${r#*:}
	done
	connect reject snd 2001:db8::2 26     # tcp-reset
	ask reject snd 2001:db8::2 26         # not tcp: on to the open port
	ask reject snd 2001:db8::2 27         # the default, from a user chain
	ask reject snd 2001:db8::2 28         # DROP, for contrast
	ask reject snd 2001:db8::2 30
	connect reject snd 2001:db8::2 30
	ask reject rcv 2001:db8::1 29         # at OUTPUT: the sender's own send fails
	kill $(jobs -p) 2>/dev/null || true
	wait
	listing rcv
}

# addrtype at each hook: each kind of address an IPv6 rule may ask about, inverted,
# limited to a device.
addrtype_probes() {
	router
	ip netns exec fw ip6tables-legacy-restore <<'RULES'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:types - [0:0]
-A INPUT -p udp -m udp --dport 9 -j types
-A INPUT -m addrtype --dst-type MULTICAST -j DROP
-A INPUT -p udp -m udp --dport 10 -m addrtype --src-type UNICAST --dst-type LOCAL --limit-iface-in -j DROP
-A INPUT -p udp -m udp --dport 11 -m addrtype ! --src-type UNICAST -j DROP
-A FORWARD -p udp -m addrtype --dst-type UNICAST --limit-iface-out -j ACCEPT
-A FORWARD -m addrtype ! --dst-type LOCAL -j DROP
-A OUTPUT -p udp -m udp --dport 12 -m addrtype --dst-type LOCAL -j DROP
-A types -m addrtype --dst-type LOCAL
-A types -m addrtype --dst-type LOCAL --limit-iface-in
-A types -m addrtype --src-type LOCAL
-A types -m addrtype --src-type UNICAST,LOCAL
-A types -m addrtype ! --dst-type UNICAST
-A types -m addrtype --dst-type ANYCAST
-A types -m addrtype --dst-type ANYCAST,UNREACHABLE --limit-iface-in
-A types -m addrtype --src-type UNSPEC
-A types -m addrtype --src-type UNREACHABLE
-A types -m addrtype ! --src-type UNREACHABLE --limit-iface-in
COMMIT
RULES
	serve fw 25 9 10 11 12
	serve wan 25 9 13
	ask addrtype lan 2001:db8:1::1 9      # fw's own address on the device it came in
	ask addrtype lan 2001:db8:2::1 9      # fw's address on another device
	ask addrtype lan 2001:db8:1:: 9       # fw's subnet-router anycast address
	ask addrtype lan 2001:db8:1::1 10
	ask addrtype lan 2001:db8:2::1 10     # local, but not on the input device
	ask addrtype lan 2001:db8:1::1 11
	ask addrtype lan 2001:db8:2::2 9      # forwarded
	ask addrtype lan 2001:db8:2::2 13
	ask addrtype fw 2001:db8:1::1 12      # fw to itself, over lo
	ask addrtype fw ::1 9
	ask addrtype lan 2001:db8:1::1 9 1 2001:db8:dead::2   # from where fw blackholes
	ask addrtype lan 2001:db8:1::1 9 1 2001:db8:ffff::2   # from where fw has no route
	echo "addrtype multicast: $(ip netns exec lan udp send ff02::1%eth0 9 2)"
	kill $(jobs -p) 2>/dev/null || true
	wait
	listing fw
}

# A new flow from snd: does conntrack make an entry for it?
ct_new_flow() {
	before=$(ct_count)
	ip netns exec snd udp send 2001:db8::2 "$1" 1 >/dev/null
	echo "new flow: conntrack entries +$(( $(ct_count) - before ))"
}

# snd, the client, lets in only what belongs to its own connections.
conntrack_probes() {
	pair
	ip netns exec snd ip6tables-legacy-restore <<'RULES'
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m state --state INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -m conntrack --ctorigsrc 2001:db8::/64 --ctorigdst 2001:db8::1
-A INPUT -m conntrack ! --ctrepldst 2001:db8::1/128
COMMIT
RULES
	serve rcv 15 7
	serve snd 15 22
	echo "reply to an outgoing flow: $(ip netns exec snd udp ask 2001:db8::2 7)"
	# fragmented both ways: conntrack reassembles before the filter hooks
	echo "fragmented reply: $(ip netns exec snd udp ask 2001:db8::2 7 3000)"
	# nothing listens on 6: rcv's port unreachable is RELATED to the flow
	echo "icmp error of an outgoing flow: $(ip netns exec snd udp ask 2001:db8::2 6)"
	echo "tcp out: $(ip netns exec snd udp connect 2001:db8::2 7)"
	echo "tcp in to 22: $(ip netns exec rcv udp connect 2001:db8::1 22)"
	ip netns exec snd udp recv 8 2 >/tmp/unsolicited &
	until grep -qs listening /tmp/unsolicited; do sleep 0.1; done
	ip netns exec rcv udp send 2001:db8::1 8 3 >/dev/null
	wait $!
	echo "unsolicited: $(sed -n 's/received //p' /tmp/unsolicited) received"
	ct_new_flow 5
	kill $(jobs -p) 2>/dev/null || true
	wait
	listing snd
}

phases() {
	say "$1 reject"
	reject_probes
	say "$1 addrtype"
	addrtype_probes
	say "$1 conntrack"
	conntrack_probes
}

# bpfilter's refusals name the rule: show them, whatever ends the script
trap 'say log; dmesg | sed -n "s/^\[ *\([0-9.]*\)\] \(bpfilter: .*\)/\1 \2/p"' EXIT
phases reference
say unload ip6_tables
for ns in snd rcv fw lan wan; do ip netns del $ns; done
for m in ip6table_filter ip6t_REJECT xt_addrtype xt_conntrack xt_state xt_tcpudp ip6_tables; do
	loaded $m && unload $m
done
loaded ip6_tables && echo "ip6_tables: loaded" || echo "ip6_tables: not loaded"
loaded ip_tables && echo "ip_tables: loaded" || echo "ip_tables: not loaded"
depmod -a
modprobe bpfilter
phases bpfilter

say rmmod
# snd's table reads conntrack, rcv's REJECT holds the module, as a rule holds ip6t_REJECT
rmmod bpfilter 2>/dev/null && echo "with REJECT rules: unloaded" || echo "with REJECT rules: in use"
for ns in snd rcv fw; do ip netns exec $ns ip6tables-legacy -F; done
tries=0
# The replaced programs are freed after an RCU grace period.
until rmmod bpfilter 2>/dev/null; do
	tries=$((tries + 1)); [ $tries -lt 50 ] || break
	sleep 0.1
done
loaded bpfilter && echo "bpfilter: loaded" || echo "bpfilter: unloaded"
bpf_objects_freed
[ -e /run/bpfilter-umh ] && echo "helper file: left" || echo "helper file: removed"
[ -e /proc/net/ip6_tables_names ] && echo "ip6_tables_names: left" || echo "ip6_tables_names: removed"
ct_new_flow 4
