# Docker's filter and nat tables for one container (tests/test_kmod.py): the container
# ctr behind the bridge docker0 on the host fw, TCP 8080 and UDP 5353 published to its
# 80 and 53; wan is the outside. Over IPv4, then over IPv6 (daemon.json `"ipv6": true,
# "ip6tables": true`, fixed-cidr-v6 fd00:dead:beef::/64), for which Docker writes the
# same tables with ip6tables. Every probe runs first with the kernel's ip_tables (the
# reference), then, unloaded, with bpfilter.ko: the answers, what the servers see and
# the tables' counters must be the same.
. /etc/bpfilter-vm/lib.sh

namespaces4() {
	bridged ctr docker0 172.17.0.1/16 172.17.0.2/16
	ip -n wan route add default via 10.2.0.1
}

# Static neighbours and no link-local addresses, as lib.sh's IPv6 links.
namespaces6() {
	fresh fw ctr wan
	ip netns exec fw sh -c 'echo 1 >/proc/sys/net/ipv6/conf/all/forwarding'
	ip -n fw link add docker0 address 02:bf:08:00:00:01 type bridge
	ip link add veth0 netns fw type veth peer name eth0 netns ctr address 02:bf:08:00:00:02
	ip -n fw link set veth0 master docker0
	for dev in docker0 veth0; do ip -n fw link set $dev addrgenmode none; done
	ip -n ctr link set eth0 addrgenmode none
	ip -n fw addr add fd00:dead:beef::1/64 dev docker0 nodad
	ip -n ctr addr add fd00:dead:beef::2/64 dev eth0 nodad
	ip -n fw neigh add fd00:dead:beef::2 lladdr 02:bf:08:00:00:02 dev docker0 nud permanent
	ip -n ctr neigh add fd00:dead:beef::1 lladdr 02:bf:08:00:00:01 dev eth0 nud permanent
	for dev in docker0 veth0; do ip -n fw link set $dev up; done
	ip -n ctr link set eth0 up
	link fw vout0 02:bf:08:01:00:01 2001:db8:2::1/64 wan eth0 02:bf:08:01:00:02 2001:db8:2::2/64
	ip -n ctr route add default via fd00:dead:beef::1
	ip -n wan route add default via 2001:db8:2::1
}

# docker_rules CTR SUBNET LOOPBACK TO80 TO53: Docker 27's tables
# (docker-classic-v27.rules' layout) for the one container
docker_rules() {
	cat <<RULES
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER -d $1 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER -d $1 ! -i docker0 -o docker0 -p udp -m udp --dport 53 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d $3 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s $2 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s $1 -d $1 -p tcp -m tcp --dport 80 -j MASQUERADE
-A POSTROUTING -s $1 -d $1 -p udp -m udp --dport 53 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination $4
-A DOCKER ! -i docker0 -p udp -m udp --dport 5353 -j DNAT --to-destination $5
COMMIT
RULES
}

# docker_probes 4|6
docker_probes() {
	if [ "$1" = 6 ]; then
		namespaces6
		command=ip6tables-legacy name=docker6 host=2001:db8:2::1 outside=2001:db8:2::2
		ctr=fd00:dead:beef::2
		rules=$(docker_rules $ctr/128 fd00:dead:beef::/64 ::1/128 "[$ctr]:80" "[$ctr]:53")
	else
		namespaces4
		command=iptables-legacy name=docker host=10.2.0.1 outside=10.2.0.2 ctr=172.17.0.2
		rules=$(docker_rules $ctr/32 172.17.0.0/16 127.0.0.0/8 $ctr:80 $ctr:53)
	fi
	# the interfaces just up send their IGMP and MLD reports at random within a while:
	# let them go before the counters start
	settle
	echo "$rules" | ip netns exec fw $command-restore
	SERVE_PEERS=peers
	serve ctr 25 80 53
	serve wan 25 81
	SERVE_PEERS=
	connect $name wan $host 8080        # published: ctr sees wan's own address
	ask $name wan $host 5353            # published UDP
	ask $name wan $host 5353            # the same flow, translated, not looked up
	connect $name wan $host 8081        # unpublished: the host refuses
	connect $name ctr $outside 81       # the container's own connection, masqueraded
	connect $name fw $host 8080         # the host to its own published port (OUTPUT)
	connect $name ctr $host 8080        # the container to the host's published port
	connect $name wan $ctr 80           # straight to the container: FORWARD drops it
	finish_probes "ctr 80" "ctr 53" "wan 81"
	ip netns exec fw $command -t nat -L -v -n -x
	echo
	ip netns exec fw $command -L -v -n -x
}

phases() {
	say "$1 docker"
	docker_probes 4
	say "$1 docker6"
	docker_probes 6
}

NAMESPACES="fw ctr wan"
reference_then_bpfilter iptable_nat iptable_filter ip6table_nat ip6table_filter xt_nat \
	xt_MASQUERADE xt_addrtype xt_conntrack xt_tcpudp
