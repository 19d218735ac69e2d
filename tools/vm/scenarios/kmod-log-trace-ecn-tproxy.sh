# LOG, TRACE, ECN, TCPOPTSTRIP, transparent proxying and bridged traffic
# (tests/test_kmod.py), first against ip_tables and ip6_tables (the reference), then
# against bpfilter.ko; the two must say the same.
#
# LOG's and TRACE's lines are printed only in the initial namespace (nf_log_syslog's
# rule), so the logging host is the guest's own namespace, named "host" here, with
# tcli behind a veth of fixed addresses, and the guest's printk settings are Debian's
# defaults: the lines then differ between the phases only by what each packet makes
# anew (IP id, an ephemeral port, IPv6's flow label), which they are stripped of.
# TPROXY and -m socket are in mangle PREROUTING, -m physdev in filter FORWARD of a
# bridge, IPv4 and IPv6.
. /etc/bpfilter-vm/lib.sh

log_net() {
	ip link del tr0 2>/dev/null || true
	ip netns del host 2>/dev/null || true
	ip netns attach host 1
	fresh tcli
	link host tr0 02:bf:30:00:00:01 198.18.30.1/24 tcli eth0 02:bf:30:00:00:02 198.18.30.2/24
	ip -n host addr add fd30::1/64 dev tr0 nodad
	ip -n tcli addr add fd30::2/64 dev eth0 nodad
	ip -n host neigh add fd30::2 lladdr 02:bf:30:00:00:02 dev tr0 nud permanent
	ip -n tcli neigh add fd30::1 lladdr 02:bf:30:00:00:01 dev eth0 nud permanent
	settle
}

# A datagram to 7101 logged on its way in (filter INPUT), its answer on its way out
# (mangle POSTROUTING, with the socket's owner)
log_rules() {
	printf '%s\n' '*mangle' ':PREROUTING ACCEPT [0:0]' ':INPUT ACCEPT [0:0]' \
		':FORWARD ACCEPT [0:0]' ':OUTPUT ACCEPT [0:0]' ':POSTROUTING ACCEPT [0:0]' \
		'-A POSTROUTING -p udp --sport 7101 -j LOG --log-prefix "LOGGED: " --log-uid' COMMIT
	printf '%s\n' '*filter' ':INPUT ACCEPT [0:0]' ':FORWARD ACCEPT [0:0]' \
		':OUTPUT ACCEPT [0:0]' \
		'-A INPUT -p udp --dport 7101 -j LOG --log-prefix "LOGGED: " --log-tcp-options' COMMIT
}

log_probes() {
	log_net
	dmesg -c >/dev/null
	log_rules | ip netns exec host iptables-legacy-restore
	log_rules | ip netns exec host ip6tables-legacy-restore
	SERVE_PEERS= serve host 20 7100 7101
	for addr in 198.18.30.1 fd30::1; do
		for port in 7100 7101; do ask "logged" tcli $addr $port; done
	done
	finish_probes
	dmesg | grep -o 'LOGGED: .*' | sed -E 's/ ID=[0-9]+//; s/ FLOWLBL=[0-9]+//;
		s/([SD]PT)=[0-9]{5}/\1=ephemeral/g'
	for t in mangle filter; do
		for cmd in iptables-legacy ip6tables-legacy; do
			ip netns exec host $cmd-save -c -t $t | grep -v '^#'
			# a table with rules holds its module, and this namespace stays
			$cmd -t $t -F
		done
	done
}

# Every table: a traced packet's trace names built-in chains, user chains and their
# RETURNs (conditional: "rule"; unconditional: "return"), policies, an unconditional
# verdict rule (named "policy" by the kernel, as a chain's end would be) and a rule
# found among many by bpfilter's classifier. The raw table comes last, so that the
# others were loaded untraced (bpfilter loads them again when it gains TRACE).
trace_rules() {
	ports=$(seq 7090 7110)
	printf '%s\n' '*mangle' ':PREROUTING ACCEPT [0:0]' ':INPUT ACCEPT [0:0]' \
		':FORWARD ACCEPT [0:0]' ':OUTPUT ACCEPT [0:0]' ':POSTROUTING ACCEPT [0:0]' \
		':MARKS - [0:0]' '-A PREROUTING -p udp -j MARKS' \
		'-A MARKS -p udp --dport 7101 -j RETURN' '-A MARKS -j RETURN' \
		'-A MARKS -j ACCEPT' COMMIT
	printf '%s\n' '*nat' ':PREROUTING ACCEPT [0:0]' ':INPUT ACCEPT [0:0]' \
		':OUTPUT ACCEPT [0:0]' ':POSTROUTING ACCEPT [0:0]' \
		"-A PREROUTING -p udp --dport 7199 -j DNAT --to-destination $1" COMMIT
	printf '%s\n' '*filter' ':INPUT ACCEPT [0:0]' ':FORWARD ACCEPT [0:0]' \
		':OUTPUT ACCEPT [0:0]' ':CHK - [0:0]' '-A INPUT -p tcp -j DROP' \
		'-A INPUT -p udp -j CHK'
	for port in $ports; do echo "-A INPUT -p udp --dport $port -j ACCEPT"; done
	printf '%s\n' '-A INPUT -j ACCEPT' '-A CHK -m mark --mark 5 -j DROP' \
		'-A CHK -p udp --dport 7101 -j RETURN' \
		'-A OUTPUT -p tcp -j DROP' '-A OUTPUT -j ACCEPT' COMMIT
	printf '%s\n' '*raw' ':PREROUTING ACCEPT [0:0]' ':OUTPUT ACCEPT [0:0]' \
		'-A PREROUTING -p udp --dport 7100:7101 -j TRACE' \
		'-A OUTPUT -p udp --sport 7100:7101 -j TRACE' COMMIT
}

# bpfilter.ko's references (programs calling its functions hold it), once those of
# programs let go of are given back (after a grace period, by a worker)
module_refs() {
	last=-1
	for _ in $(seq 40); do
		now=$(cat /sys/module/bpfilter/refcnt)
		[ "$now" = "$last" ] && break
		last=$now
		sleep 0.5
	done
	echo "$now"
}

trace_probes() {
	# TRACE's checkentry needs the logger, which the kernel's request from there does
	# not load in this guest (ENOENT, ip_tables' as bpfilter's): loaded as admins do
	modprobe nf_log_syslog
	log_net
	dmesg -c >/dev/null
	trace_rules 198.18.30.1:7100 | ip netns exec host iptables-legacy-restore
	trace_rules '[fd30::1]:7100' | ip netns exec host ip6tables-legacy-restore
	SERVE_PEERS= serve host 30 7100 7101
	for addr in 198.18.30.1 fd30::1; do
		for port in 7100 7101; do ask "traced" tcli $addr $port; done
	done
	[ "$1" = bpfilter ] && traced_refs=$(module_refs)
	# no TRACE rule left: nothing is traced, every counter stays
	for cmd in iptables-legacy ip6tables-legacy; do ip netns exec host $cmd -t raw -F; done
	[ "$1" = bpfilter ] && untraced_refs=$(module_refs)
	for addr in 198.18.30.1 fd30::1; do ask "untraced" tcli $addr 7101; done
	finish_probes
	dmesg | grep -o 'TRACE: .*' | sed -E 's/ ID=[0-9]+//; s/ FLOWLBL=[0-9]+//;
		s/([SD]PT)=[0-9]{5}/\1=ephemeral/g'
	for t in raw mangle nat filter; do
		for cmd in iptables-legacy ip6tables-legacy; do
			ip netns exec host $cmd-save -c -t $t | grep -v '^#'
			$cmd -t $t -F
			$cmd -t $t -X
		done
	done
	if [ "$1" = bpfilter ]; then
		say "$1 trace holds"
		echo "while tracing, bpfilter.ko is held $((traced_refs - untraced_refs)) times more"
	fi
}

# lan sends with ECN; fw (mangle FORWARD) takes it off the SYNs to 7201, sets the ECT
# codepoint of datagrams to 7202 and strips SACK and timestamps from SYNs to 7203; wan
# says what it agreed (7204: untouched); -m ecn after ECN sees what ECN left
ecn_probes() {
	router4
	ip netns exec lan sh -c 'echo 1 >/proc/sys/net/ipv4/tcp_ecn'
	ip netns exec fw iptables-legacy-restore <<'RULES'
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A FORWARD -p tcp --dport 7201 -m ecn --ecn-tcp-ece --ecn-tcp-cwr
-A FORWARD -p tcp --dport 7201 -j ECN --ecn-tcp-remove
-A FORWARD -p tcp --dport 7201 -m ecn --ecn-tcp-ece
-A FORWARD -p tcp --dport 7201 -m ecn --ecn-tcp-cwr
-A FORWARD -p udp --dport 7202 -j ECN --ecn-ip-ect 1
-A FORWARD -p tcp --dport 7203 -j TCPOPTSTRIP --strip-options sack-permitted,timestamp
-A POSTROUTING -p tcp --dport 7204 -m ecn --ecn-tcp-ece --ecn-tcp-cwr
COMMIT
RULES
	SERVE_PEERS=headers serve wan 20 7201 7202 7203 7204
	connect "ecn removed" lan 10.2.0.2 7201
	ask "ect set" lan 10.2.0.2 7202
	connect "options stripped" lan 10.2.0.2 7203
	connect "untouched" lan 10.2.0.2 7204
	echo "ECN on udp: $(ip netns exec fw iptables-legacy -t mangle -A FORWARD -p udp -j ECN --ecn-tcp-remove 2>&1 | head -1)"
	echo "ECN in filter: $(ip netns exec fw iptables-legacy -A FORWARD -p tcp -j ECN --ecn-tcp-remove 2>&1 | head -1)"
	finish_probes "wan 7201" "wan 7202" "wan 7203" "wan 7204"
	ip netns exec fw iptables-legacy-save -c -t mangle | grep -v '^#'
}

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
# is made: it hooks the bridges made after it; physdev's checkentry would load it
# only once rules come)
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
	bridge_net
	# after the guests' MLD reports, which the bridge carries too
	bridge_rules | ip netns exec fw iptables-legacy-restore
	bridge_rules | ip netns exec fw ip6tables-legacy-restore
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
	say "$1 log"
	log_probes
	say "$1 trace"
	trace_probes $1
	say "$1 ecn"
	ecn_probes
	say "$1 tproxy"
	router4
	proxied "" 10.2.0.2
	router
	proxied -6 2001:db8:2::2
	say "$1 physdev"
	bridged_probes
}

NAMESPACES="host tcli fw lan wan g1 g2"
reference_then_bpfilter iptable_raw iptable_mangle iptable_nat iptable_filter ip6table_raw \
	ip6table_mangle ip6table_nat ip6table_filter
say done
