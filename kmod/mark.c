// SPDX-License-Identifier: GPL-2.0
/*
 * What MARK and CONNMARK do, for the helper's netfilter programs: a netfilter BPF
 * program may read skb->mark but not write it, and cannot reach the conntrack
 * entry's mark at all. Each kfunc does what its target's function does (xt_mark's
 * mark_tg(), xt_connmark's connmark_tg_shift(), both static), conntrack event
 * included; they are in bpfilter.c's kfunc set.
 */
#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/skbuff.h>
#include <linux/netfilter/xt_connmark.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_ecache.h>

__bpf_kfunc_start_defs();

/**
 * bpfilter_set_mark - what xt_mark's mark_tg() does: skb->mark = (skb->mark & ~mask) ^ mark
 * @skb: the packet, from the program's context
 * @mark: the rule's xt_mark_tginfo2 mark
 * @mask: its mask
 */
__bpf_kfunc void bpfilter_set_mark(struct sk_buff *skb, u32 mark, u32 mask)
{
	skb->mark = (skb->mark & ~mask) ^ mark;
}

/**
 * bpfilter_connmark - what xt_connmark's connmark_tg_shift() does
 * @skb: the packet, from the program's context
 * @ctmark: the rule's xt_connmark_tginfo2 ctmark
 * @ctmask: its ctmask
 * @nfmask: its nfmask
 * @how: its mode | shift_dir << 8 | shift_bits << 16 (revision 1: no shift)
 *
 * XT_CONNMARK_SET and XT_CONNMARK_SAVE write the conntrack entry's mark, with the
 * IPCT_MARK event when it changes; XT_CONNMARK_RESTORE writes skb->mark. Nothing
 * without a conntrack entry, or for a mode or shift the target does not have.
 *
 * Return: the mark written (the entry's, or the packet's for RESTORE) | 1 << 32, so
 * that the program's later tests see it; 0 if nothing was written.
 */
__bpf_kfunc u64 bpfilter_connmark(struct sk_buff *skb, u32 ctmark, u32 ctmask, u32 nfmask,
				  u32 how)
{
	u32 mode = how & 0xff, shift_dir = (how >> 8) & 0xff, shift_bits = (how >> 16) & 0xff;
	enum ip_conntrack_info ctinfo;
	u32 newmark, new_targetmark;
	struct nf_conn *ct;

	if (shift_dir > D_SHIFT_RIGHT || shift_bits >= 32)
		return 0;
	ct = nf_ct_get(skb, &ctinfo);
	if (!ct)
		return 0;
	switch (mode) {
	case XT_CONNMARK_SET:
		newmark = (READ_ONCE(ct->mark) & ~ctmask) ^ ctmark;
		newmark = shift_dir == D_SHIFT_RIGHT ? newmark >> shift_bits : newmark << shift_bits;
		break;
	case XT_CONNMARK_SAVE:
		new_targetmark = skb->mark & nfmask;
		new_targetmark = shift_dir == D_SHIFT_RIGHT ? new_targetmark >> shift_bits
							    : new_targetmark << shift_bits;
		newmark = (READ_ONCE(ct->mark) & ~ctmask) ^ new_targetmark;
		break;
	case XT_CONNMARK_RESTORE:
		new_targetmark = READ_ONCE(ct->mark) & ctmask;
		new_targetmark = shift_dir == D_SHIFT_RIGHT ? new_targetmark >> shift_bits
							    : new_targetmark << shift_bits;
		skb->mark = (skb->mark & ~nfmask) ^ new_targetmark;
		return BIT_ULL(32) | skb->mark;
	default:
		return 0;
	}
	if (READ_ONCE(ct->mark) != newmark) {
		WRITE_ONCE(ct->mark, newmark);
		nf_conntrack_event_cache(IPCT_MARK, ct);
	}
	return BIT_ULL(32) | newmark;
}

__bpf_kfunc_end_defs();
