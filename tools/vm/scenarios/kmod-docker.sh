# Docker's filter and nat tables for one container (tests/test_kmod.py): the container
# ctr behind the bridge docker0 on the host fw, TCP 8080 and UDP 5353 published to its
# 80 and 53; wan is the outside. Over IPv4, then over IPv6 (ip6tables' tables). Every probe runs first with the kernel's ip_tables
# (the reference), then, unloaded, with bpfilter.ko: the answers, what the servers see
# and the tables' counters must be the same.
. /etc/bpfilter-vm/lib.sh

namespaces() {
	for ns in fw ctr wan; do ip netns del $ns 2>/dev/null || true; ip netns add $ns; done
	ip -n fw link add docker0 type bridge
	ip -n fw addr add 172.17.0.1/16 dev docker0
	ip link add veth0 netns fw type veth peer name eth0 netns ctr
	ip -n fw link set veth0 master docker0
	ip link add vout0 netns fw type veth peer name eth0 netns wan
	ip -n fw addr add 10.2.0.1/24 dev vout0
	ip -n ctr addr add 172.17.0.2/16 dev eth0
	ip -n wan addr add 10.2.0.2/24 dev eth0
	for ns in fw ctr wan; do ip -n $ns link set lo up; done
	for dev in docker0 veth0 vout0; do ip -n fw link set $dev up; done
	for ns in ctr wan; do ip -n $ns link set eth0 up; done
	ip -n ctr route add default via 172.17.0.1
	ip -n wan route add default via 10.2.0.1
	ip netns exec fw sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
}

docker_probes() {
	namespaces
	# the interfaces just up send their IGMP reports at random within a while: let them
	# go before the counters start
	settle
	# Docker 27's tables (docker-classic-v27.rules' layout) for this one container
	ip netns exec fw iptables-legacy-restore <<'RULES'
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
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p udp -m udp --dport 53 -j ACCEPT
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
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p udp -m udp --dport 53 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER ! -i docker0 -p udp -m udp --dport 5353 -j DNAT --to-destination 172.17.0.2:53
COMMIT
RULES
	SERVE_PEERS=peers
	serve ctr 25 80 53
	serve wan 25 81
	SERVE_PEERS=
	connect docker wan 10.2.0.1 8080        # published: ctr sees wan's own address
	ask docker wan 10.2.0.1 5353            # published UDP
	ask docker wan 10.2.0.1 5353            # the same flow, translated, not looked up
	connect docker wan 10.2.0.1 8081        # unpublished: the host refuses
	connect docker ctr 10.2.0.2 81          # the container's own connection, masqueraded
	connect docker fw 10.2.0.1 8080         # the host to its own published port (OUTPUT)
	connect docker ctr 10.2.0.1 8080        # the container to the host's published port
	connect docker wan 172.17.0.2 80        # straight to the container: FORWARD drops it
	kill $(jobs -p) 2>/dev/null || true
	wait
	peers ctr 80
	peers ctr 53
	peers wan 81
	ip netns exec fw iptables-legacy -t nat -L -v -n -x
	echo
	ip netns exec fw iptables-legacy -L -v -n -x
}

# The same container with IPv6 (daemon.json `"ipv6": true, "ip6tables": true`,
# fixed-cidr-v6 fd00:dead:beef::/64): Docker writes the same tables with ip6tables.
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
	settle
}

docker6_probes() {
	namespaces6
	ip netns exec fw ip6tables-legacy-restore <<'RULES'
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
-A DOCKER -d fd00:dead:beef::2/128 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER -d fd00:dead:beef::2/128 ! -i docker0 -o docker0 -p udp -m udp --dport 53 -j ACCEPT
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
-A OUTPUT ! -d ::1/128 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s fd00:dead:beef::/64 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s fd00:dead:beef::2/128 -d fd00:dead:beef::2/128 -p tcp -m tcp --dport 80 -j MASQUERADE
-A POSTROUTING -s fd00:dead:beef::2/128 -d fd00:dead:beef::2/128 -p udp -m udp --dport 53 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:dead:beef::2]:80
-A DOCKER ! -i docker0 -p udp -m udp --dport 5353 -j DNAT --to-destination [fd00:dead:beef::2]:53
COMMIT
RULES
	SERVE_PEERS=peers
	serve ctr 25 80 53
	serve wan 25 81
	SERVE_PEERS=
	connect docker6 wan 2001:db8:2::1 8080        # published: ctr sees wan's own address
	ask docker6 wan 2001:db8:2::1 5353            # published UDP
	ask docker6 wan 2001:db8:2::1 5353            # the same flow, translated, not looked up
	connect docker6 wan 2001:db8:2::1 8081        # unpublished: the host refuses
	connect docker6 ctr 2001:db8:2::2 81          # the container's own connection, masqueraded
	connect docker6 fw 2001:db8:2::1 8080         # the host to its own published port (OUTPUT)
	connect docker6 ctr 2001:db8:2::1 8080        # the container to the host's published port
	connect docker6 wan fd00:dead:beef::2 80      # straight to the container: FORWARD drops it
	kill $(jobs -p) 2>/dev/null || true
	wait
	peers ctr 80
	peers ctr 53
	peers wan 81
	ip netns exec fw ip6tables-legacy -t nat -L -v -n -x
	echo
	ip netns exec fw ip6tables-legacy -L -v -n -x
}

phases() {
	say "$1 docker"
	docker_probes
	say "$1 docker6"
	docker6_probes
}

NAMESPACES="fw ctr wan"
reference_then_bpfilter iptable_nat iptable_filter ip6table_nat ip6table_filter xt_nat \
	xt_MASQUERADE xt_addrtype xt_conntrack xt_tcpudp
