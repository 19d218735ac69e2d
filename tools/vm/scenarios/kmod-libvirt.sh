# libvirt's default network (tests/test_kmod.py): the filter and nat tables libvirtd
# writes for virbr0, 192.168.122.0/24 (tests/realworld/nat/libvirt-nat-network.rules;
# its mangle table is not bpfilter's yet), on the host fw, a guest vm behind the bridge,
# wan outside. Every probe runs first with the kernel's ip_tables (the reference), then,
# unloaded, with bpfilter.ko: the answers, what the servers see and the tables'
# counters must be the same.
. /etc/bpfilter-vm/lib.sh

namespaces() {
	bridged vm virbr0 192.168.122.1/24 192.168.122.2/24
	ip -n wan route add 192.168.122.0/24 via 10.2.0.1
	ip -n fw route add default via 10.2.0.2
}

libvirt_probes() {
	namespaces
	# the interfaces just up send their IGMP reports at random within a while: let them
	# go before the counters start
	settle
	awk '/^\*/ { keep = ($0 == "*nat" || $0 == "*filter") } keep' \
		/etc/bpfilter-vm/libvirt-nat-network.rules | ip netns exec fw iptables-legacy-restore
	SERVE_PEERS=peers
	serve wan 25 80 53
	serve fw 25 53
	SERVE_PEERS=
	connect libvirt vm 10.2.0.2 80              # the guest's connection, masqueraded
	ask libvirt vm 10.2.0.2 53                  # and its datagram
	ask libvirt vm 10.2.0.2 53                  # the same flow: translated, not looked up
	ask libvirt vm 192.168.122.1 53             # the host's DNS on the bridge (INPUT)
	connect libvirt wan 192.168.122.2 80        # into the network from outside: refused
	ask libvirt wan 192.168.122.2 53            # likewise
	# the host's own multicast from its bridge address leaves unmasqueraded (RETURN)
	ask libvirt fw 224.0.0.251 5353 1 192.168.122.1
	finish_probes "wan 80" "wan 53" "fw 53"
	ip netns exec fw iptables-legacy -t nat -L -v -n -x
	echo
	ip netns exec fw iptables-legacy -L -v -n -x
}

phases() {
	say "$1 libvirt"
	libvirt_probes
}

NAMESPACES="fw vm wan"
reference_then_bpfilter iptable_nat iptable_filter xt_nat xt_MASQUERADE xt_conntrack \
	xt_tcpudp ipt_REJECT
