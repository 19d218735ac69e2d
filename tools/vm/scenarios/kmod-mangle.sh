# The mangle and raw tables through bpfilter.ko (tests/test_kmod.py), first with the
# kernel's ip_tables and ip6_tables (the reference), then, unloaded, with bpfilter.ko:
# what a router's and a host's mangle and raw rules do to real traffic between
# namespaces, seen where it arrives.
#
#   cli --- fw ===== srv     fw routes cli's traffic to srv's service address
#                            (198.18.9.9, fd09::9) over uplink 1 (vout1) or, for
#                            packets marked 1, uplink 2 (vout2: `ip rule fwmark`)
#
# A mark chosen in mangle PREROUTING picks the uplink; CONNMARK keeps a connection's
# later packets on it; fw's own datagrams marked in mangle OUTPUT (in a user chain,
# which accepts them) are routed again (ip_route_me_harder()); TTL/HL, DSCP and TOS rewrites are seen by srv's socket, a
# clamped MSS in the SYN srv accepts; NOTRACK makes datagrams UNTRACKED in filter and
# leaves no conntrack entry; the kernel's own matches (dscp, tos, ttl after TTL, tcpmss,
# connbytes, helper) count what they see; HMARK's mark (its hash, modulo 1, plus 1)
# picks uplink 2 and the next rule's -m mark sees it; TEE's rule loads (its traffic is
# not probed here: the server's answers to the copy race the counters); rpfilter drops what comes from an address
# with no route back; cluster's hash splits two nodes' share of a flow and CONNSECMARK
# copies (an unset) security mark; IPv6's SNPT hands srv a datagram from cli's
# prefix translated (fd01::/64 to fd0a::/64) whose answer DNPT translates back;
# refusals are the kernel's. Each phase then gives every table's counters
# (iptables-save -c). Last, SYNPROXY answers cli's untracked SYN with a cookie and
# opens the connection to srv on cli's ACK (fw's nf_conntrack_tcp_loose off, as its
# recipe has it, so that the ACK is INVALID rather than picked up).
. /etc/bpfilter-vm/lib.sh

SVC4=198.18.9.9 SVC6=fd09::9

uplinks() {
	fresh cli fw srv
	# static neighbours, IPv6 (lib.sh's link) and IPv4 on the uplinks: an ARP probe of a
	# stale entry, due whenever its timer says, would be counted as arriving (arrived)
	link fw vin0 02:bf:0a:01:00:01 fd01::1/64 cli eth0 02:bf:0a:01:00:02 fd01::2/64
	link fw vout1 02:bf:0a:02:00:01 fd02::1/64 srv eth1 02:bf:0a:02:00:02 fd02::2/64
	link fw vout2 02:bf:0a:03:00:01 fd03::1/64 srv eth2 02:bf:0a:03:00:02 fd03::2/64
	ip -n fw addr add 198.18.1.1/24 dev vin0
	ip -n fw addr add 198.18.2.1/24 dev vout1
	ip -n fw addr add 198.18.3.1/24 dev vout2
	ip -n cli addr add 198.18.1.2/24 dev eth0
	# more sources, for cluster's hash
	for host in 3 4 5 6; do
		ip -n cli addr add 198.18.1.$host/24 dev eth0
		ip -n cli addr add fd01::$host/64 dev eth0 nodad preferred_lft 0
	done
	# addresses fw has no route back to (rpfilter)
	ip -n cli addr add 198.18.7.7/32 dev eth0
	ip -n cli addr add fd07::7/128 dev eth0 nodad preferred_lft 0   # never a source it picks
	ip -n srv addr add 198.18.2.2/24 dev eth1
	ip -n srv addr add 198.18.3.2/24 dev eth2
	ip -n fw neigh add 198.18.2.2 lladdr 02:bf:0a:02:00:02 dev vout1 nud permanent
	ip -n fw neigh add 198.18.3.2 lladdr 02:bf:0a:03:00:02 dev vout2 nud permanent
	ip -n srv neigh add 198.18.2.1 lladdr 02:bf:0a:02:00:01 dev eth1 nud permanent
	ip -n srv neigh add 198.18.3.1 lladdr 02:bf:0a:03:00:01 dev eth2 nud permanent
	ip -n srv addr add $SVC4/32 dev lo
	ip -n srv addr add $SVC6/128 dev lo nodad
	ip -n cli route add default via 198.18.1.1
	ip -n cli route add default via fd01::1
	ip -n srv route add 198.18.1.0/24 via 198.18.2.1
	ip -n srv route add fd01::/64 via fd02::1
	ip -n srv route add fd0a::/64 via fd02::1
	ip -n fw route add $SVC4/32 via 198.18.2.2
	ip -n fw route add $SVC6/128 via fd02::2
	ip -n fw route add $SVC4/32 via 198.18.3.2 table 100
	ip -n fw route add $SVC6/128 via fd03::2 table 100
	ip -n fw rule add fwmark 1 lookup 100
	ip -n fw -6 rule add fwmark 1 lookup 100
	# srv takes what comes in on either uplink (its replies go back by uplink 1)
	for dev in all eth1 eth2; do
		ip netns exec srv sh -c "echo 0 >/proc/sys/net/ipv4/conf/$dev/rp_filter"
	done
	ip netns exec fw sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward; echo 1 >/proc/sys/net/ipv6/conf/all/forwarding'
	# a smaller MTU on uplink 2, for TCPMSS --clamp-mss-to-pmtu
	ip -n fw link set vout2 mtu 1280
	ip -n srv link set eth2 mtu 1280
	settle
}

RULES4='*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -i vin0 -m rpfilter --invert -j DROP
-A PREROUTING -i vin0 -p udp -m udp --dport 7007 -j NOTRACK
-A PREROUTING -i vin0 -p udp -m udp --dport 7008 -j CT --notrack
-A PREROUTING -i vout1 -p udp -m udp --sport 7007:7008 -j NOTRACK
-A PREROUTING -i vin0 -p tcp -m tcp --dport 7017 --tcp-flags FIN,SYN,RST,ACK SYN -j CT --notrack
-A OUTPUT -p udp -m udp --dport 7009 -j CT --zone 7
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:LOCAL - [0:0]
-A PREROUTING -j CONNMARK --restore-mark
-A PREROUTING -i vin0 -p udp -m udp --dport 7001 -j MARK --set-mark 1
-A PREROUTING -i vin0 -p tcp -m tcp --dport 7002 -m mark --mark 0 -j MARK --set-mark 1
-A PREROUTING -i vin0 -p udp -m udp --dport 7013 -j HMARK --hmark-tuple src,dst --hmark-mod 1 --hmark-offset 1 --hmark-rnd 0x1
-A PREROUTING -i vin0 -p udp -m udp --dport 7013 -m mark --mark 1
-A PREROUTING -i vin0 -p udp -m udp --dport 7014 -j TEE --gateway 198.18.3.2
-A PREROUTING -i vin0 -p udp -m udp --dport 7015 -m cluster --cluster-total-nodes 2 --cluster-local-node 1 --cluster-hash-seed 0xdeadbeef
-A PREROUTING -i vin0 -p udp -m udp --dport 7015 -m cluster --cluster-total-nodes 2 --cluster-local-node 2 --cluster-hash-seed 0xdeadbeef
-A PREROUTING -i vin0 -p udp -m udp --dport 7015 -m cluster --cluster-total-nodes 2 ! --cluster-local-node 1 --cluster-hash-seed 0xdeadbeef -m pkttype --pkt-type unicast
-A PREROUTING -i vin0 -p udp -m udp --dport 7015 -j CONNSECMARK --save
-A PREROUTING -j CONNMARK --save-mark
-A FORWARD -p udp -m udp --dport 7004 -j TTL --ttl-set 33
-A FORWARD -p udp -m udp --dport 7004 -m ttl --ttl-eq 33
-A FORWARD -p udp -m udp --dport 7005 -j DSCP --set-dscp 0x0a
-A FORWARD -p udp -m udp --dport 7005 -m dscp --dscp 0x0a
-A FORWARD -p udp -m udp --dport 7010 -j TOS --set-tos 0x10/0x3f
-A FORWARD -p udp -m udp --dport 7011 -j TTL --ttl-dec 5
-A FORWARD -p udp -m udp --dport 7011 -m ttl --ttl-eq 58
-A FORWARD -p tcp -m tcp --dport 7006 --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1000
-A FORWARD -p tcp -m tcp --dport 7006 -m tcpmss --mss 1000
-A FORWARD -p tcp -m tcp --dport 7002 --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
-A FORWARD -p udp -m udp --dport 7012 -j CLASSIFY --set-class 1:10
-A FORWARD -p udp -m udp --dport 7012 -j CHECKSUM --checksum-fill
-A FORWARD -m tos --tos 0x10/0x3f
-A FORWARD -p tcp -m connbytes --connbytes 2: --connbytes-dir original --connbytes-mode packets
-A OUTPUT -p udp -j LOCAL
-A OUTPUT -p tcp -j LOCAL
-A LOCAL -p udp -m udp --dport 7003 -j MARK --set-mark 1
-A LOCAL -p udp -m udp --dport 7003 -j ACCEPT
-A POSTROUTING -o vout2
-A POSTROUTING -p udp -m udp --dport 7015 -j CONNSECMARK --restore
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p udp -m conntrack --ctstate UNTRACKED
-A FORWARD -m helper --helper ftp
-A FORWARD -i vin0 -p tcp -m tcp --dport 7017 -m conntrack --ctstate INVALID,UNTRACKED -j SYNPROXY --sack-perm --timestamp --wscale 7 --mss 1400
-A FORWARD -i vin0 -p tcp -m tcp --dport 7017 -m conntrack --ctstate INVALID -j DROP
COMMIT'

# IPv6: the same, with HL for TTL; DSCP and TOS write the traffic class
RULES6=$(echo "$RULES4" | sed -e 's/-j TTL --ttl-set 33/-j HL --hl-set 33/' \
	-e 's/-m ttl --ttl-eq 33/-m hl --hl-eq 33/' -e 's/-j TTL --ttl-dec 5/-j HL --hl-dec 5/' \
	-e 's/-m ttl --ttl-eq 58/-m hl --hl-eq 58/' -e 's/--gateway 198.18.3.2/--gateway fd03::2/' \
	-e 's|^-A POSTROUTING -o vout2$|&\
-A POSTROUTING -o vout1 -s fd01::/64 -p udp -m udp --dport 7016 -j SNPT --src-pfx fd01::/64 --dst-pfx fd0a::/64\
-A POSTROUTING -o vout1 -s fd0a::/64 -p udp -m udp --dport 7016|' \
	-e 's|^-A PREROUTING -j CONNMARK --save-mark$|&\
-A PREROUTING -i vout1 -d fd0a::/64 -p udp -m udp --sport 7016 -j DNPT --src-pfx fd0a::/64 --dst-pfx fd01::/64\
-A PREROUTING -i vout1 -d fd01::2 -p udp -m udp --sport 7016|')

# arrived NAME DEV: whether srv's DEV (an uplink) received anything since last asked
arrived() {
	now=$(ip netns exec srv cat /sys/class/net/$2/statistics/rx_packets)
	eval "before=\${rx_$2:-0}; rx_$2=$now"
	[ "$now" -gt "$before" ] && echo "$1 $2: yes" || echo "$1 $2: no"
}

ct_entries() { ip netns exec fw cat /proc/sys/net/netfilter/nf_conntrack_count; }

mangle_probes() {
	uplinks
	echo "$RULES4" | ip netns exec fw iptables-legacy-restore || echo "restore: refused"
	echo "$RULES6" | ip netns exec fw ip6tables-legacy-restore || echo "restore6: refused"
	ip netns exec fw sh -c 'echo 0 >/proc/sys/net/netfilter/nf_conntrack_tcp_loose'
	SERVE_PEERS=headers serve srv 90 7001 7002 7003 7004 7005 7006 7007 7008 7009 7010 7011 7012 \
		7013 7015 7016
	arrived start eth1 >/dev/null; arrived start eth2 >/dev/null
	for svc in $SVC4 $SVC6; do
		case $svc in *:*) spoofed=fd07::7 ;; *) spoofed=198.18.7.7 ;; esac
		ask "plain" cli $svc 7000
		ask "unroutable source" cli $svc 7012 1 $spoofed
		arrived plain eth1; arrived plain eth2
		ask "marked in PREROUTING" cli $svc 7001
		arrived marked eth1; arrived marked eth2
		connect "connmarked" cli $svc 7002
		arrived connmarked eth1; arrived connmarked eth2
		ask "marked in OUTPUT" fw $svc 7003
		arrived rerouted eth1; arrived rerouted eth2
		ask "ttl" cli $svc 7004
		ask "dscp" cli $svc 7005
		connect "mss" cli $svc 7006
		entries=$(ct_entries)
		ask "notrack" cli $svc 7007
		ask "ct notrack" cli $svc 7008
		echo "conntrack entries made: $(($(ct_entries) - entries))"
		ask "zone" fw $svc 7009
		ask "tos" cli $svc 7010
		ask "ttl dec" cli $svc 7011
		ask "classify" cli $svc 7012
		arrived before eth1 >/dev/null; arrived before eth2 >/dev/null
		ask "hmarked" cli $svc 7013
		arrived hmarked eth1; arrived hmarked eth2
		case $svc in *:*) net=fd01:: ;; *) net=198.18.1. ;; esac
		for host in 2 3 4 5 6; do ask "cluster" cli $svc 7015 1 $net$host; done
	done
	ask "npt" cli $SVC6 7016
	# what the checkentries refuse, with the kernel's errno
	echo "TOS in filter: $(ip netns exec fw iptables-legacy -A FORWARD -j TOS --set-tos 0x10 2>&1 | head -1)"
	echo "CT in mangle: $(ip netns exec fw iptables-legacy -t mangle -A PREROUTING -j CT --notrack 2>&1 | head -1)"
	echo "TCPMSS without SYN: $(ip netns exec fw iptables-legacy -t mangle -A FORWARD -p tcp -j TCPMSS --set-mss 1000 2>&1 | head -1)"
	echo "CONNSECMARK in filter: $(ip netns exec fw iptables-legacy -A FORWARD -j CONNSECMARK --save 2>&1 | head -1)"
	echo "SNPT in PREROUTING: $(ip netns exec fw ip6tables-legacy -t mangle -A PREROUTING -j SNPT --src-pfx fd01::/64 --dst-pfx fd0a::/64 2>&1 | head -1)"
	echo "pmtu in PREROUTING: $(ip netns exec fw iptables-legacy -t mangle -A PREROUTING -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu 2>&1 | head -1)"
	finish_probes "srv 7004" "srv 7005" "srv 7006" "srv 7002" "srv 7010" "srv 7011" "srv 7016"
	for t in raw mangle filter; do
		ip netns exec fw iptables-legacy-save -c -t $t | grep -v '^#'
		ip netns exec fw ip6tables-legacy-save -c -t $t | grep -v '^#'
	done
	# SYNPROXY last, its own rules' counters only: where the server's leg does not
	# complete (7.3's kernel, ip_tables' as well), its retransmissions would reach the
	# counters above at times of their own
	SERVE_PEERS=headers serve srv 30 7017
	for svc in $SVC4 $SVC6; do connect "synproxy" cli $svc 7017; done
	finish_probes "srv 7017"
	for tool in iptables-legacy ip6tables-legacy; do
		ip netns exec fw $tool -L FORWARD -v -n -x | grep SYNPROXY |
			awk '{print "synproxy rule: " $1 " packets"}'
	done
}

phases() {
	say "$1 mangle"
	mangle_probes
}

NAMESPACES="cli fw srv"
reference_then_bpfilter iptable_mangle iptable_raw iptable_filter ip6table_mangle \
	ip6table_raw ip6table_filter
say done
