# What bpfilter.ko's tests will do, here with the kernel's own iptables: two network
# namespaces joined by veth, UDP to port 9 dropped in one and sent from the other.
. /etc/bpfilter-vm/lib.sh

loaded ip_tables && echo "ip_tables: loaded at boot" || echo "ip_tables: not loaded at boot"
ip netns add snd
ip netns add rcv
ip link add veth0 netns snd type veth peer name veth1 netns rcv
ip -n snd addr add 198.18.0.1/24 dev veth0
ip -n rcv addr add 198.18.0.2/24 dev veth1
for ns in snd rcv; do ip -n $ns link set lo up; done
ip -n snd link set veth0 up
ip -n rcv link set veth1 up

ip netns exec rcv iptables-legacy -A INPUT -p udp --dport 9 -j DROP
loaded ip_tables && echo "ip_tables: loaded on first use"

ip netns exec rcv udp recv 9 2 >/tmp/port9 &
ip netns exec rcv udp recv 10 2 >/tmp/port10 &
tries=0
until grep -q listening /tmp/port9 && grep -q listening /tmp/port10; do
	tries=$((tries + 1)); [ $tries -lt 100 ] || exit 1
	sleep 0.1
done
ip netns exec snd udp send 198.18.0.2 9 5
ip netns exec snd udp send 198.18.0.2 10 3
wait
echo "port 9: $(grep received /tmp/port9)"
echo "port 10: $(grep received /tmp/port10)"

ip netns exec rcv iptables-legacy -L INPUT -v -n -x
bpftool version
bpftool prog show
echo "bpftool prog show: ok"
