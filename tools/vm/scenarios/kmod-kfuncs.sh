# bpfilter.ko's kfuncs called by a netfilter program of our own (tools/vm/kfuncs.c),
# not the helper's (tests/test_kmod.py): the module loads with what they need, they
# are in its BTF, and BPF_PROG_TEST_RUN, whose made-up hook state has no namespace,
# no socket and no route, gets "nothing" from each of them instead of an oops.
# Needs bpfilter.ko in /lib/modules/$(uname -r)/extra and /usr/bin/kfuncs.
set -e
say() { echo "== $*"; }

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
	/^\[[0-9]+\] FUNC \047bpfilter_(reject|addr_type|addr_type6)\047/ {
		name = $3; gsub("\047", "", name); split($4, t, "="); funcs[name] = t[2]
	}
	END { for (f in funcs) print "kfunc " f ":" protos[funcs[f]] }' | sort
id_of() { echo "$btf" | sed -n "s/^\[\([0-9]*\)\] FUNC '$1' .*/\1/p"; }
obj=$(bpftool btf show | sed -n 's/^\([0-9]*\): name \[*bpfilter\]* .*/\1/p')

say test run
mkdir /sys/fs/bpf/kfuncs
kfuncs probe /sys/fs/bpf/kfuncs "$obj" "$(id_of bpfilter_reject)" "$(id_of bpfilter_addr_type)" \
	"$(id_of bpfilter_addr_type6)"
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

say rmmod
# the probe calls the module's kfuncs, so it holds the module
rmmod bpfilter 2>/dev/null && echo "with the probe: unloaded" || echo "with the probe: in use"
rm -r /sys/fs/bpf/kfuncs
tries=0
until rmmod bpfilter 2>/dev/null; do
	tries=$((tries + 1)); [ $tries -lt 50 ] || break
	sleep 0.1
done
grep -q '^bpfilter ' /proc/modules && echo "bpfilter: loaded" || echo "bpfilter: unloaded"
