# bpfilter.ko's kfuncs called by netfilter programs of our own (tools/vm/kfuncs.c),
# not the helper's (tests/test_kmod.py): the module loads with what they need, they
# are in its BTF; BPF_PROG_TEST_RUN, whose made-up hook state has no namespace, no
# socket and no route, gets "nothing" from each of them instead of an oops; and at
# a real IPv6 hook, REJECT's answers and addrtype's types are the kernel's
# ip6t_REJECT's and xt_addrtype's, which run first on the same probes (the
# reference). Needs bpfilter.ko in /lib/modules/$(uname -r)/extra, /usr/bin/kfuncs
# and the shared libraries of a Debian system.
. /etc/bpfilter-vm/lib.sh

# cli -- rtr -- srv, rtr forwarding: at rtr's FORWARD hook only the probes pass (its
# own neighbour discovery and answers go through INPUT and OUTPUT). Being a router,
# rtr also has the subnet-router anycast addresses 2001:db8:1:: and 2001:db8:2::.
topology() {
	for ns in cli rtr srv; do
		ip netns del $ns 2>/dev/null || true
		ip netns add $ns
		ip -n $ns link set lo up
	done
	ip link add c0 netns cli type veth peer name r0 netns rtr
	ip link add s0 netns srv type veth peer name r1 netns rtr
	ip netns exec rtr sh -c 'echo 1 >/proc/sys/net/ipv6/conf/all/forwarding'
	ip -n cli addr add 2001:db8:1::2/64 dev c0 nodad
	ip -n rtr addr add 2001:db8:1::1/64 dev r0 nodad
	ip -n rtr addr add 2001:db8:2::1/64 dev r1 nodad
	ip -n srv addr add 2001:db8:2::2/64 dev s0 nodad
	ip -n cli link set c0 up
	ip -n rtr link set r0 up
	ip -n rtr link set r1 up
	ip -n srv link set s0 up
	ip -n cli route add default via 2001:db8:1::1
	ip -n srv route add default via 2001:db8:2::1
	# a route whose lookup fails (RTF_REJECT) beside addresses with no route at all
	ip -n rtr route add blackhole 2001:db8:dead::/48
}

# REJECT's kinds: ip6tables' name, enum ip6t_reject_with
REJECTS="icmp6-no-route:0 icmp6-adm-prohibited:1 icmp6-addr-unreachable:3
icmp6-port-unreachable:4 tcp-reset:6 icmp6-policy-fail:7 icmp6-reject-route:8"
reject_probes() {
	echo "with $1 udp: $(ip netns exec cli udp ask 2001:db8:2::2 9)"
	echo "with $1 tcp: $(ip netns exec cli udp connect 2001:db8:2::2 9)"
}

# addrtype: the sources the probes come from (to srv, through rtr's FORWARD): cli's
# own, rtr's on either side, rtr's anycast ones, unrouted, blackholed, unspecified
# (which rtr drops before FORWARD: both runs must say so)
SOURCES="2001:db8:1::2 2001:db8:1::1 2001:db8:2::1 2001:db8:1:: 2001:db8:2:: 2001:db8:ffff::1
2001:db8:dead::1 ::"
# enum xt_addrtype_t's IPv6 types; a reference rule per type, address and device
TYPES="UNSPEC UNICAST LOCAL ANYCAST MULTICAST UNREACHABLE"
LIMITS="none --limit-iface-in --limit-iface-out"

say reference reject6
topology
for r in $REJECTS; do
	name=${r%:*}
	ip netns exec rtr ip6tables-legacy -F FORWARD
	if [ $name = tcp-reset ]; then
		ip netns exec rtr ip6tables-legacy -A FORWARD -p tcp -j REJECT --reject-with $name
		ip netns exec rtr ip6tables-legacy -A FORWARD -j DROP
	else
		ip netns exec rtr ip6tables-legacy -A FORWARD -j REJECT --reject-with $name
	fi
	reject_probes ${r#*:}
done

say reference addrtype6
ip netns exec rtr ip6tables-legacy -F FORWARD
for limit in $LIMITS; do
	[ $limit = none ] && limit=
	for dir in dst src; do
		for type in $TYPES; do
			ip netns exec rtr ip6tables-legacy -A FORWARD -m addrtype --$dir-type $type $limit
		done
	done
done
ip netns exec rtr ip6tables-legacy -A FORWARD -j DROP
ip netns exec rtr ip6tables-legacy -S FORWARD
for src in $SOURCES; do
	ip netns exec rtr ip6tables-legacy -Z FORWARD
	ip netns exec cli kfuncs send6 $src 2001:db8:2::2 9
	# until the probe has reached the last rule, if it does: rtr may drop it first
	tries=0
	until listing=$(ip netns exec rtr ip6tables-legacy -L FORWARD -v -x -n --line-numbers) &&
		echo "$listing" | awk '$4 == "DROP" && $2 > 0 { found = 1 } END { exit !found }'; do
		tries=$((tries + 1)); [ $tries -lt 20 ] || break
		sleep 0.1
	done
	if [ $tries -lt 20 ]; then
		echo "addrtype6 from $src: matched$(echo "$listing" |
			awk '$1 ~ /^[0-9]+$/ && $4 != "DROP" && $2 > 0 { printf " %s", $1 }')"
	else
		echo "addrtype6 from $src: not forwarded"
	fi
done

say unload ip6_tables
for ns in cli rtr srv; do ip netns del $ns; done
for m in ip6table_filter ip6t_REJECT xt_addrtype ip6_tables; do
	loaded $m && unload $m
done
loaded ip6_tables && echo "ip6_tables: loaded" || echo "ip6_tables: not loaded"

say modprobe
depmod -a
echo "depends: $(modinfo -F depends bpfilter)"
modprobe bpfilter
for m in nf_reject_ipv4 nf_reject_ipv6 nf_conntrack; do
	echo "$m used by: $(sed -n "s/^$m [0-9]* [0-9]* \([^ ]*\).*/\1/p" /proc/modules)"
done

say btf
btf=$(bpftool btf dump file /sys/kernel/btf/bpfilter)
# each kfunc's parameters, by name, from its FUNC_PROTO
echo "$btf" | awk '
	/^\[[0-9]+\] FUNC_PROTO / { id = substr($1, 2, length($1) - 2); inproto = 1; next }
	/^\[/ { inproto = 0 }
	inproto && /^\t/ { gsub("\047", "", $1); protos[id] = protos[id] " " $1 }
	/^\[[0-9]+\] FUNC \047bpfilter_(reject|addr_type|addr_type6|nat|set_mark|connmark)\047/ {
		name = $3; gsub("\047", "", name); split($4, t, "="); funcs[name] = t[2]
	}
	END { for (f in funcs) print "kfunc " f ":" protos[funcs[f]] }' | sort
id_of() { echo "$btf" | sed -n "s/^\[\([0-9]*\)\] FUNC '$1' .*/\1/p"; }
obj=$(bpftool btf show | sed -n 's/^\([0-9]*\): name \[*bpfilter\]* .*/\1/p')
reject=$(id_of bpfilter_reject)
addr_type=$(id_of bpfilter_addr_type)
addr_type6=$(id_of bpfilter_addr_type6)
nat=$(id_of bpfilter_nat)
set_mark=$(id_of bpfilter_set_mark)
connmark=$(id_of bpfilter_connmark)

say test run
mkdir /sys/fs/bpf/kfuncs
kfuncs probe /sys/fs/bpf/kfuncs "$obj" "$reject" "$addr_type" "$addr_type6" "$nat" "$set_mark" \
	"$connmark"
echo "probe loaded"
hex() { echo "$1" | tr -d ' ' | xxd -r -p >"$2"; }
# bpf_prog_test_run_nf() wants the link-layer header at every hook but LOCAL_OUT
eth4='00 00 00 00 00 00 00 00 00 00 00 00 08 00'
eth6='00 00 00 00 00 00 00 00 00 00 00 00 86 dd'
# UDP to port 9 and a TCP SYN to port 9, 127.0.0.1 or ::1 to itself
udp4='45 00 00 1c 00 01 00 00 40 11 7c cd 7f 00 00 01 7f 00 00 01 30 39 00 09 00 08 00 00'
tcp4='45 00 00 28 00 01 00 00 40 06 7c cc 7f 00 00 01 7f 00 00 01 30 39 00 09 00 00 00 01 00 00 00 00 50 02 ff ff 00 00 00 00'
lo6='00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01'
udp6="60 00 00 00 00 08 11 40 $lo6 $lo6 30 39 00 09 00 08 00 00"
tcp6="60 00 00 00 00 14 06 40 $lo6 $lo6 30 39 00 09 00 00 00 01 00 00 00 00 50 02 ff ff 00 00 00 00"
hex "$udp4" udp4; hex "$tcp4" tcp4; hex "$udp6" udp6; hex "$tcp6" tcp6
hex "$eth4 $udp4" eth-udp4; hex "$eth4 $tcp4" eth-tcp4
hex "$eth6 $udp6" eth-udp6; hex "$eth6 $tcp6" eth-tcp6
# NAME DATA [HOOK PF]: the hook state's first two bytes (hook, pf); without them
# test_run's own, IPv4 LOCAL_OUT
run() {
	ctx=
	if [ $# -eq 4 ]; then
		printf "%02x%02x" "$3" "$4" | xxd -r -p >ctx
		ctx="ctx_in ctx"
	fi
	ret=$(bpftool prog run pinned /sys/fs/bpf/kfuncs/prog data_in "$2" $ctx 2>&1 |
		sed -n 's/^\(Return value: [0-9]*\).*/\1/p')
	echo "$1: $ret; answers: $(kfuncs results /sys/fs/bpf/kfuncs)"
}
run "ipv4 default udp" udp4
run "ipv4 default tcp" tcp4
for hook in 0 1 2 3 4 200; do
	if [ $hook = 3 ]; then p4=udp4 t4=tcp4 p6=udp6 t6=tcp6
	else p4=eth-udp4 t4=eth-tcp4 p6=eth-udp6 t6=eth-tcp6; fi
	run "ipv4 hook $hook udp" $p4 $hook 2
	run "ipv4 hook $hook tcp" $t4 $hook 2
	run "ipv6 hook $hook udp" $p6 $hook 10
	run "ipv6 hook $hook tcp" $t6 $hook 10
done
rm -r /sys/fs/bpf/kfuncs

# The rest runs in rtr's namespace, where /sys is another sysfs: pins go elsewhere.
mkdir /tmp/bpf
mount -t bpf bpf /tmp/bpf
vmlinux=$(bpftool btf dump file /sys/kernel/btf/vmlinux | grep -E "FUNC 'bpf_dynptr_(from_skb|slice)'")
from_skb=$(echo "$vmlinux" | sed -n "s/^\[\([0-9]*\)\] FUNC 'bpf_dynptr_from_skb' .*/\1/p")
slice=$(echo "$vmlinux" | sed -n "s/^\[\([0-9]*\)\] FUNC 'bpf_dynptr_slice' .*/\1/p")
# WITH: a program at rtr's IPv6 FORWARD hook in /tmp/bpf/hook
attach() {
	mkdir /tmp/bpf/hook
	ip netns exec rtr kfuncs hook /tmp/bpf/hook "$obj" "$reject" "$addr_type6" "$from_skb" \
		"$slice" 10 2 "$1"
}
# the link goes with its last pin: until then, the next program would run beside it
detach() {
	rm -r /tmp/bpf/hook
	tries=0
	# netfilter links only: the helper keeps its own iterator link (netnswatch)
	until [ -z "$(bpftool link show | grep -E '^[0-9]+: (type 10|netfilter) ')" ]; do
		tries=$((tries + 1)); [ $tries -lt 50 ] || { echo "a link stays"; return 1; }
		sleep 0.1
	done
}

say bpfilter reject6
topology
# echo-reply (5), which REJECT's checkentry refuses, sends nothing
for with in 0 1 3 4 6 7 8 5; do
	attach $with
	reject_probes $with
	echo "with $with kfunc: $(kfuncs results /tmp/bpf/hook | cut -d' ' -f1)"
	detach
done

say bpfilter addrtype6
attach -1
for src in $SOURCES; do
	ip netns exec cli kfuncs send6 $src 2001:db8:2::2 9
	tries=0
	until answers=$(kfuncs results /tmp/bpf/hook) && echo "$answers" | grep -q '[0-9]'; do
		tries=$((tries + 1)); [ $tries -lt 20 ] || break
		sleep 0.1
	done
	if [ $tries -lt 20 ]; then
		echo "addrtype6 from $src: answers $answers"
	else
		echo "addrtype6 from $src: not forwarded"
	fi
done
detach
for ns in cli rtr srv; do ip netns del $ns; done

say rmmod
mkdir /sys/fs/bpf/kfuncs
kfuncs probe /sys/fs/bpf/kfuncs "$obj" "$reject" "$addr_type" "$addr_type6" "$nat" "$set_mark" \
	"$connmark"
# a program calling the module's kfuncs holds the module
rmmod bpfilter 2>/dev/null && echo "with a program: unloaded" || echo "with a program: in use"
rm -r /sys/fs/bpf/kfuncs
tries=0
until rmmod bpfilter 2>/dev/null; do
	tries=$((tries + 1)); [ $tries -lt 50 ] || break
	sleep 0.1
done
loaded bpfilter && echo "bpfilter: loaded" || echo "bpfilter: unloaded"
