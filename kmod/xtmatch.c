// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel's own matches, for what a BPF program cannot do as the kernel does.
 *
 * Some matches are state the kernel keeps and shows elsewhere: recent's address
 * lists, which /proc/net/xt_recent/<name> lists and takes writes into, and which
 * rules of any table (ip_tables' too) share by name; nfacct's counters, which
 * nfnetlink_acct owns. A copy in BPF maps would be another list, not the one the
 * administrator reads and writes. So bpfilter.ko makes each such rule's match what
 * ip_tables makes of it: the extension found by xt_request_find_match() (loading
 * its module), its payload checked and set up by xt_check_match() in the rule's
 * namespace, table and hooks (checkentry: recent's table and its /proc entry,
 * nfacct's reference on its object), kept here as an instance, and destroyed as
 * cleanup_entry() does. The helper's programs call bpfilter_xt_match() with the
 * instance's number where the rule's match is, and it runs the extension's ->match
 * with what ipt_do_table()/ip6t_do_table() give it.
 *
 * An instance belongs to the table generation that the helper loaded it for, not
 * to the helper: a helper that dies leaves it to the programs still attached. The
 * helper destroys it once the generation is gone (replaced, or its table
 * removed); its namespace going, or the module, destroys what is left.
 *
 * Targets likewise (bpfilter_xt_target()): those that rewrite the packet, set up
 * its conntrack template, mark it for tracing or hand it to a local socket (TOS and
 * DSCP, TTL and HL, ECN, TCPMSS, TCPOPTSTRIP, CHECKSUM, CLASSIFY, CT and NOTRACK,
 * TRACE, TPROXY), and LOG,
 * which prints the kernel's line itself, are the kernel's own ->target, checked by
 * xt_check_target() as ip_tables checks them (their table and hook restrictions
 * included), run as ipt_do_table() runs them, destroyed as cleanup_entry() does.
 *
 * x_tables is reached through symbol_get(): bpfilter.ko loads on a kernel without
 * it, where these matches and targets are refused.
 */
#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/idr.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/netfilter/x_tables.h>
#include <linux/netfilter_ipv4/ip_tables.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <linux/slab.h>
#include <net/ipv6.h>
#include <net/net_namespace.h>

#include "bpfilter_proto.h"
#include "bpfilter_xtmatch.h"

/* A payload larger than this is no match's: cgroup's revision 1 is 4112 bytes. */
#define BPFILTER_XT_MAX_INFO	8192
/* An entry up to its target is smaller than this: the kernel's are, at most 64 KiB. */
#define BPFILTER_XT_MAX_ENTRY	U16_MAX
/* Instances named by one DESTROY or LIST: the helper batches by table load. */
#define BPFILTER_XT_MAX_BATCH	(1u << 20)

/*
 * The extensions run this way: their ->match needs nothing more than the packet,
 * the hook state and the offsets given below, and writes nothing of the packet but
 * the mark socket's --restore-skmark copies from the socket found and the packet
 * type cluster turns from multicast to host (which the program reads again): state
 * the kernel keeps and shows (recent, nfacct, hashlimit, connlimit's counts, rateest's
 * estimators, osf's fingerprints, IPVS's connections), what it reads of the packet as
 * each rule meets it, or keeps beside it (its conntrack entry, its route, its bridge
 * ports, its socket, its cgroup, its IPsec policy), and what only its code reads
 * (string's textsearch, u32, time's clock, cluster's hash).
 */
static const char *const bpfilter_xt_allowed[] = {
	"recent", "nfacct", "dscp", "tos", "ecn", "tcpmss", "connbytes", "connlabel", "helper",
	"cpu", "realm", "rpfilter", "physdev", "socket", "hashlimit", "connlimit", "string",
	"time", "u32", "cgroup", "policy", "rateest", "osf", "ipvs", "cluster",
};
/*
 * The targets run this way: their ->target needs the packet, the hook state and
 * the offsets below; what it writes of the packet (a header field, with the
 * checksums it updates; SNPT's and DNPT's address, which the program reads again), of
 * skb->priority, skb->nf_trace, skb->secmark or the conntrack entry's (CONNSECMARK),
 * the packet's socket or the conntrack template, or skb->mark (HMARK: the program
 * reads it again), or prints (LOG), is what ip_tables' rule would; or it hands the
 * packet to a subsystem without changing it (NFLOG, AUDIT, LED's trigger), counts it
 * (IDLETIMER's timer, RATEEST's estimator) or sends a copy of it (TEE: nf_dup_ipv4/6
 * route it through the namespace's hooks, bpfilter's programs included, from inside
 * the target, as from ip_tables' rule; nf_skb_duplicated keeps the copy's own TEE
 * rules from copying).
 */
static const char *const bpfilter_xt_allowed_targets[] = {
	"TOS", "DSCP", "TTL", "HL", "TCPMSS", "CHECKSUM", "CLASSIFY", "CT", "NOTRACK",
	"ECN", "TCPOPTSTRIP", "TRACE", "TPROXY", "LOG", "NFLOG", "AUDIT", "IDLETIMER",
	"RATEEST", "HMARK", "TEE", "LED", "CONNSECMARK", "SNPT", "DNPT", "SYNPROXY",
};
/*
 * Targets that may take the packet (NF_STOLEN): SYNPROXY answers a client's SYN, or
 * opens the connection to the server on its ACK, and frees the packet. A netfilter
 * program cannot say NF_STOLEN, only drop it, which frees it again: such a target is
 * given a reference of its own to free, and its NF_STOLEN is the program's NF_DROP
 * (the packet goes nowhere either way; only the drop's tracepoint tells them apart).
 */
static const char *const bpfilter_xt_stealing_targets[] = { "SYNPROXY" };

struct bpfilter_xt_instance {
	struct net *net;		/* not counted: the namespace destroys us on its way out */
	u64 cookie;			/* its net_cookie, which no other namespace ever has */
	struct xt_match *match;		/* a match's: holds the extension's module */
	struct xt_target *target;	/* a target's: likewise */
	void *info;			/* the payload, as checkentry left it */
	u8 family;
	bool steals;			/* a target that may answer NF_STOLEN */
	bool ipv6_proto;		/* the rule has -p: ip6_packet_match() finds thoff */
};

/* Read under RCU by the kfunc (the programs run under it), changed under the mutex. */
static DEFINE_IDR(bpfilter_xt_instances);
static DEFINE_MUTEX(bpfilter_xt_lock);

/* x_tables' functions, once a first instance needed them (held until unload). */
static struct xt_match *(*bpfilter_xt_find)(u8 af, const char *name, u8 revision);
static int (*bpfilter_xt_check)(struct xt_mtchk_param *par, unsigned int size, u16 proto,
				bool inv_proto);
static struct xt_target *(*bpfilter_xt_find_target)(u8 af, const char *name, u8 revision);
static int (*bpfilter_xt_check_target)(struct xt_tgchk_param *par, unsigned int size,
				       u16 proto, bool inv_proto);

/*
 * Loading x_tables registers its pernet operations, which waits for namespaces being
 * torn down, whose pre_exit takes bpfilter_xt_lock: so it is loaded without the lock
 * held, and whoever publishes second gives its reference back.
 */
/* Publishes *got as *slot unless another did first; gives back what is not kept. */
#define bpfilter_xt_publish(slot, got, symbol)		\
	do {						\
		mutex_lock(&bpfilter_xt_lock);		\
		if ((got) && !(slot)) {			\
			(slot) = (got);			\
			(got) = NULL;			\
		}					\
		mutex_unlock(&bpfilter_xt_lock);	\
		if (got)				\
			symbol_put(symbol);		\
	} while (0)

static int bpfilter_xt_symbols(void)
{
	typeof(bpfilter_xt_find) find;
	typeof(bpfilter_xt_check) check;
	typeof(bpfilter_xt_find_target) find_target;
	typeof(bpfilter_xt_check_target) check_target;

	mutex_lock(&bpfilter_xt_lock);
	find = bpfilter_xt_find;
	check = bpfilter_xt_check;
	find_target = bpfilter_xt_find_target;
	check_target = bpfilter_xt_check_target;
	mutex_unlock(&bpfilter_xt_lock);
	if (find && check && find_target && check_target)
		return 0;
	find = symbol_request(xt_request_find_match);
	bpfilter_xt_publish(bpfilter_xt_find, find, xt_request_find_match);
	check = symbol_request(xt_check_match);
	bpfilter_xt_publish(bpfilter_xt_check, check, xt_check_match);
	find_target = symbol_request(xt_request_find_target);
	bpfilter_xt_publish(bpfilter_xt_find_target, find_target, xt_request_find_target);
	check_target = symbol_request(xt_check_target);
	bpfilter_xt_publish(bpfilter_xt_check_target, check_target, xt_check_target);
	return READ_ONCE(bpfilter_xt_find) && READ_ONCE(bpfilter_xt_check) &&
	       READ_ONCE(bpfilter_xt_find_target) && READ_ONCE(bpfilter_xt_check_target) ?
	       0 : -EOPNOTSUPP;
}

/* Gives back the extensions bpfilter_xt_entry() held (the first `held`), and the entry. */
static void bpfilter_xt_entry_free(void *e, u8 family, unsigned int held)
{
	unsigned int pos = family == NFPROTO_IPV4 ? sizeof(struct ipt_entry) :
						    sizeof(struct ip6t_entry);
	struct xt_entry_match *m;

	for (; held; held--, pos += m->u.match_size) {
		m = e + pos;
		module_put(m->u.kernel.match->me);
	}
	kvfree(e);
}

static bool bpfilter_xt_allowed_name(const char *name, bool target)
{
	const char *const *names = target ? bpfilter_xt_allowed_targets : bpfilter_xt_allowed;
	int i, count = target ? ARRAY_SIZE(bpfilter_xt_allowed_targets) :
				ARRAY_SIZE(bpfilter_xt_allowed);

	for (i = 0; i < count; i++)
		if (!strcmp(name, names[i]))
			return true;
	return false;
}

/* cleanup_match() or cleanup_entry()'s target part, once no program can run the instance. */
static void bpfilter_xt_destroy(struct bpfilter_xt_instance *inst)
{
	if (inst->target) {
		struct xt_tgdtor_param par = {
			.net = inst->net,
			.target = inst->target,
			.targinfo = inst->info,
			.family = inst->family,
		};

		if (par.target->destroy)
			par.target->destroy(&par);
		module_put(par.target->me);
	} else {
		struct xt_mtdtor_param par = {
			.net = inst->net,
			.match = inst->match,
			.matchinfo = inst->info,
			.family = inst->family,
		};

		if (par.match->destroy)
			par.match->destroy(&par);
		module_put(par.match->me);
	}
	kvfree(inst->info);
	kfree(inst);
}

/*
 * A target's rule as its checkentry may walk it (par->entryinfo): the entry up to the
 * target, from the replace, its matches' extensions found as translate_table()'s
 * find_check_match() finds them (each held), target_offset where they end. Where
 * none is given, the entry has only the protocol.
 */
static void *bpfilter_xt_entry(const struct bpfilter_xt_match *req, unsigned int *held)
{
	unsigned int head = req->family == NFPROTO_IPV4 ? sizeof(struct ipt_entry) :
							  sizeof(struct ip6t_entry);
	struct xt_entry_match *m;
	struct xt_match *match;
	unsigned int pos;
	void *e;

	*held = 0;
	if (req->entry_size < head || req->entry_size > BPFILTER_XT_MAX_ENTRY)
		return ERR_PTR(-EINVAL);
	e = vmemdup_user(u64_to_user_ptr(req->entry), req->entry_size);
	if (IS_ERR(e))
		return e;
	if (req->family == NFPROTO_IPV4)
		((struct ipt_entry *)e)->target_offset = req->entry_size;
	else
		((struct ip6t_entry *)e)->target_offset = req->entry_size;
	for (pos = head; pos < req->entry_size; pos += m->u.match_size) {
		m = e + pos;
		if (req->entry_size - pos < sizeof(*m) || m->u.match_size < sizeof(*m) ||
		    m->u.match_size > req->entry_size - pos ||
		    strnlen(m->u.user.name, sizeof(m->u.user.name)) == sizeof(m->u.user.name)) {
			match = ERR_PTR(-EINVAL);
		} else {
			match = bpfilter_xt_find(req->family, m->u.user.name, m->u.user.revision);
		}
		if (IS_ERR(match)) {
			bpfilter_xt_entry_free(e, req->family, *held);
			return match;
		}
		m->u.kernel.match = match;
		(*held)++;
	}
	return e;
}

/* The target's or match's checkentry, as translate_table()'s check_target() or check_match(). */
static int bpfilter_xt_check_entry(struct bpfilter_xt_match *req, struct net *net, void *entry,
				   struct bpfilter_xt_instance *inst)
{
	if (req->target) {
		struct xt_tgchk_param par = {
			.net = net,
			.table = req->table,
			.entryinfo = entry,
			.target = inst->target,
			.targinfo = inst->info,
			.hook_mask = req->hook_mask,
			.family = req->family,
		};
		unsigned int held = 0;
		int err;

		if (req->entry_size) {
			par.entryinfo = bpfilter_xt_entry(req, &held);
			if (IS_ERR(par.entryinfo))
				return PTR_ERR(par.entryinfo);
		}
		/* its size, table, hooks and protocol, then its checkentry */
		err = bpfilter_xt_check_target(&par, req->info_size, req->proto, req->inv_proto);
		if (req->entry_size)
			bpfilter_xt_entry_free((void *)par.entryinfo, req->family, held);
		return err;
	} else {
		struct xt_mtchk_param par = {
			.net = net,
			.table = req->table,
			.entryinfo = entry,
			.match = inst->match,
			.matchinfo = inst->info,
			.hook_mask = req->hook_mask,
			.family = req->family,
		};

		/* its size, table, hooks and protocol, then its checkentry */
		return bpfilter_xt_check(&par, req->info_size, req->proto, req->inv_proto);
	}
}

static long bpfilter_xt_create(struct bpfilter_xt_match *req, void __user *arg)
{
	/* What checkentry may read of the rule (entryinfo): its ip part's protocol. */
	union {
		struct ipt_entry v4;
		struct ip6t_entry v6;
	} entry = {};
	struct bpfilter_xt_instance *inst;
	struct module *owner;
	struct net *net;
	long err;
	int id;

	if ((req->family != NFPROTO_IPV4 && req->family != NFPROTO_IPV6) ||
	    (!req->info_size && !req->target) || req->info_size > BPFILTER_XT_MAX_INFO ||
	    req->target > 1 ||
	    strnlen(req->name, sizeof(req->name)) == sizeof(req->name) ||
	    strnlen(req->table, sizeof(req->table)) == sizeof(req->table))
		return -EINVAL;
	if (!bpfilter_xt_allowed_name(req->name, req->target))
		return -EOPNOTSUPP;
	err = bpfilter_xt_symbols();
	if (err)
		return err;
	net = get_net_ns_by_fd(req->netns_fd);
	if (IS_ERR(net))
		return PTR_ERR(net);
	inst = kzalloc(sizeof(*inst), GFP_KERNEL_ACCOUNT);
	if (!inst) {
		err = -ENOMEM;
		goto out_net;
	}
	if (req->target) {
		inst->target = bpfilter_xt_find_target(req->family, req->name, req->revision);
		err = IS_ERR(inst->target) ? PTR_ERR(inst->target) : 0;
		owner = err ? NULL : inst->target->me;
	} else {
		inst->match = bpfilter_xt_find(req->family, req->name, req->revision);
		err = IS_ERR(inst->match) ? PTR_ERR(inst->match) : 0;
		owner = err ? NULL : inst->match->me;
	}
	if (err)
		goto out_inst;
	inst->info = kvzalloc(req->info_size, GFP_KERNEL_ACCOUNT);
	err = -ENOMEM;
	if (!inst->info)
		goto out_free;
	err = -EFAULT;
	if (copy_from_user(inst->info, u64_to_user_ptr(req->info), req->info_size))
		goto out_free;
	if (req->family == NFPROTO_IPV4) {
		entry.v4.ip.proto = req->proto;
		entry.v4.ip.invflags = req->inv_proto ? IPT_INV_PROTO : 0;
	} else {
		entry.v6.ipv6.proto = req->proto;
		entry.v6.ipv6.flags = req->proto ? IP6T_F_PROTO : 0;
		entry.v6.ipv6.invflags = req->inv_proto ? IP6T_INV_PROTO : 0;
	}
	err = bpfilter_xt_check_entry(req, net, &entry, inst);
	if (err)
		goto out_free;
	inst->net = net;
	inst->cookie = net->net_cookie;
	inst->family = req->family;
	inst->ipv6_proto = req->family == NFPROTO_IPV6 && req->proto;
	inst->steals = req->target &&
		       match_string(bpfilter_xt_stealing_targets,
				    ARRAY_SIZE(bpfilter_xt_stealing_targets), req->name) >= 0;
	mutex_lock(&bpfilter_xt_lock);
	/* cyclic: a number the helper gave back is not another instance's soon after */
	id = idr_alloc_cyclic(&bpfilter_xt_instances, inst, 1, INT_MAX, GFP_KERNEL);
	mutex_unlock(&bpfilter_xt_lock);
	if (id < 0) {
		err = id;
		goto out_destroy;
	}
	req->id = id;
	if (copy_to_user(arg, req, sizeof(*req))) {
		mutex_lock(&bpfilter_xt_lock);
		idr_remove(&bpfilter_xt_instances, id);
		mutex_unlock(&bpfilter_xt_lock);
		synchronize_net();	/* its number was there to be found */
		err = -EFAULT;
		goto out_destroy;
	}
	put_net(net);
	return 0;

out_destroy:
	/* checked: destroyed as cleanup_entry() does (no program knows its number) */
	bpfilter_xt_destroy(inst);
	put_net(net);
	return err;
out_free:
	kvfree(inst->info);
	module_put(owner);
out_inst:
	kfree(inst);
out_net:
	put_net(net);
	return err;
}

/* Destroys what is left in `gone` (count of them), after one grace period. */
static void bpfilter_xt_destroy_removed(struct bpfilter_xt_instance **gone, unsigned int count)
{
	if (!count)
		return;
	synchronize_net();
	while (count)
		bpfilter_xt_destroy(gone[--count]);
}

/* The instances of the namespace netns_cookie among the ids at `info`: their count. */
static long bpfilter_xt_release(const struct bpfilter_xt_match *req)
{
	struct bpfilter_xt_instance *inst, **gone;
	unsigned int count = req->info_size / sizeof(u32), found = 0, i;
	u32 *ids;

	if (req->info_size % sizeof(u32) || count > BPFILTER_XT_MAX_BATCH)
		return -EINVAL;
	if (!count)
		return 0;
	ids = vmemdup_user(u64_to_user_ptr(req->info), req->info_size);
	if (IS_ERR(ids))
		return PTR_ERR(ids);
	gone = kvcalloc(count, sizeof(*gone), GFP_KERNEL);
	if (!gone) {
		kvfree(ids);
		return -ENOMEM;
	}
	mutex_lock(&bpfilter_xt_lock);
	for (i = 0; i < count; i++) {
		inst = idr_find(&bpfilter_xt_instances, ids[i]);
		/* not there: gone with its namespace (another's number is not ours) */
		if (!inst || inst->cookie != req->netns_cookie)
			continue;
		idr_remove(&bpfilter_xt_instances, ids[i]);
		gone[found++] = inst;
	}
	mutex_unlock(&bpfilter_xt_lock);
	/* one grace period for the batch: a table's instances go together */
	bpfilter_xt_destroy_removed(gone, found);
	kvfree(gone);
	kvfree(ids);
	return found;
}

/* Every instance's namespace cookie and number, as many as fit at `info`: their count. */
static long bpfilter_xt_list(const struct bpfilter_xt_match *req)
{
	struct bpfilter_xt_instance_ref __user *out = u64_to_user_ptr(req->info);
	unsigned int room = req->info_size / sizeof(*out), total = 0;
	struct bpfilter_xt_instance_ref ref = {};
	struct bpfilter_xt_instance *inst;
	int id, err = 0;

	mutex_lock(&bpfilter_xt_lock);
	idr_for_each_entry(&bpfilter_xt_instances, inst, id) {
		if (total < room) {
			ref.netns_cookie = inst->cookie;
			ref.id = id;
			if (copy_to_user(&out[total], &ref, sizeof(ref))) {
				err = -EFAULT;
				break;
			}
		}
		total++;
	}
	mutex_unlock(&bpfilter_xt_lock);
	return err ?: total;
}

long bpfilter_xt_ioctl(unsigned int cmd, unsigned long arg)
{
	struct bpfilter_xt_match req;

	if (copy_from_user(&req, (const void __user *)arg, sizeof(req)))
		return -EFAULT;
	if (memchr_inv(req.pad, 0, sizeof(req.pad)) || req.pad2 || (req.entry_size && !req.target))
		return -EINVAL;
	if (cmd == BPFILTER_IOC_XT_MATCH_CREATE)
		return bpfilter_xt_create(&req, (void __user *)arg);
	if (cmd == BPFILTER_IOC_XT_MATCH_LIST)
		return bpfilter_xt_list(&req);
	return bpfilter_xt_release(&req);
}

/* Every instance of `net` (NULL: all), destroyed once no program runs them. */
static void bpfilter_xt_destroy_all(struct net *net)
{
	struct bpfilter_xt_instance *inst, **gone;
	unsigned int count = 0, i;
	int id;

	mutex_lock(&bpfilter_xt_lock);
	idr_for_each_entry(&bpfilter_xt_instances, inst, id)
		if (!net || inst->net == net)
			count++;
	gone = count ? kvcalloc(count, sizeof(*gone), GFP_KERNEL) : NULL;
	i = 0;
	idr_for_each_entry(&bpfilter_xt_instances, inst, id) {
		if (net && inst->net != net)
			continue;
		idr_remove(&bpfilter_xt_instances, id);
		if (gone) {
			gone[i++] = inst;
		} else {	/* no room to batch them: a grace period each */
			synchronize_net();
			bpfilter_xt_destroy(inst);
		}
	}
	mutex_unlock(&bpfilter_xt_lock);
	bpfilter_xt_destroy_removed(gone, i);
	kvfree(gone);
}

/*
 * Before the namespace's own exits: x_tables' extensions tear their per-namespace
 * state down in theirs (recent's /proc directory), as they expect ip_tables' rules
 * to be gone by then or to go right after.
 */
static void __net_exit bpfilter_xt_net_pre_exit(struct net *net)
{
	bpfilter_xt_destroy_all(net);
}

static struct pernet_operations bpfilter_xt_net_ops = {
	.pre_exit = bpfilter_xt_net_pre_exit,
};

/* The fragment and transport offsets ipt_do_table()/ip6t_do_table() give extensions. */
static bool bpfilter_xt_offsets(const struct bpfilter_xt_instance *inst, struct sk_buff *skb,
				struct xt_action_param *par)
{
	if (inst->family == NFPROTO_IPV4) {
		par->fragoff = ntohs(ip_hdr(skb)->frag_off) & IP_OFFSET;
		par->thoff = ip_hdrlen(skb);
	} else if (inst->ipv6_proto) {
		unsigned short fragoff = 0;
		int thoff = 0;

		/* the program walked the same headers before it called us */
		if (ipv6_find_hdr(skb, &thoff, -1, &fragoff, NULL) < 0)
			return false;
		par->thoff = thoff;
		par->fragoff = fragoff;
	}
	return true;
}

/* The namespace's and family's instance of that number, and of that kind. */
static struct bpfilter_xt_instance *bpfilter_xt_instance(const struct nf_hook_state *state,
							 u32 id, bool target)
{
	struct bpfilter_xt_instance *inst;

	if (!state->net)
		return NULL;
	inst = idr_find(&bpfilter_xt_instances, id);
	if (!inst || inst->net != state->net || inst->family != state->pf ||
	    !inst->target != !target)
		return NULL;
	return inst;
}

__bpf_kfunc_start_defs();

/**
 * bpfilter_xt_match - a rule's kernel match, as ipt_do_table()/ip6t_do_table() run it
 * @skb: the packet, from the program's context
 * @state: its hook state, from the program's context
 * @id: the instance BPFILTER_IOC_XT_MATCH_CREATE made for the rule's match
 *
 * The extension's ->match with the packet's fragment offset and transport header
 * offset as the table walk computes them, under local_bh_disable() as there.
 *
 * Return: enum bpfilter_xt_verdict: the match holds, does not, or set
 * par->hotdrop; also HOTDROP for an instance this namespace and family do not have
 * (never for the helper's programs; a packet is not let through on a doubt).
 */
__bpf_kfunc u32 bpfilter_xt_match(struct sk_buff *skb, const struct nf_hook_state *state, u32 id)
{
	struct bpfilter_xt_instance *inst = bpfilter_xt_instance(state, id, false);
	struct xt_action_param par = {};
	bool matched;

	if (!inst)
		return BPFILTER_XT_HOTDROP;
	par.match = inst->match;
	par.matchinfo = inst->info;
	par.state = state;
	if (!bpfilter_xt_offsets(inst, skb, &par))
		return BPFILTER_XT_HOTDROP;
	local_bh_disable();
	matched = inst->match->match(skb, &par);
	local_bh_enable();
	if (par.hotdrop)
		return BPFILTER_XT_HOTDROP;
	return matched ? BPFILTER_XT_MATCH : BPFILTER_XT_MISMATCH;
}

/**
 * bpfilter_xt_target - a rule's kernel target, as ipt_do_table()/ip6t_do_table() run it
 * @skb: the packet, from the program's context
 * @state: its hook state, from the program's context
 * @id: the instance BPFILTER_IOC_XT_MATCH_CREATE made for the rule's target
 *
 * The extension's ->target with the offsets the table walk computes, under
 * local_bh_disable() as there. A target that may take the packet holds a reference
 * of its own while it runs (see bpfilter_xt_stealing_targets).
 *
 * Return: its verdict: XT_CONTINUE to go on with the next rule, NF_ACCEPT, or NF_DROP
 * (also for a packet the target took, and for an instance this namespace and family
 * do not have).
 */
__bpf_kfunc u32 bpfilter_xt_target(struct sk_buff *skb, const struct nf_hook_state *state, u32 id)
{
	struct bpfilter_xt_instance *inst = bpfilter_xt_instance(state, id, true);
	struct xt_action_param par = {};
	unsigned int verdict;

	if (!inst)
		return NF_DROP;
	par.target = inst->target;
	par.targinfo = inst->info;
	par.state = state;
	if (!bpfilter_xt_offsets(inst, skb, &par))
		return NF_DROP;
	if (inst->steals)
		skb_get(skb);
	local_bh_disable();
	verdict = inst->target->target(skb, &par);
	local_bh_enable();
	if (!inst->steals)
		return verdict;
	if (verdict == NF_STOLEN)
		return NF_DROP;
	consume_skb(skb);
	return verdict;
}

__bpf_kfunc_end_defs();

int bpfilter_xt_init(void)
{
	return register_pernet_subsys(&bpfilter_xt_net_ops);
}

void bpfilter_xt_exit(void)
{
	unregister_pernet_subsys(&bpfilter_xt_net_ops);
	bpfilter_xt_destroy_all(NULL);
	idr_destroy(&bpfilter_xt_instances);
	if (bpfilter_xt_find)
		symbol_put(xt_request_find_match);
	if (bpfilter_xt_check)
		symbol_put(xt_check_match);
	if (bpfilter_xt_find_target)
		symbol_put(xt_request_find_target);
	if (bpfilter_xt_check_target)
		symbol_put(xt_check_target);
}
