// SPDX-License-Identifier: GPL-2.0
/*
 * The nat table through the kernel's own NAT core.
 *
 * iptable_nat does not hook the packet path itself: it gives nf_nat a lookup
 * function per hook (nf_nat_ipv4_register_fn()), which nf_nat_inet_fn() calls only
 * for a connection whose binding of that manip type is not set up yet, and which
 * sets one up by calling nf_nat_setup_info() from its targets. A connection no rule
 * binds gets the null binding from nf_nat itself; every later packet, and every
 * reply, is translated by nf_nat from the binding in the conntrack entry.
 *
 * bpfilter does the same: the helper hands us, per namespace, family and hook, the
 * netfilter BPF program of its nat chain, and we register a lookup that runs it.
 * The program calls bpfilter_nat() for SNAT, DNAT, MASQUERADE, REDIRECT and NETMAP,
 * which calls what xt_nat, xt_MASQUERADE, xt_REDIRECT and xt_NETMAP call (the kfuncs
 * are in bpfilter.c's set: a module registers one set per program type).
 *
 * A lookup stays registered when the helper dies (the bindings are the kernel's, the
 * program ours to keep), until the helper detaches it, its namespace goes or the
 * module is unloaded.
 */
#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/btf_ids.h>
#include <linux/filter.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_bpf_link.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_nat.h>
#include <net/netfilter/nf_nat_masquerade.h>
#include <net/netfilter/nf_nat_redirect.h>
#include <net/route.h>

#include "bpfilter_nat.h"
#include "bpfilter_proto.h"

struct bpfilter_nat_lookup {
	struct list_head list;		/* in bpfilter_nat_lookups */
	struct net *net;		/* not counted: the namespace drops us on its way out */
	u64 cookie;			/* its net_cookie, which no other namespace ever has */
	struct nf_hook_ops ops;		/* ops.priv is this lookup */
	struct bpf_prog __rcu *prog;
};

static LIST_HEAD(bpfilter_nat_lookups);
static DEFINE_MUTEX(bpfilter_nat_lock);

static unsigned int bpfilter_nat_run(void *priv, struct sk_buff *skb,
				     const struct nf_hook_state *state)
{
	struct bpfilter_nat_lookup *lookup = priv;
	struct bpf_nf_ctx ctx = { .state = state, .skb = skb };
	struct bpf_prog *prog = rcu_dereference(lookup->prog);

	/* As nf_hook_run_bpf() runs a netfilter link's program. */
	return prog ? bpf_prog_run_pin_on_cpu(prog, &ctx) : NF_ACCEPT;
}

static int bpfilter_nat_register(struct bpfilter_nat_lookup *lookup)
{
	if (lookup->ops.pf == NFPROTO_IPV4)
		return nf_nat_ipv4_register_fn(lookup->net, &lookup->ops);
	return nf_nat_ipv6_register_fn(lookup->net, &lookup->ops);
}

/* Unregistered, then freed once no packet can be running its program. */
static void bpfilter_nat_free(struct bpfilter_nat_lookup *lookup)
{
	if (lookup->ops.pf == NFPROTO_IPV4)
		nf_nat_ipv4_unregister_fn(lookup->net, &lookup->ops);
	else
		nf_nat_ipv6_unregister_fn(lookup->net, &lookup->ops);
	list_del(&lookup->list);
	synchronize_net();
	bpf_prog_put(rcu_dereference_protected(lookup->prog, 1));
	kfree(lookup);
}

static struct bpfilter_nat_lookup *bpfilter_nat_find(u64 cookie, u8 pf, unsigned int hook)
{
	struct bpfilter_nat_lookup *lookup;

	list_for_each_entry(lookup, &bpfilter_nat_lookups, list)
		if (lookup->cookie == cookie && lookup->ops.pf == pf &&
		    lookup->ops.hooknum == hook)
			return lookup;
	return NULL;
}

static bool bpfilter_nat_hook_valid(unsigned int hook)
{
	return hook == NF_INET_PRE_ROUTING || hook == NF_INET_LOCAL_IN ||
	       hook == NF_INET_LOCAL_OUT || hook == NF_INET_POST_ROUTING;
}

static long bpfilter_nat_attach(const struct bpfilter_nat_attach *req)
{
	struct bpfilter_nat_lookup *lookup, *found;
	struct bpf_prog *prog, *old;
	struct net *net;
	long err = 0;

	net = get_net_ns_by_fd(req->netns_fd);
	if (IS_ERR(net))
		return PTR_ERR(net);
	prog = bpf_prog_get_type_dev(req->prog_fd, BPF_PROG_TYPE_NETFILTER, false);
	if (IS_ERR(prog)) {
		err = PTR_ERR(prog);
		goto out_net;
	}
	if (prog->expected_attach_type != BPF_NETFILTER) {
		err = -EINVAL;
		goto out_prog;
	}
	mutex_lock(&bpfilter_nat_lock);
	found = bpfilter_nat_find(net->net_cookie, req->family, req->hook);
	if (found) {
		/* A replace: the next connection meets the new program. */
		old = rcu_replace_pointer(found->prog, prog, lockdep_is_held(&bpfilter_nat_lock));
		prog = NULL;
		synchronize_net();
		bpf_prog_put(old);
		goto out_unlock;
	}
	lookup = kzalloc(sizeof(*lookup), GFP_KERNEL);
	if (!lookup) {
		err = -ENOMEM;
		goto out_unlock;
	}
	lookup->net = net;
	lookup->cookie = net->net_cookie;
	lookup->ops.hook = bpfilter_nat_run;
	lookup->ops.priv = lookup;
	lookup->ops.pf = req->family;
	lookup->ops.hooknum = req->hook;
	lookup->ops.priority = req->priority;
	RCU_INIT_POINTER(lookup->prog, prog);
	err = bpfilter_nat_register(lookup);
	if (err) {
		kfree(lookup);
		goto out_unlock;
	}
	prog = NULL;
	list_add(&lookup->list, &bpfilter_nat_lookups);
out_unlock:
	mutex_unlock(&bpfilter_nat_lock);
out_prog:
	if (prog)
		bpf_prog_put(prog);
out_net:
	put_net(net);
	return err;
}

long bpfilter_nat_ioctl(unsigned int cmd, unsigned long arg)
{
	struct bpfilter_nat_lookup *found;
	struct bpfilter_nat_attach req;
	long err = 0;

	if (copy_from_user(&req, (const void __user *)arg, sizeof(req)))
		return -EFAULT;
	if ((req.family != NFPROTO_IPV4 && req.family != NFPROTO_IPV6) ||
	    !bpfilter_nat_hook_valid(req.hook) || req.pad)
		return -EINVAL;
	if (cmd == BPFILTER_IOC_NAT_ATTACH)
		return bpfilter_nat_attach(&req);
	mutex_lock(&bpfilter_nat_lock);
	found = bpfilter_nat_find(req.netns_cookie, req.family, req.hook);
	if (!found)
		err = -ENOENT;
	else if (cmd == BPFILTER_IOC_NAT_DETACH)
		bpfilter_nat_free(found);
	mutex_unlock(&bpfilter_nat_lock);
	return err;
}

/* As iptable_nat's pre_exit: the lookups go before the namespace's NAT core does. */
static void __net_exit bpfilter_nat_net_pre_exit(struct net *net)
{
	struct bpfilter_nat_lookup *lookup, *next;

	mutex_lock(&bpfilter_nat_lock);
	list_for_each_entry_safe(lookup, next, &bpfilter_nat_lookups, list)
		if (lookup->net == net)
			bpfilter_nat_free(lookup);
	mutex_unlock(&bpfilter_nat_lock);
}

static struct pernet_operations bpfilter_nat_net_ops = {
	.pre_exit = bpfilter_nat_net_pre_exit,
};

__bpf_kfunc_start_defs();

/**
 * bpfilter_nat - what the nat table's targets do for a connection's first packet
 * @skb: the packet, from the program's context
 * @state: its hook state, from the program's context
 * @range: the rule's struct nf_nat_range2 (xt_nat's revision 2 payload; the older
 *         payloads converted as xt_nat_convert_range() and the targets convert them)
 * @range__sz: sizeof(struct nf_nat_range2)
 * @how: enum bpfilter_nat_how: which target
 *
 * SNAT and DNAT call nf_nat_setup_info() as xt_nat's targets do; MASQUERADE
 * nf_nat_masquerade_ipv4()/_ipv6() with the output device; REDIRECT
 * nf_nat_redirect_ipv4()/_ipv6(); NETMAP maps the address as netmap_tg4()/_tg6()
 * do, then nf_nat_setup_info(). Only where nf_nat_inet_fn() would call a nat table:
 * a hook the target is valid at, a connection being tracked whose binding of the
 * hook's manip type is not set up yet.
 *
 * Return: the target's verdict (NF_ACCEPT, or NF_DROP when no binding can be made);
 * -EINVAL, nothing done, anywhere else (BPF_PROG_TEST_RUN, another hook, ...).
 */
__bpf_kfunc int bpfilter_nat(struct sk_buff *skb, const struct nf_hook_state *state,
			     const void *range, u32 range__sz, u32 how)
{
	const struct nf_nat_range2 *r = range;
	struct nf_nat_range2 mapped;
	enum ip_conntrack_info ctinfo;
	unsigned int hook = state->hook;
	enum nf_nat_manip_type manip = HOOK2MANIP(hook);
	struct nf_conn *ct;

	if (!state->net || range__sz != sizeof(*r) ||
	    (state->pf != NFPROTO_IPV4 && state->pf != NFPROTO_IPV6) ||
	    !bpfilter_nat_hook_valid(hook))
		return -EINVAL;
	ct = nf_ct_get(skb, &ctinfo);
	if (!ct || nf_ct_is_template(ct) || nf_ct_is_confirmed(ct) ||
	    nf_nat_initialized(ct, manip) ||
	    (ctinfo != IP_CT_NEW && ctinfo != IP_CT_RELATED && ctinfo != IP_CT_RELATED_REPLY))
		return -EINVAL;
	switch (how) {
	case BPFILTER_NAT_SNAT:
		if (manip != NF_NAT_MANIP_SRC)
			return -EINVAL;
		return nf_nat_setup_info(ct, r, NF_NAT_MANIP_SRC);
	case BPFILTER_NAT_DNAT:
		if (manip != NF_NAT_MANIP_DST)
			return -EINVAL;
		return nf_nat_setup_info(ct, r, NF_NAT_MANIP_DST);
	case BPFILTER_NAT_MASQUERADE:
		if (hook != NF_INET_POST_ROUTING || !state->out)
			return -EINVAL;
		if (state->pf == NFPROTO_IPV4) {
			if (!skb_rtable(skb))
				return -EINVAL;
			return nf_nat_masquerade_ipv4(skb, hook, r, state->out);
		}
		return nf_nat_masquerade_ipv6(skb, r, state->out);
	case BPFILTER_NAT_REDIRECT:
		if (hook != NF_INET_PRE_ROUTING && hook != NF_INET_LOCAL_OUT)
			return -EINVAL;
		if (hook == NF_INET_PRE_ROUTING && !skb->dev)
			return -EINVAL;
		if (state->pf == NFPROTO_IPV4)
			return nf_nat_redirect_ipv4(skb, r, hook);
		return nf_nat_redirect_ipv6(skb, r, hook);
	case BPFILTER_NAT_NETMAP:
		mapped = *r;
		mapped.flags |= NF_NAT_RANGE_MAP_IPS;
		if (state->pf == NFPROTO_IPV4) {
			__be32 netmask = ~(r->min_addr.ip ^ r->max_addr.ip);
			__be32 addr = manip == NF_NAT_MANIP_DST ? ip_hdr(skb)->daddr
								 : ip_hdr(skb)->saddr;

			memset(&mapped.min_addr, 0, sizeof(mapped.min_addr));
			mapped.min_addr.ip = (addr & ~netmask) | (r->min_addr.ip & netmask);
		} else {
			const struct in6_addr *addr = manip == NF_NAT_MANIP_DST ?
				&ipv6_hdr(skb)->daddr : &ipv6_hdr(skb)->saddr;
			int i;

			for (i = 0; i < ARRAY_SIZE(mapped.min_addr.ip6); i++) {
				__be32 netmask = ~(r->min_addr.ip6[i] ^ r->max_addr.ip6[i]);

				mapped.min_addr.ip6[i] = (addr->s6_addr32[i] & ~netmask) |
							 (r->min_addr.ip6[i] & netmask);
			}
		}
		mapped.max_addr = mapped.min_addr;
		memset(&mapped.base_proto, 0, sizeof(mapped.base_proto));
		return nf_nat_setup_info(ct, &mapped, manip);
	default:
		return -EINVAL;
	}
}

__bpf_kfunc_end_defs();

int bpfilter_nat_init(void)
{
	int err;

	/* What loading xt_MASQUERADE does: its bindings go with their device or address. */
	err = nf_nat_masquerade_inet_register_notifiers();
	if (err)
		return err;
	err = register_pernet_subsys(&bpfilter_nat_net_ops);
	if (err)
		nf_nat_masquerade_inet_unregister_notifiers();
	return err;
}

void bpfilter_nat_exit(void)
{
	struct bpfilter_nat_lookup *lookup, *next;

	unregister_pernet_subsys(&bpfilter_nat_net_ops);
	mutex_lock(&bpfilter_nat_lock);
	list_for_each_entry_safe(lookup, next, &bpfilter_nat_lookups, list)
		bpfilter_nat_free(lookup);
	mutex_unlock(&bpfilter_nat_lock);
	nf_nat_masquerade_inet_unregister_notifiers();
}
