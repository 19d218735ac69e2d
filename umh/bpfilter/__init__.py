"""bpfilter: iptables' legacy setsockopt ABI, enforced by eBPF programs at the netfilter hooks."""
