// SPDX-License-Identifier: GPL-2.0
/*
 * Packet tracing: ipt_do_table() and ip6t_do_table() log every rule a packet with
 * skb->nf_trace set (the TRACE target's work, or nftables') passes, through the
 * kernel's nf_log_trace(), as "TRACE: table:chain:type:rulenum ". The helper's
 * programs call bpfilter_trace() where they count a rule, with the table's trace
 * info (struct bpfilter_trace_info, a BPF map value the helper wrote); it names the
 * rule as trace_packet()'s walk of the entries from the hook's first one does.
 */
#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/netfilter.h>
#include <linux/printk.h>
#include <linux/skbuff.h>
#include <net/netfilter/nf_log.h>

#include "bpfilter_proto.h"

/* ip_tables.c's trace_loginfo */
static const struct nf_loginfo bpfilter_trace_loginfo = {
	.type = NF_LOG_TYPE_LOG,
	.u = {
		.log = {
			.level = LOGLEVEL_WARNING,
			.logflags = NF_LOG_DEFAULT_MASK,
		},
	},
};

__bpf_kfunc_start_defs();

/**
 * bpfilter_trace - trace_packet() for the rule at @entry
 * @skb: the packet, from the program's context
 * @state: its hook state, from the program's context
 * @info: the table's struct bpfilter_trace_info
 * @info__sz: its size
 * @entry: the entry's index in the table
 *
 * The program calls it only when skb->nf_trace is set. The rule's chain is the last
 * one starting at or before it; an entry the info does not cover logs nothing.
 */
__bpf_kfunc void bpfilter_trace(struct sk_buff *skb, const struct nf_hook_state *state,
				const void *info, u32 info__sz, u32 entry)
{
#if IS_ENABLED(CONFIG_NETFILTER_XT_TARGET_TRACE)
	const struct bpfilter_trace_info *ti = info;
	const struct bpfilter_trace_chain *chain;
	const u8 *tails;
	u32 lo, hi, rulenum;
	bool builtin, tail;

	if (info__sz < sizeof(*ti) || !ti->chains ||
	    ti->chains > (info__sz - sizeof(*ti)) / sizeof(*chain) || entry >= ti->entries)
		return;
	tails = (const u8 *)&ti->chain[ti->chains];
	if (entry / 8 >= info__sz - (tails - (const u8 *)info))
		return;
	lo = 0;
	hi = ti->chains;
	while (hi - lo > 1) {
		u32 mid = lo + (hi - lo) / 2;

		if (ti->chain[mid].first <= entry)
			lo = mid;
		else
			hi = mid;
	}
	chain = &ti->chain[lo];
	if (chain->first > entry)
		return;
	builtin = chain->flags & BPFILTER_TRACE_BUILTIN;
	/* a user chain's ERROR head is its rule 0; a built-in chain has none */
	rulenum = entry - chain->first + builtin;
	tail = tails[entry / 8] & (1 << (entry % 8));
	nf_log_trace(state->net, state->pf, state->hook, skb, state->in, state->out,
		     &bpfilter_trace_loginfo, "TRACE: %.*s:%.*s:%s:%u ",
		     (int)strnlen(ti->table, sizeof(ti->table)), ti->table,
		     (int)strnlen(chain->name, sizeof(chain->name)), chain->name,
		     tail ? (builtin ? "policy" : "return") : "rule", rulenum);
#endif
}

__bpf_kfunc_end_defs();
