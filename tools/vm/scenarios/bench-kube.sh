# The kube-proxy benchmark (tools/bench/kube.py runs it): for each system in turn
# (ip_tables, nftables, then bpfilter.ko with ip_tables unloaded) and each number of
# Services in /etc/bpfilter-vm/kube/sizes, fw as a node loads kube-proxy's rules
# (tools/bench/kubeproxy.py), then
#   apply   the time to load them (filter and nat; nft: its table),
#   change  the time to change one Service as kube-proxy does, with
#           iptables-restore --noflush (nft: one nft -f of the changed chains),
#   rate    new TCP connections per second from lan to the last Service's ClusterIP,
#           each DNATed to one of its two endpoints on wan and reset once made (with
#           no Service: to the endpoint itself).
# A line per measurement: "result SYSTEM SERVICES apply-cs change-cs connections ms",
# or "refused SYSTEM SERVICES what it said".
. /etc/bpfilter-vm/lib.sh
set +e
DIR=/etc/bpfilter-vm/kube
RATE_SECONDS=$(cat $DIR/seconds)
now() { read up _ </proc/uptime; echo "${up%.*}${up#*.}"; }

# measure SYSTEM N APPLY CHANGE: load, change, then the connection rate
measure() {
	system=$1 n=$2
	kube_node
	start=$(now)
	out=$(eval "$3" 2>&1)
	status=$?
	apply=$(($(now) - start))
	if [ $status -ne 0 ]; then
		echo "refused $system $n $(echo "$out" | tail -1)" \
			"$(dmesg | sed -n 's/.*\(bpfilter: .*\)/\1/p' | tail -1)"
		return
	fi
	start=$(now)
	out=$(eval "$4" 2>&1)
	status=$?
	change=$(($(now) - start))
	[ $status -eq 0 ] || { echo "refused $system $n change: $(echo "$out" | tail -1)"; return; }
	read vip port <$DIR/$n.vip
	ip netns exec wan udp serve 8080 $((RATE_SECONDS + 5)) drain >/tmp/serve.out &
	until grep -qs listening /tmp/serve.out; do sleep 0.1; done
	rate=$(ip netns exec lan udp connrate "$vip" "$port" "$RATE_SECONDS")
	kill %1 2>/dev/null
	wait
	echo "result $system $n $apply $change $(echo "$rate" | sed 's/connections \([0-9]*\) in \([0-9]*\) ms.*/\1 \2/')"
}

modprobe nf_conntrack
for n in $(cat $DIR/sizes); do
	measure iptables "$n" "ip netns exec fw iptables-legacy-restore $DIR/$n.rules" \
		"ip netns exec fw iptables-legacy-restore --noflush $DIR/$n.change.rules"
done
for n in $(cat $DIR/sizes); do
	measure nftables "$n" "ip netns exec fw nft -f $DIR/$n.nft" \
		"ip netns exec fw nft -f $DIR/$n.change.nft"
done
for ns in fw lan wan; do ip netns del $ns; done
for m in iptable_nat iptable_filter xt_nat xt_MASQUERADE xt_mark xt_statistic xt_comment \
	xt_addrtype xt_conntrack xt_tcpudp ip_tables; do
	loaded $m && unload $m
done
loaded ip_tables && echo "ip_tables: loaded" || echo "ip_tables: not loaded"
depmod -a
# The helper has a minute to answer by default: under TCG, decoding and compiling the
# 50 MB replace of 10,000 Services takes longer (the host takes seconds)
modprobe bpfilter timeout=900
for n in $(cat $DIR/sizes); do
	measure bpfilter "$n" "ip netns exec fw iptables-legacy-restore $DIR/$n.rules" \
		"ip netns exec fw iptables-legacy-restore --noflush $DIR/$n.change.rules"
done
# the helper's own account of each replace (decode, compile and load, retire)
dmesg | sed -n 's/.*\(bpfilter: .*replaced in.*\)/\1/p' | sed 's/, [^,]* insns.*//'
