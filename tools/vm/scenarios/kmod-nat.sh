# The nat table through bpfilter.ko (tests/test_kmod.py): the same connections through
# fw, first with the kernel's ip_tables (the reference), then, unloaded, with
# bpfilter.ko; what the servers see (the addresses NAT made), what the clients get,
# and the nat table's counters must be the same.
# fw routes between lan and wan (lib.sh's router4).
. /etc/bpfilter-vm/lib.sh

nat_probes() {
	router4
	ip netns exec fw iptables-legacy-restore <<'RULES'
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PUBLISH - [0:0]
:MARK-MASQ - [0:0]
-A PREROUTING -d 10.1.0.1/32 -j PUBLISH
-A PREROUTING -d 10.3.0.0/24 -j NETMAP --to 10.2.0.0/24
-A PUBLISH -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.2.0.2:80
-A PUBLISH -p udp -m udp --dport 5353 -j MARK-MASQ
-A PUBLISH -p udp -m udp --dport 5353 -j DNAT --to-destination 10.2.0.2:53
-A PUBLISH -p tcp -m tcp --dport 2222 -j REDIRECT --to-ports 22
-A MARK-MASQ -j MARK --or-mark 0x4000
-A OUTPUT -d 10.9.9.9/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.2.0.2:80
-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
-A POSTROUTING -s 10.1.0.2/32 -o vout0 -p tcp -m tcp --dport 82 -j SNAT --to-source 10.2.0.1
-A POSTROUTING -o vout0 -p tcp -m tcp --dport 80 ! -s 10.1.0.0/24 -j MASQUERADE --to-ports 40000-40100
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -j CONNMARK --restore-mark --mask 0xff
-A FORWARD -p tcp -m mark --mark 0x5/0xff
-A FORWARD -p tcp -m tcp --dport 81 -m connmark --mark 0x0/0xff -j CONNMARK --set-xmark 0x5/0xff
-A FORWARD -m connmark --mark 0x5/0xff
-A FORWARD -p udp -m connmark ! --mark 0x5/0xff
-A FORWARD -p udp -j MARK --set-xmark 0x30/0xf0
-A FORWARD -p udp -j CONNMARK --save-mark --nfmask 0xf0 --ctmask 0xf0
-A FORWARD -p udp -m connmark --mark 0x30/0xf0
-A FORWARD -j CONNMARK --set-mark 0x100/0x100 --left-shift-mark 1
COMMIT
RULES
	SERVE_PEERS=peers
	serve wan 25 80 81 82 53 54
	serve fw 25 22
	SERVE_PEERS=
	connect nat lan 10.1.0.1 8080          # DNAT: wan sees lan's own address
	ask nat lan 10.1.0.1 5353              # marked, DNAT, masqueraded by the mark
	ask nat lan 10.1.0.1 5353              # the same connection: translated, not looked up
	connect nat lan 10.2.0.2 81            # through, untranslated
	connect nat lan 10.2.0.2 82            # SNAT
	connect nat lan 10.1.0.1 2222          # REDIRECT to fw's own 22
	ask nat lan 10.3.0.2 54                # NETMAP
	connect nat fw 10.9.9.9 80             # fw's own connection: OUTPUT DNAT, then MASQUERADE
	connect nat lan 10.1.0.1 8081          # nothing published there: fw itself refuses
	wait
	for port in 80 81 82 53 54; do peers wan $port; done
	peers fw 22
	ip netns exec fw iptables-legacy -t nat -L -v -n -x
	echo
	ip netns exec fw iptables-legacy -L FORWARD -v -n -x
}

# The same through ip6tables' nat table, on lib.sh's IPv6 router (2001:db8:1::/64 on
# lan's side, 2001:db8:2::/64 on wan's).
nat6_probes() {
	router
	ip netns exec fw ip6tables-legacy-restore <<'RULES'
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 2001:db8:1::1/128 -p tcp -m tcp --dport 8080 -j DNAT --to-destination [2001:db8:2::2]:80
-A PREROUTING -d 2001:db8:1::1/128 -p udp -m udp --dport 5353 -j DNAT --to-destination [2001:db8:2::2]:53
-A PREROUTING -d 2001:db8:1::1/128 -p tcp -m tcp --dport 2222 -j REDIRECT --to-ports 22
-A PREROUTING -d 2001:db8:3::/64 -j NETMAP --to 2001:db8:2::/64
-A POSTROUTING -o vout0 -p udp -j MASQUERADE
-A POSTROUTING -o vout0 -p tcp -m tcp --dport 82 -j SNAT --to-source 2001:db8:2::1
COMMIT
RULES
	SERVE_PEERS=peers
	serve wan 25 80 81 82 53 54
	serve fw 25 22
	SERVE_PEERS=
	connect nat6 lan 2001:db8:1::1 8080      # DNAT
	ask nat6 lan 2001:db8:1::1 5353          # DNAT, then MASQUERADE
	connect nat6 lan 2001:db8:2::2 81        # through, untranslated
	connect nat6 lan 2001:db8:2::2 82        # SNAT
	connect nat6 lan 2001:db8:1::1 2222      # REDIRECT
	ask nat6 lan 2001:db8:3::2 54            # NETMAP
	kill $(jobs -p) 2>/dev/null || true
	wait
	for port in 80 81 82 53 54; do peers wan $port; done
	peers fw 22
	ip netns exec fw ip6tables-legacy -t nat -L -v -n -x
}

# kube_probes 4|6: kube-proxy's filter and nat tables (tools/bench/kubeproxy.py's,
# KUBE_SERVICES Services; for 6, ip6tables' of an IPv6 cluster) on fw as a node: lan
# connects to the last Service's ClusterIP and to its NodePort on fw, fw itself to the
# ClusterIP; wan holds the Service's two endpoints. Every connection is masqueraded
# (none comes from the pods' network). lan also connects to the Service before it,
# whose session affinity keeps lan on one endpoint, remembered in the kernel's recent
# lists (one per endpoint).
kube_probes() {
	if [ "$1" = 6 ]; then
		kube6_node
		command=ip6tables-legacy rules=/etc/bpfilter-vm/kube-proxy6.rules
		vips='fd00:30::[0-9a-f]*' node=2001:db8:1::1 tag=6
	else
		kube_node
		command=iptables-legacy rules=/etc/bpfilter-vm/kube-proxy.rules
		vips='172\.30\.[0-9.]*' node=10.1.0.1 tag=
	fi
	ip netns exec fw $command-restore $rules
	SERVE_PEERS=peers
	serve wan 60 8080
	SERVE_PEERS=
	vip=$(sed -n "s/.*-d \($vips\) --dport 80 -j KUBE-SVC.*/\1/p" $rules | tail -1)
	affine=$(sed -n "s/.*-d \($vips\) --dport 80 -j KUBE-SVC.*/\1/p" $rules | tail -2 | head -1)
	for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do connect kube$tag lan "$vip" 80; done
	for i in 1 2 3 4 5 6 7 8; do connect kube$tag lan $node 32000; done
	connect kube$tag fw "$vip" 80
	connect kube$tag lan $node 32001             # no such NodePort: fw refuses
	for i in 1 2 3 4 5 6 7 8; do connect affine$tag lan "$affine" 80; done
	kill $(jobs -p) 2>/dev/null || true
	wait
	peers wan 8080 | sort | uniq -c
	for list in $(ip netns exec fw ls /proc/net/xt_recent); do
		echo "recent $list: $(ip netns exec fw sed 's/ ttl:.*//' /proc/net/xt_recent/$list | tr '\n' ' ')"
	done
	ip netns exec fw $command -t nat -L -v -n -x
	ip netns exec fw $command -L -v -n -x
}

# Real rulesets with a nat table (../shared/realworld, in /etc/bpfilter-vm/): their
# filter and nat tables (the others are not bpfilter's yet) restored in a namespace
# of their own, and saved back with the counters.
realworld_loads() {
	for name in docker-classic-v27 docker-current-usernet-portmap docker-current-swarm-portmap \
		libvirt-nat-network; do
		ip netns del rw 2>/dev/null || true
		ip netns add rw
		awk '/^\*/ { keep = ($0 == "*nat" || $0 == "*filter") } keep' \
			"/etc/bpfilter-vm/$name.rules" | ip netns exec rw iptables-legacy-restore
		echo "$name: restored"
		for table in nat filter; do
			ip netns exec rw iptables-legacy-save -c -t $table | grep -v '^#'
		done
	done
	ip netns del rw
}

phases() {
	say "$1 nat"
	nat_probes
	say "$1 nat6"
	nat6_probes
	say "$1 realworld"
	realworld_loads
	say "$1 kube"
	kube_probes 4
	say "$1 kube6"
	kube_probes 6
}

reference_then_bpfilter iptable_nat iptable_filter ip6table_nat ip6table_filter xt_nat \
	xt_MASQUERADE xt_REDIRECT xt_NETMAP xt_mark xt_connmark xt_recent xt_tcpudp

say helper death
# The bindings are the kernel's and the lookups the module's: a dead helper takes
# neither with it. A new connection is still bound by the chains, and the next
# command's helper recovers the table, its counters included.
nat_probes >/dev/null
SERVE_PEERS=peers
serve wan 20 80
SERVE_PEERS=
pid=$(helper_pid)
kill -9 "$pid"
while [ -d "/proc/$pid" ]; do sleep 0.1; done
echo "helper killed"
connect after-death lan 10.1.0.1 8080
wait
peers wan 80
ip netns exec fw iptables-legacy -t nat -L PUBLISH -v -n -x
[ "$(helper_pid)" != "$pid" ] && echo "helper: a new one serves"
say objects
bpf_objects
