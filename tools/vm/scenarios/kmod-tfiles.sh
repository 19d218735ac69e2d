# iptables' own test files (tests/test_kmod.py: the harness puts them in
# /etc/bpfilter-vm/t, and their names in /etc/bpfilter-vm/tfiles), case by case on every
# chain each names, first against ip_tables and ip6_tables (the reference), then
# against bpfilter.ko.
. /etc/bpfilter-vm/lib.sh
# the files to run, by name (tests/test_kmod.py gives all of them)
TFILES=$(cat /etc/bpfilter-vm/tfiles)

# tfile FILE COMMAND: each case of iptables' test file FILE, for each of its chains:
# COMMAND's exit status and first line of complaint. The cases accumulate until the
# file's table changes (a refused one must leave the rules before it); then what -S
# lists of the table, and it is flushed.
tfile() {
	table=filter chains=
	while IFS= read -r line; do
		case "$line" in
		'' | '#'*) continue ;;
		[%@]*)
			# run where it stands, iptables' test runner's way: an iptables command
			# with the binary under test
			command=${line#?}
			case "$command" in
			iptables\ * | ip6tables\ *) command="$2 ${command#* }" ;;
			esac
			eval "ip netns exec fw $command" >/dev/null 2>&1 || true
			continue ;;
		:*) chains=$(echo "${line#:}" | tr , ' '); continue ;;
		'*'*) listed $2 $table; table=${line#?}; continue ;;
		esac
		rule=${line%%;*}
		for chain in $chains; do
			status=0
			eval "ip netns exec fw $2 -t $table -A $chain $rule" >/dev/null 2>/tmp/complaint ||
				status=$?
			echo "$1 $2 -t $table -A $chain $rule: $status $(head -1 /tmp/complaint)"
		done
	done <"/etc/bpfilter-vm/t/$1"
	listed $2 $table
}

# listed COMMAND TABLE: its rules, then none
listed() {
	ip netns exec fw $1 -t $2 -S | grep -v '^-P' || true
	# (a table bpfilter does not have, security, cannot be flushed: said by -S)
	ip netns exec fw $1 -t $2 -F 2>/dev/null || true
}

tfile_cases() {
	# TRACE's checkentry needs the logger, which the kernel's request from there does
	# not load in this guest (ENOENT, ip_tables' as bpfilter's): loaded as admins do
	modprobe nf_log_syslog
	fresh fw
	for file in $TFILES; do
		case "$file" in
		libipt_* | iptables.t) tfile $file iptables-legacy ;;
		libip6t_* | ip6tables.t) tfile $file ip6tables-legacy ;;
		*) tfile $file iptables-legacy; tfile $file ip6tables-legacy ;;
		esac
	done
}

phases() {
	say "$1 test files"
	tfile_cases
}

NAMESPACES="fw"
reference_then_bpfilter iptable_raw iptable_mangle iptable_filter iptable_nat \
	ip6table_raw ip6table_mangle ip6table_filter ip6table_nat
say done
