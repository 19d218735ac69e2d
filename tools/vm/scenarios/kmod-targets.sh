# What bpfilter.ko adds to the helper's BPF (tests/test_kmod.py): connection tracking
# switched on per namespace, and REJECT's answers sent by the kernel's own
# nf_send_reset()/nf_send_unreach() through the module's kfuncs. The same probes run
# first against the kernel's ip_tables (the reference), then, ip_tables unloaded,
# against bpfilter.ko; their answers and counters must be the same. Needs bpfilter.ko
# in /lib/modules/$(uname -r)/extra and the shared libraries of a Debian system.
. /etc/bpfilter-vm/lib.sh
# Fresh namespaces for each phase: no conntrack entry survives from the previous one.
namespaces() {
	for ns in snd rcv; do ip netns del $ns 2>/dev/null || true; ip netns add $ns; done
	ip link add veth0 netns snd type veth peer name veth1 netns rcv
	ip -n snd addr add 198.18.0.1/24 dev veth0
	ip -n rcv addr add 198.18.0.2/24 dev veth1
	for ns in snd rcv; do ip -n $ns link set lo up; done
	ip -n snd link set veth0 up
	ip -n rcv link set veth1 up
}
# A new flow from snd: does conntrack make an entry for it?
ct_new_flow() {
	before=$(ct_count)
	ip netns exec snd udp send 198.18.0.2 "$1" 1 >/dev/null
	echo "new flow: conntrack entries +$(( $(ct_count) - before ))"
}

# snd, the client, lets in only what belongs to its own connections.
conntrack_probes() {
	ip netns exec snd iptables-legacy-restore <<'RULES'
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
RULES
	serve rcv 4 7
	echo "reply to an outgoing flow: $(ip netns exec snd udp ask 198.18.0.2 7)"
	# nothing listens on 6: rcv's port unreachable is RELATED to the flow
	echo "icmp error of an outgoing flow: $(ip netns exec snd udp ask 198.18.0.2 6)"
	ip netns exec snd udp recv 8 2 >/tmp/unsolicited &
	until grep -q listening /tmp/unsolicited; do sleep 0.1; done
	ip netns exec rcv udp send 198.18.0.1 8 3 >/dev/null
	wait
	echo "unsolicited: $(sed -n 's/received //p' /tmp/unsolicited) received"
	ct_new_flow 5
	ip netns exec snd iptables-legacy -L INPUT -v -n -x
}

# rcv answers for the firewall: REJECT, each way (once from a user chain), beside a
# DROP and an open port.
reject_probes() {
	ip netns exec rcv iptables-legacy-restore <<'RULES'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:reject_net - [0:0]
-A INPUT -p udp -m udp --dport 9 -j REJECT
-A INPUT -p udp -m udp --dport 14 -j reject_net
-A INPUT -p udp -m udp --dport 10 -j REJECT --reject-with icmp-host-prohibited
-A INPUT -p tcp -m tcp --dport 9 -j REJECT --reject-with tcp-reset
-A INPUT -p udp -m udp --dport 11 -j DROP
-A OUTPUT -p udp -m udp --dport 12 -j REJECT --reject-with icmp-admin-prohibited
-A reject_net -j REJECT --reject-with icmp-net-prohibited
COMMIT
RULES
	serve rcv 11 9 10 11 13 14
	serve snd 11 12
	for port in 9 10 11 13 14; do
		echo "udp $port: $(ip netns exec snd udp ask 198.18.0.2 $port)"
	done
	for port in 9 13; do
		echo "tcp $port: $(ip netns exec snd udp connect 198.18.0.2 $port)"
	done
	echo "udp 12 from rcv: $(ip netns exec rcv udp ask 198.18.0.1 12)"
	wait
	ip netns exec rcv iptables-legacy -L -v -n -x
}

say reference conntrack
namespaces
conntrack_probes
say reference reject
reject_probes
say unload ip_tables
ip netns del snd
ip netns del rcv
for m in iptable_filter ipt_REJECT xt_conntrack xt_tcpudp ip_tables; do
	loaded $m && unload $m
done
loaded ip_tables && echo "ip_tables: loaded" || echo "ip_tables: not loaded"

say bpfilter conntrack
depmod -a
modprobe bpfilter
echo "nf_conntrack used by: $(sed -n 's/^nf_conntrack [0-9]* [0-9]* \([^ ]*\).*/\1/p' /proc/modules)"
namespaces
conntrack_probes
kill -9 "$(helper_pid)"
echo "helper killed"
serve rcv 3 7
echo "reply to an outgoing flow: $(ip netns exec snd udp ask 198.18.0.2 7)"
wait

say bpfilter reject
reject_probes

say rmmod
# A program calling a module's kfunc holds the module, as a rule holds ipt_REJECT.
rmmod bpfilter 2>/dev/null && echo "with REJECT rules: unloaded" || echo "with REJECT rules: in use"
ip netns exec rcv iptables-legacy -F
tries=0
# The replaced programs are freed after an RCU grace period.
until rmmod bpfilter 2>/dev/null; do
	tries=$((tries + 1)); [ $tries -lt 50 ] || break
	sleep 0.1
done
loaded bpfilter || echo "bpfilter: unloaded"
ct_new_flow 4

say log
dmesg | sed -n 's/^\[ *\([0-9.]*\)\] \(bpfilter: .*\)/\1 \2/p'
