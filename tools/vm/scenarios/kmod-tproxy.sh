# Transparent proxying and bridged traffic (tests/test_kmod.py): TPROXY and -m socket
# in mangle PREROUTING, and -m physdev in filter FORWARD of a bridge, IPv4 and IPv6,
# first against ip_tables and ip6_tables (the reference), then against bpfilter.ko;
# the two must say the same.
. /etc/bpfilter-vm/lib.sh

# lan connects through fw to wan's ports 7401 and 7402: fw's mangle PREROUTING hands
# 7401's connections to its own transparent listener on 7400 (TPROXY; the mark routes
# them to fw itself), and a connection's later packets to it (-m socket); 7402 passes
proxy_rules() {
	printf '%s\n' '*mangle' ':PREROUTING ACCEPT [0:0]' ':INPUT ACCEPT [0:0]' \
		':FORWARD ACCEPT [0:0]' ':OUTPUT ACCEPT [0:0]' ':POSTROUTING ACCEPT [0:0]' \
		':DIVERT - [0:0]' \
		'-A PREROUTING -p tcp -m socket --transparent -j DIVERT' \
		'-A PREROUTING -p tcp -m socket --nowildcard' \
		"-A PREROUTING -p tcp --dport 7401 -j TPROXY --on-port 7400 --tproxy-mark 0x1/0x1" \
		'-A DIVERT -p tcp -m socket --restore-skmark' \
		'-A DIVERT -m mark --mark 0x0' \
		'-A DIVERT -j MARK --set-xmark 0x1/0xffffffff' '-A DIVERT -j ACCEPT' COMMIT
}

# proxied FAMILY WAN-ADDR: lan's connections, what fw's listener and wan's server saw
proxied() {
	cmd=iptables-legacy
	[ -z "$1" ] || cmd=ip6tables-legacy
	ip netns exec fw ip $1 rule add fwmark 1 lookup 100
	ip netns exec fw ip $1 route add local default dev lo table 100
	proxy_rules | ip netns exec fw $cmd-restore
	SERVE_PEERS=transparent serve fw 20 7400
	SERVE_PEERS=peers serve wan 20 7402
	connect "proxied" lan $2 7401
	connect "passed" lan $2 7402
	finish_probes "fw 7400" "wan 7402"
	ip netns exec fw $cmd-save -c -t mangle | grep -v '^#'
	echo "TPROXY in FORWARD: $(ip netns exec fw $cmd -t mangle -A FORWARD -p tcp -j TPROXY --on-port 1 2>&1 | head -1)"
	echo "TPROXY without -p: $(ip netns exec fw $cmd -t mangle -A PREROUTING -j TPROXY --on-port 1 2>&1 | head -1)"
	echo "socket in OUTPUT: $(ip netns exec fw $cmd -t mangle -A OUTPUT -m socket 2>&1 | head -1)"
}

# g1 and g2 on fw's bridge br0 (ports p1, p2), both families; fw's FORWARD sees what
# crosses the bridge (br_netfilter, loaded as Docker and admins do, before the bridge
# is made: it hooks the bridges made after it)
bridge_net() {
	modprobe br_netfilter
	ip -n fw link add br0 type bridge
	for g in 1 2; do
		ip link add p$g netns fw address 02:bf:50:00:00:1$g type veth \
			peer name eth0 netns g$g address 02:bf:50:00:00:2$g
		ip -n fw link set p$g master br0
		ip -n fw link set p$g addrgenmode none
		ip -n fw link set p$g up
		ip -n g$g link set eth0 addrgenmode none
		ip -n g$g addr add 10.5.0.$g/24 dev eth0
		ip -n g$g addr add fd05::$g/64 dev eth0 nodad
		ip -n g$g link set eth0 up
	done
	for g in 1 2; do
		other=$((3 - g))
		ip -n g$g neigh add 10.5.0.$other lladdr 02:bf:50:00:00:2$other dev eth0 nud permanent
		ip -n g$g neigh add fd05::$other lladdr 02:bf:50:00:00:2$other dev eth0 nud permanent
	done
	ip -n fw link set br0 addrgenmode none
	ip -n fw link set br0 up
	settle
}

bridge_rules() {
	printf '%s\n' '*filter' ':INPUT ACCEPT [0:0]' ':FORWARD ACCEPT [0:0]' ':OUTPUT ACCEPT [0:0]' \
		'-A FORWARD -p udp --dport 7501 -m physdev --physdev-in p1 --physdev-out p2 -j DROP' \
		'-A FORWARD -m physdev --physdev-in p2 --physdev-is-bridged' \
		'-A FORWARD -m physdev ! --physdev-is-bridged' \
		'-A FORWARD -m physdev --physdev-is-in --physdev-is-out' \
		'-A FORWARD -m physdev --physdev-out p+' COMMIT
}

bridged_probes() {
	fresh fw g1 g2
	bridge_rules | ip netns exec fw iptables-legacy-restore
	bridge_rules | ip netns exec fw ip6tables-legacy-restore
	bridge_net
	serve g2 20 7500 7501
	for addr in 10.5.0.2 fd05::2; do
		ask "bridged" g1 $addr 7500
		ask "bridged" g1 $addr 7501
	done
	finish_probes
	ip netns exec fw iptables-legacy-save -c -t filter | grep -v '^#'
	ip netns exec fw ip6tables-legacy-save -c -t filter | grep -v '^#'
	echo "physdev-out in OUTPUT: $(ip netns exec fw iptables-legacy -A OUTPUT -m physdev --physdev-out p1 2>&1 | head -1)"
}

phases() {
	say "$1 tproxy"
	router4
	proxied "" 10.2.0.2
	router
	proxied -6 2001:db8:2::2
	say "$1 physdev"
	bridged_probes
}

NAMESPACES="fw lan wan g1 g2"
reference_then_bpfilter iptable_mangle iptable_filter ip6table_mangle ip6table_filter
say done
