/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The request protocol between whoever receives iptables' socket options
 * (bpfilter.ko, or the LD_PRELOAD shim of `bpfilter exec`) and the translator
 * service. umh/bpfilter/proto.py is its construct twin; a test checks they agree.
 *
 * Requests and replies on a stream. A request is a header followed by `len`
 * payload bytes: for a set, the caller's optval (`len` is its optlen); for a get,
 * only the bytes of the caller's optval buffer the kernel's get handler would copy
 * from user (bpfilter_get_reads(): a header, not the whole buffer iptables passes
 * for the entries, which may be as large as a table), the caller's optlen in
 * `optlen`, which the service checks as the kernel does. The caller's network
 * namespace travels as a file descriptor: from the shim, by SCM_RIGHTS on the
 * unix socket (netns_fd is -1); from bpfilter.ko, installed in the helper's fd
 * table, its number in netns_fd.
 *
 * bpfilter.ko's transport is the misc device /dev/bpfilter, which only the helper
 * the module spawned may open: read() blocks until a request is pending and returns
 * its header and payload as a stream (as many reads as the helper's buffer needs,
 * never more than one request in a read); write() takes replies the same way, one
 * after the other, and the caller's syscall returns once the whole reply is in.
 * Several requests may be outstanding, from callers in any namespace: each has an
 * id, which its reply carries back, and the helper answers them in any order. The
 * shim sends one request per connection (id 0).
 *
 * The reply's payload: for a get, the bytes to copy back to optval (at most
 * optlen; *optlen becomes len); for IPT_SO_SET_REPLACE, the old counters to write
 * to ipt_replace.counters; otherwise nothing. A reply with a negative status
 * carries a message (text, no NUL) naming the rule and the reason, for the log or
 * the caller's stderr.
 */
#ifndef _BPFILTER_PROTO_H
#define _BPFILTER_PROTO_H

#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/netfilter_ipv4/ip_tables.h>
#include <linux/netfilter_ipv6/ip6_tables.h>

#define BPFILTER_MAGIC		0x62706674	/* "bpft" */
#define BPFILTER_PROTO_VERSION	2
#define BPFILTER_MAX_PAYLOAD	(512u << 20)	/* XT_MAX_TABLE_SIZE */

enum bpfilter_op {
	BPFILTER_OP_GETSOCKOPT = 1,
	BPFILTER_OP_SETSOCKOPT = 2,
	BPFILTER_OP_TABLE_NAMES = 3,	/* payload: none; reply: "name\n" per table */
	BPFILTER_OP_SHUTDOWN = 4,	/* bpfilter.ko is unloading: detach every table, exit */
};

struct bpfilter_request {
	__u32 magic;
	__u16 version;
	__u16 op;		/* enum bpfilter_op */
	__u32 family;		/* NFPROTO_IPV4 or NFPROTO_IPV6 */
	__s32 optname;
	__u64 netns_cookie;
	__u32 netns_inum;
	__u32 pid;		/* the calling thread, for logs */
	__u32 len;		/* payload bytes that follow */
	__s32 netns_fd;		/* see above; -1 when it comes by SCM_RIGHTS */
	__u32 id;		/* the reply's */
	__u32 optlen;		/* the caller's: len for a set, see above for a get */
};

/*
 * The bytes of a get's optval that its request carries: what do_ipt_get_ctl() and
 * do_ip6t_get_ctl() copy from user once optlen has passed their check (the table's
 * name of an ipt_getinfo, the ipt_get_entries header, an xt_get_revision), and
 * nothing when it fails or the option is unknown, their answer then EINVAL
 * whatever optval holds. ip6t_getinfo and ip6t_get_entries are laid out as the
 * IPv4 structs, with the same option numbers.
 */
static inline __u32 bpfilter_get_reads(__u32 family, __s32 optname, __u32 optlen)
{
	switch (optname) {
	case IPT_SO_GET_INFO:
		return optlen == sizeof(struct ipt_getinfo) ? XT_TABLE_MAXNAMELEN : 0;
	case IPT_SO_GET_ENTRIES:
		return optlen >= sizeof(struct ipt_get_entries) ? sizeof(struct ipt_get_entries) : 0;
	}
	if (family == NFPROTO_IPV4 ?
	    optname == IPT_SO_GET_REVISION_MATCH || optname == IPT_SO_GET_REVISION_TARGET :
	    optname == IP6T_SO_GET_REVISION_MATCH || optname == IP6T_SO_GET_REVISION_TARGET)
		return optlen == sizeof(struct xt_get_revision) ? sizeof(struct xt_get_revision) : 0;
	return 0;
}

struct bpfilter_reply {
	__u32 magic;
	__u16 version;
	__u16 reserved;
	__s32 status;		/* 0 or -errno */
	__u32 len;		/* payload bytes that follow */
	__u32 id;		/* the request's */
};

/*
 * ioctls the helper makes on its /dev/bpfilter file. What user space cannot do by
 * itself: CONNTRACK_GET turns connection tracking on in a namespace for one family,
 * as the kernel's iptables (family NFPROTO_IPV4) or ip6tables (NFPROTO_IPV6) does
 * for a conntrack match: nf_ct_netns_get(net, family). CONNTRACK_PUT gives one such
 * reference back (ENOENT if that namespace and family hold none). The references
 * are the module's, not the helper's: counted per namespace and family, they
 * outlive a helper that dies, as its tables do, and are given back when the
 * namespace goes or the module is unloaded. Another family is EINVAL.
 */
struct bpfilter_conntrack {
	__s32 netns_fd;		/* a file descriptor of the network namespace */
	__u32 family;		/* NFPROTO_IPV4 (2) or NFPROTO_IPV6 (10) */
};

#define BPFILTER_IOC_CONNTRACK_GET	_IOW('b', 1, struct bpfilter_conntrack)
#define BPFILTER_IOC_CONNTRACK_PUT	_IOW('b', 2, struct bpfilter_conntrack)

/*
 * The nat table's chains run where iptable_nat's do: as lookups of the kernel's NAT
 * core (nf_nat_ipv4_register_fn()), which calls them for the first packet of a
 * connection only. NAT_ATTACH registers prog_fd (a BPF_PROG_TYPE_NETFILTER program,
 * expected attach type BPF_NETFILTER) as the lookup of the namespace of netns_fd for
 * that family and hook, at that priority, or puts it in place of the one registered
 * there (priority then unchanged). NAT_DETACH unregisters the lookup of the
 * namespace whose cookie is netns_cookie, family and hook; NAT_QUERY only tells
 * whether there is one; both ENOENT if there is none. A lookup holds no reference on
 * its namespace, as iptable_nat's does not: it goes with the namespace (or the
 * module), and outlives the helper.
 */
struct bpfilter_nat_attach {
	__s32 netns_fd;		/* NAT_ATTACH: a file descriptor of the network namespace */
	__u32 family;		/* NFPROTO_IPV4 (2) or NFPROTO_IPV6 (10) */
	__u32 hook;		/* NF_INET_PRE_ROUTING, _LOCAL_IN, _LOCAL_OUT or _POST_ROUTING */
	__s32 priority;		/* NAT_ATTACH: NF_IP_PRI_NAT_DST or NF_IP_PRI_NAT_SRC */
	__s32 prog_fd;		/* NAT_ATTACH */
	__u32 pad;		/* 0 */
	__u64 netns_cookie;	/* NAT_DETACH, NAT_QUERY: the namespace's SO_NETNS_COOKIE */
};

#define BPFILTER_IOC_NAT_ATTACH		_IOW('b', 3, struct bpfilter_nat_attach)
#define BPFILTER_IOC_NAT_DETACH		_IOW('b', 4, struct bpfilter_nat_attach)
#define BPFILTER_IOC_NAT_QUERY		_IOW('b', 5, struct bpfilter_nat_attach)

/* bpfilter_nat()'s `how`: the target whose work it does. */
enum bpfilter_nat_how {
	BPFILTER_NAT_SNAT,
	BPFILTER_NAT_DNAT,
	BPFILTER_NAT_MASQUERADE,
	BPFILTER_NAT_REDIRECT,
	BPFILTER_NAT_NETMAP,
};

/*
 * The kernel's own matches (kmod/xtmatch.c), for rules whose match is state the
 * kernel keeps and shows elsewhere (recent's lists in /proc/net/xt_recent, nfacct's
 * objects). XT_MATCH_CREATE does what ip_tables does with a rule's match: finds the
 * extension (family, name, revision; loading its module), then xt_check_match()
 * with the payload at `info` (info_size bytes, the rule's XT_ALIGNed payload), in
 * the namespace of netns_fd, for the table, the hooks the rule is reachable from and
 * its protocol (proto, inv_proto: `! -p`); the kernel's errno if that refuses it.
 * Only extensions the module knows need nothing more of the table walk are taken
 * (recent, nfacct; EOPNOTSUPP otherwise). Then the instance is kept and its number
 * written to `id`, which the programs pass to bpfilter_xt_match(). With `target`
 * set, the same for a rule's target: xt_check_target(), and bpfilter_xt_target()
 * runs it (TOS, DSCP, TTL, HL, TCPMSS, CHECKSUM, CLASSIFY, CT, NOTRACK); its
 * checkentry sees the rule's entry at `entry` (ipt_entry or ip6t_entry and its
 * matches, as in the replace), its matches found as translate_table() finds them
 * (TCPMSS looks for tcp's SYN test there). XT_MATCH_DESTROY
 * destroys, once no program runs them, the instances of the namespace whose cookie is
 * netns_cookie among the info_size / 4 numbers (__u32) at `info`, and answers how
 * many it found (one not found went with its namespace). XT_MATCH_LIST writes a
 * struct bpfilter_xt_instance_ref per instance, of every namespace, at `info` (as
 * many as info_size bytes hold) and answers how many there are: a helper starting
 * destroys those no pinned table names (a dead helper's unfinished load). An
 * instance outlives the helper, and goes with its namespace or the module.
 */
struct bpfilter_xt_match {
	__s32 netns_fd;			/* CREATE */
	__u32 family;			/* CREATE: NFPROTO_IPV4 or NFPROTO_IPV6 */
	char name[XT_EXTENSION_MAXNAMELEN];	/* CREATE */
	__u8 revision;			/* CREATE */
	__u16 proto;			/* CREATE */
	char table[XT_TABLE_MAXNAMELEN];	/* CREATE */
	__u32 hook_mask;		/* CREATE: 1 << NF_INET_* */
	__u32 info_size;		/* bytes at info */
	__u64 info;			/* CREATE: the payload; DESTROY: ids; LIST: refs */
	__u32 id;			/* CREATE: out */
	__u8 inv_proto;			/* CREATE */
	__u8 target;			/* CREATE: 1: a target (bpfilter_xt_target()) */
	__u8 pad[2];			/* 0 */
	__u64 netns_cookie;		/* DESTROY */
	__u64 entry;			/* CREATE, a target: its rule's entry up to the target */
	__u32 entry_size;		/* its bytes: target_offset */
	__u32 pad2;			/* 0 */
};

struct bpfilter_xt_instance_ref {
	__u64 netns_cookie;
	__u32 id;
	__u32 pad;
};

#define BPFILTER_IOC_XT_MATCH_CREATE	_IOWR('b', 6, struct bpfilter_xt_match)
#define BPFILTER_IOC_XT_MATCH_DESTROY	_IOW('b', 7, struct bpfilter_xt_match)
#define BPFILTER_IOC_XT_MATCH_LIST	_IOW('b', 8, struct bpfilter_xt_match)

/* bpfilter_xt_match()'s answer: the rule's outcome bits (mismatch | hotdrop << 1). */
enum bpfilter_xt_verdict {
	BPFILTER_XT_MATCH = 0,
	BPFILTER_XT_MISMATCH = 1,
	BPFILTER_XT_HOTDROP = 2,
};

/* sizeof(struct bpfilter_route_snap) (mangle.c): the stack bpfilter_route_snapshot() fills. */
#define BPFILTER_ROUTE_SNAP_SIZE	48

/*
 * What bpfilter_trace() (trace.c) needs to name a rule as ip_tables' trace_packet()
 * does, one per table, in a BPF array map's only value: its chains in entry order,
 * then a bit per entry (bit e % 8 of byte e / 8) set for an unconditional standard
 * target with a verdict (a chain's tail: "policy" in a built-in chain, else "return").
 */
#define BPFILTER_TRACE_NAME_SIZE	32
#define BPFILTER_TRACE_BUILTIN		1

struct bpfilter_trace_chain {
	__u32 first;		/* a user chain's ERROR head, a built-in chain's first entry */
	__u32 flags;		/* BPFILTER_TRACE_BUILTIN */
	char name[BPFILTER_TRACE_NAME_SIZE];
};

struct bpfilter_trace_info {
	char table[BPFILTER_TRACE_NAME_SIZE];
	__u32 entries;
	__u32 chains;
	struct bpfilter_trace_chain chain[];
};

#endif /* _BPFILTER_PROTO_H */
