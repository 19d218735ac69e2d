// SPDX-License-Identifier: GPL-2.0
/*
 * The mangle table's OUTPUT hook: iptable_mangle's ipt_mangle_out() and
 * ip6table_mangle's ip6t_mangle_out(), around the helper's program instead of
 * ipt_do_table(). What decides a locally generated packet's route is noted before
 * the rules run (bpfilter_route_snapshot(), first thing in the program); if a rule
 * changed it and the verdict is not a drop, the packet is routed again with the
 * kernel's ip_route_me_harder() or ip6_route_me_harder() (bpfilter_reroute(), the
 * program's last call). Both are in bpfilter.c's kfunc set.
 */
#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/skbuff.h>
#include <net/ipv6.h>

#include "bpfilter_proto.h"

/* What the kernel compares; the program keeps it on its stack between the calls. */
struct bpfilter_route_snap {
	__u32 mark;
	__u32 first_word;	/* IPv6: version, traffic class and flow label */
	__u8 saddr[16];		/* IPv4: the first 4 bytes */
	__u8 daddr[16];
	__u8 tos;		/* IPv6: the hop limit */
	__u8 pad[7];
};

static_assert(sizeof(struct bpfilter_route_snap) == BPFILTER_ROUTE_SNAP_SIZE);

static void bpfilter_route_note(struct sk_buff *skb, u8 pf, struct bpfilter_route_snap *s)
{
	memset(s, 0, sizeof(*s));
	s->mark = skb->mark;
	if (pf == NFPROTO_IPV4) {
		const struct iphdr *iph = ip_hdr(skb);

		memcpy(s->saddr, &iph->saddr, sizeof(iph->saddr));
		memcpy(s->daddr, &iph->daddr, sizeof(iph->daddr));
		s->tos = iph->tos;
	} else {
		const struct ipv6hdr *ip6h = ipv6_hdr(skb);

		memcpy(s->saddr, &ip6h->saddr, sizeof(ip6h->saddr));
		memcpy(s->daddr, &ip6h->daddr, sizeof(ip6h->daddr));
		s->tos = ip6h->hop_limit;
		memcpy(&s->first_word, ip6h, sizeof(s->first_word));
	}
}

/* Only where the kernel's mangle table reroutes: a namespace's LOCAL_OUT, IPv4 or IPv6. */
static bool bpfilter_route_hook(const struct nf_hook_state *state)
{
	return state->net && state->hook == NF_INET_LOCAL_OUT &&
	       (state->pf == NFPROTO_IPV4 || state->pf == NFPROTO_IPV6);
}

__bpf_kfunc_start_defs();

/**
 * bpfilter_route_snapshot - what ipt_mangle_out()/ip6t_mangle_out() save before the rules
 * @skb: the packet, from the program's context
 * @state: its hook state, from the program's context
 * @snap: where to note it (struct bpfilter_route_snap, on the program's stack)
 * @snap__sz: its size, BPFILTER_ROUTE_SNAP_SIZE
 *
 * Return: 0, or -EINVAL (another hook, no namespace, or a wrong size): nothing noted.
 */
__bpf_kfunc int bpfilter_route_snapshot(struct sk_buff *skb, const struct nf_hook_state *state,
					void *snap, u32 snap__sz)
{
	if (snap__sz != sizeof(struct bpfilter_route_snap) || !bpfilter_route_hook(state))
		return -EINVAL;
	bpfilter_route_note(skb, state->pf, snap);
	return 0;
}

/**
 * bpfilter_reroute - what ipt_mangle_out()/ip6t_mangle_out() do after the rules
 * @skb: the packet, from the program's context
 * @state: its hook state, from the program's context
 * @snap: what bpfilter_route_snapshot() noted before the rules ran
 * @snap__sz: its size
 * @verdict: the rules' verdict
 *
 * A packet the rules let through whose addresses, mark or TOS (IPv6: hop limit,
 * traffic class or flow label) they changed is routed again.
 *
 * Return: @verdict, or NF_DROP if routing it again failed (the kernel's hook says
 * why with NF_DROP_ERR(), which a netfilter program cannot return).
 */
__bpf_kfunc u32 bpfilter_reroute(struct sk_buff *skb, const struct nf_hook_state *state,
				 void *snap, u32 snap__sz, u32 verdict)
{
	struct bpfilter_route_snap now;
	int err;

	if (snap__sz != sizeof(now) || !bpfilter_route_hook(state) || verdict != NF_ACCEPT)
		return verdict;
	bpfilter_route_note(skb, state->pf, &now);
	if (!memcmp(&now, snap, sizeof(now)))
		return verdict;
	if (state->pf == NFPROTO_IPV4)
		err = ip_route_me_harder(state->net, state->sk, skb, RTN_UNSPEC);
	else
		err = ip6_route_me_harder(state->net, state->sk, skb);
	return err < 0 ? NF_DROP : verdict;
}

__bpf_kfunc_end_defs();
