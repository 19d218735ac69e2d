"""Netfilter's uapi numbers (include/uapi/linux/netfilter.h, netfilter_ipv4.h), shared
by the iptables ABI codec and the BPF runtime that attaches at the same hooks."""

NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

NF_DROP = 0
NF_ACCEPT = 1
NF_QUEUE = 3
NF_REPEAT = 4

NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4
NF_INET_NUMHOOKS = 5

# The kernel refuses BPF links at the two extremes, which belong to netfilter's own
# bookkeeping.
NF_IP_PRI_FIRST = -(1 << 31)
NF_IP_PRI_CONNTRACK_DEFRAG = -400
NF_IP_PRI_FILTER = 0
NF_IP_PRI_LAST = (1 << 31) - 1
