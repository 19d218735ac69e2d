# Real rulesets (tests/realworld/fail2ban.rules, ufw.rules, firewalld.ip6.rules and
# ufw.ip6.rules, in /etc/bpfilter-vm/) and addrtype's own probes through bpfilter.ko
# (tests/test_kmod.py): the same probes run first against the kernel's ip_tables and
# ip6_tables (the reference), then, both unloaded, against bpfilter.ko; answers and
# `-L -v` counters must be the same.
#
# fw is the firewall host the rulesets are written for: its vin0 faces lan
# (10.1.0.0/24, 2001:db8:1::/64), its vout0 wan (10.2.0.0/24, 2001:db8:2::/64), and it
# routes between them. The IPv6 phases build them with lib.sh's router.
. /etc/bpfilter-vm/lib.sh

# Fresh namespaces for each ruleset: no conntrack entry, no limit credit carried over.
namespaces() {
	for ns in fw lan wan; do ip netns del $ns 2>/dev/null || true; ip netns add $ns; done
	ip link add vin0 netns fw type veth peer name eth0 netns lan
	ip link add vout0 netns fw type veth peer name eth0 netns wan
	ip -n fw addr add 10.1.0.1/24 brd + dev vin0
	ip -n fw addr add 10.2.0.1/24 brd + dev vout0
	ip -n lan addr add 10.1.0.2/24 brd + dev eth0
	ip -n wan addr add 10.2.0.2/24 brd + dev eth0
	for ns in fw lan wan; do ip -n $ns link set lo up; done
	ip -n fw link set vin0 up
	ip -n fw link set vout0 up
	ip -n lan link set eth0 up
	ip -n wan link set eth0 up
	ip -n lan route add default via 10.1.0.1
	ip -n wan route add default via 10.2.0.1
	ip netns exec fw sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
}
ping1() { ip netns exec $2 ping -c 1 -W 1 $3 >/dev/null 2>&1 && echo "$1 ping $3: answered" || echo "$1 ping $3: no answer"; }
solicit() { echo "$1 solicit $3 hop limit $4: $(ip netns exec $2 udp solicit $3 $4)"; }
# listing [ip6tables]: fw's filter table
listing() { ip netns exec fw ${1:-iptables}-legacy -L -v -n -x; }

# addrtype alone: each kind of address, inverted, and limited to the input device.
addrtype_probes() {
	namespaces
	ip netns exec fw iptables-legacy-restore <<'RULES'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:types - [0:0]
-A INPUT -p udp -m udp --dport 9 -j types
-A INPUT -m addrtype --dst-type BROADCAST -j DROP
-A INPUT -p udp -m udp --dport 10 -m addrtype --src-type UNICAST --dst-type LOCAL --limit-iface-in -j DROP
-A INPUT -p udp -m udp --dport 11 -m addrtype ! --src-type UNICAST -j DROP
-A FORWARD -p udp -m addrtype --dst-type UNICAST --limit-iface-out -j ACCEPT
-A FORWARD -m addrtype ! --dst-type LOCAL,BROADCAST -j DROP
-A OUTPUT -p udp -m udp --dport 12 -m addrtype --dst-type LOCAL -j DROP
-A types -m addrtype --dst-type LOCAL
-A types -m addrtype --dst-type LOCAL --limit-iface-in
-A types -m addrtype --src-type LOCAL
-A types -m addrtype --src-type UNICAST,LOCAL
-A types -m addrtype ! --dst-type UNICAST
COMMIT
RULES
	serve fw 15 9 10 11 12
	serve wan 15 9 13
	ask addrtype lan 10.1.0.1 9       # to fw's own address on the device it came in
	ask addrtype lan 10.2.0.1 9       # fw's address on another device: local, not on vin0
	ask addrtype lan 10.1.0.1 10
	ask addrtype lan 10.1.0.1 11
	ask addrtype lan 10.2.0.2 9       # forwarded
	ask addrtype lan 10.2.0.2 13
	ask addrtype fw 10.1.0.1 12       # fw to itself, over lo
	ask addrtype fw 127.0.0.1 9
	echo "addrtype broadcast: $(ip netns exec lan udp send 10.1.0.255 9 2)"
	echo "addrtype limited broadcast: $(ip netns exec lan udp send 255.255.255.255 9 3)"
	wait
	listing
}

# fail2ban's server: ssh and a few services open, REJECT for the rest and for banned nets.
fail2ban_probes() {
	namespaces
	ip netns exec fw iptables-legacy-restore </etc/bpfilter-vm/fail2ban.rules
	serve fw 20 22 25 80 7100 8080
	serve lan 20 80 53
	connect fail2ban lan 10.1.0.1 22
	connect fail2ban lan 10.1.0.1 80
	connect fail2ban wan 10.2.0.1 22
	connect fail2ban wan 10.2.0.1 25
	connect fail2ban wan 10.2.0.1 8080
	ask fail2ban lan 10.1.0.1 7100
	ask fail2ban wan 10.2.0.1 8080
	ping1 fail2ban wan 10.2.0.1
	# fw's own flows out through vout0: the replies are ESTABLISHED
	serve wan 8 53
	ask fail2ban fw 10.2.0.2 53
	# forwarded: lan to wan freely, wan to lan only http
	ask fail2ban lan 10.2.0.2 53
	connect fail2ban wan 10.1.0.2 80
	ask fail2ban wan 10.1.0.2 53
	wait
	listing
}

# ufw's server: ssh open, the rest dropped (and logged), broadcasts dropped quietly.
ufw_probes() {
	namespaces
	ip netns exec fw iptables-legacy-restore </etc/bpfilter-vm/ufw.rules
	serve fw 25 22 80 137 9999
	serve wan 25 53
	connect ufw lan 10.1.0.1 22
	ask ufw lan 10.1.0.1 22
	connect ufw wan 10.2.0.1 80
	ask ufw wan 10.2.0.1 137
	ping1 ufw wan 10.2.0.1
	ask ufw fw 10.2.0.2 53            # fw's own flow: NEW out, ESTABLISHED back in
	ask ufw fw 10.1.0.1 9999          # over lo
	ask ufw lan 10.2.0.2 53           # FORWARD: dropped
	echo "ufw broadcast: $(ip netns exec lan udp send 10.1.0.255 9999 2)"
	echo "ufw limited broadcast: $(ip netns exec lan udp send 255.255.255.255 9999 3)"
	wait
	listing
}

# firewalld's workstation zone: ssh and the high ports open, all ICMPv6 in, the rest
# rejected (icmp6-adm-prohibited); forwarded only ICMPv6 and replies.
firewalld6_probes() {
	router
	ip netns exec fw ip6tables-legacy-restore </etc/bpfilter-vm/firewalld.ip6.rules
	serve fw 40 22 80 53 9999
	serve wan 40 53
	connect firewalld6 lan 2001:db8:1::1 22
	connect firewalld6 lan 2001:db8:1::1 80
	ask firewalld6 lan 2001:db8:1::1 53
	ask firewalld6 lan 2001:db8:1::1 9999
	connect firewalld6 wan 2001:db8:2::1 22    # from vout0: the default zone
	ping1 firewalld6 lan 2001:db8:1::1
	solicit firewalld6 lan 2001:db8:1::1 255
	ask firewalld6 fw 2001:db8:2::2 53         # fw's own flow: the reply is ESTABLISHED
	ask firewalld6 lan 2001:db8:2::2 53        # forwarded: rejected
	ping1 firewalld6 lan 2001:db8:2::2
	kill $(jobs -p) 2>/dev/null || true
	wait
	listing ip6tables
}

# ufw's: ssh, web and PostgreSQL open, ICMPv6 echo in and through, neighbour discovery
# only with a hop limit of 255, the rest dropped (and logged).
ufw6_probes() {
	router
	ip netns exec fw ip6tables-legacy-restore </etc/bpfilter-vm/ufw.ip6.rules
	serve fw 40 22 443 5432 25 137 9999
	serve wan 40 53
	connect ufw6 lan 2001:db8:1::1 22
	connect ufw6 lan 2001:db8:1::1 443
	connect ufw6 wan 2001:db8:2::1 5432
	connect ufw6 wan 2001:db8:2::1 25
	ask ufw6 lan 2001:db8:1::1 137
	ask ufw6 lan 2001:db8:1::1 9999
	ping1 ufw6 lan 2001:db8:1::1
	solicit ufw6 lan 2001:db8:1::1 255
	solicit ufw6 lan 2001:db8:1::1 64
	ask ufw6 fw 2001:db8:2::2 53               # fw's own flow: NEW out, ESTABLISHED back in
	ask ufw6 fw 2001:db8:1::1 9999             # over lo
	ask ufw6 lan 2001:db8:2::2 53              # FORWARD: dropped
	ping1 ufw6 lan 2001:db8:2::2
	kill $(jobs -p) 2>/dev/null || true
	wait
	listing ip6tables
}

# /etc/bpfilter-vm/phases, if given, names the rulesets to run (default: all)
phases() {
	for ruleset in $(cat /etc/bpfilter-vm/phases 2>/dev/null ||
			echo addrtype fail2ban ufw firewalld6 ufw6); do
		say "$1 $ruleset"
		${ruleset}_probes
	done
}

reference_then_bpfilter iptable_filter ip6table_filter ipt_REJECT ip6t_REJECT ip6t_rt \
	xt_addrtype xt_conntrack xt_state xt_multiport xt_limit xt_hl xt_comment xt_LOG \
	nf_log_syslog xt_tcpudp
