# TRACE, ECN and TCPOPTSTRIP (tests/test_kmod.py), first against ip_tables and
# ip6_tables (the reference), then against bpfilter.ko; the two must say the same.
#
# Tracing is logged only in the initial namespace (nf_log_syslog's rule, whoever
# traces), so the traced host is the guest's own namespace, named "host" here, with
# tcli behind a veth of fixed addresses: its kernel log's TRACE lines then differ
# between the phases only by what each packet makes anew (IP id, an ephemeral port,
# IPv6's flow label), which they are stripped of.
. /etc/bpfilter-vm/lib.sh

trace_net() {
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

# Every table: a traced packet's trace names built-in chains, user chains and their
# RETURNs (conditional: "rule"; unconditional: "return"), policies, an unconditional
# verdict rule (named "policy" by the kernel, as a chain's end would be) and a rule
# found among many by bpfilter's classifier.
trace_rules() {
	ports=$(seq 7090 7110)
	{
		printf '%s\n' '*raw' ':PREROUTING ACCEPT [0:0]' ':OUTPUT ACCEPT [0:0]' \
			'-A PREROUTING -p udp --dport 7100:7101 -j TRACE' \
			'-A OUTPUT -p udp --sport 7100:7101 -j TRACE' COMMIT
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
	}
}

trace_probes() {
	# TRACE's checkentry needs the logger, which the kernel's request from there does
	# not load in this guest (ENOENT, ip_tables' as bpfilter's): loaded as admins do
	modprobe nf_log_syslog
	trace_net
	dmesg -c >/dev/null
	trace_rules 198.18.30.1:7100 | ip netns exec host iptables-legacy-restore
	trace_rules '[fd30::1]:7100' | ip netns exec host ip6tables-legacy-restore
	SERVE_PEERS= serve host 20 7100 7101
	for addr in 198.18.30.1 fd30::1; do
		for port in 7100 7101; do ask "traced" tcli $addr $port; done
	done
	finish_probes
	dmesg | grep -o 'TRACE: .*' | sed -E 's/ ID=[0-9]+//; s/ FLOWLBL=[0-9]+//;
		s/([SD]PT)=[0-9]{5}/\1=ephemeral/g'
	for t in raw mangle nat filter; do
		for cmd in iptables-legacy ip6tables-legacy; do
			ip netns exec host $cmd-save -c -t $t | grep -v '^#'
			# a table with rules holds its module, and this namespace stays
			$cmd -t $t -F
			$cmd -t $t -X
		done
	done
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
	echo "TRACE in mangle: $(ip netns exec fw iptables-legacy -t mangle -A PREROUTING -j TRACE 2>&1 | head -1)"
	finish_probes "wan 7201" "wan 7202" "wan 7203" "wan 7204"
	ip netns exec fw iptables-legacy-save -c -t mangle | grep -v '^#'
}

phases() {
	say "$1 trace"
	trace_probes
	say "$1 ecn"
	ecn_probes
}

NAMESPACES="host tcli fw lan wan"
reference_then_bpfilter iptable_raw iptable_mangle iptable_nat iptable_filter ip6table_raw \
	ip6table_mangle ip6table_nat ip6table_filter
say done
