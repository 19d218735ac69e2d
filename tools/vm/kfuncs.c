// SPDX-License-Identifier: GPL-2.0
/*
 * kfuncs: netfilter BPF programs that call bpfilter.ko's kfuncs directly, for the
 * guest, which has bpftool but neither a compiler nor Python. Built static, like
 * udp.c. The kfuncs are named by their type ids in the module's BTF and the
 * module's BTF object id (bpftool btf dump file /sys/kernel/btf/bpfilter,
 * bpftool btf show), 0 leaving a kfunc out (a module without it).
 *
 *   kfuncs probe DIR BTF_OBJ REJECT ADDR_TYPE ADDR_TYPE6 [NAT SET_MARK CONNMARK]
 *       pins DIR/prog, a program that calls every kfunc with the skb and the state
 *       of its context: bpfilter_reject() with 3, 6 and 7 (port-unreachable,
 *       host-prohibited and tcp-reset for IPv4; addr-unreach, tcp-reset and
 *       policy-fail for IPv6), bpfilter_addr_type() for 127.0.0.1 and
 *       bpfilter_addr_type6() for ::1, each with flags 0, limit-iface-in and
 *       limit-iface-out; bpfilter_nat() for each of its five targets with a zeroed
 *       struct nf_nat_range2, bpfilter_set_mark() (no answer), bpfilter_connmark()
 *       in each of its three modes (the low 32 bits of its answer); it keeps their
 *       answers in DIR/results and returns NF_ACCEPT. What BPF_PROG_TEST_RUN gives
 *       it is up to `bpftool prog run`.
 *   kfuncs hook DIR BTF_OBJ REJECT ADDR_TYPE6 FROM_SKB SLICE PF HOOKNUM WITH
 *       pins DIR/prog and DIR/link, a program attached at the netfilter hook
 *       HOOKNUM of family PF in the caller's namespace that drops every packet;
 *       for an IPv6 packet it first asks bpfilter_addr_type6() about the
 *       destination, then the source address, each with flags 0, limit-iface-in
 *       and limit-iface-out, then, unless WITH is -1, calls bpfilter_reject()
 *       with WITH. FROM_SKB and SLICE are the type ids of bpf_dynptr_from_skb
 *       and bpf_dynptr_slice in vmlinux's BTF (the header is read through them,
 *       as the helper's programs read it). DIR/results: reject, then the six
 *       answers.
 *   kfuncs results DIR
 *       the answers of the last run, in that order, as signed numbers ("-" for
 *       none: the program did not run, or left the kfunc out), then forgets them.
 *   kfuncs send6 SRC DST PORT
 *       one UDP datagram from SRC, any address, to DST (a raw socket: SRC need not
 *       be ours).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/ip6.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Newer than the host's uapi headers (Debian 12's are Linux 6.1's). */
#define BPF_PROG_TYPE_NETFILTER_ 32
#define BPF_NETFILTER_ 45

#define NF_DROP 0
#define NF_ACCEPT 1
#define XT_ADDRTYPE_LIMIT_IFACE_IN 4
#define XT_ADDRTYPE_LIMIT_IFACE_OUT 8

static const int reject_with[] = { 3, 6, 7 };
static const int addrtype_flags[] = { 0, XT_ADDRTYPE_LIMIT_IFACE_IN, XT_ADDRTYPE_LIMIT_IFACE_OUT };
#define NAT_HOWS 5
#define CONNMARK_MODES 3
#define NAT_RANGE2_SIZE 44
#define RESULTS (9 + NAT_HOWS + CONNMARK_MODES)
#define UNSET INT32_MIN

#define INSN(c, d, s, o, i) \
	((struct bpf_insn) { .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define MOV64_REG(d, s)		INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV64_IMM(d, i)		INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define LDX_DW(d, s, o)		INSN(BPF_LDX | BPF_MEM | BPF_DW, d, s, o, 0)
#define STX_DW(d, s, o)		INSN(BPF_STX | BPF_MEM | BPF_DW, d, s, o, 0)
#define ADD64_IMM(d, i)		INSN(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define JNE_IMM(d, i, o)	INSN(BPF_JMP | BPF_JNE | BPF_K, d, 0, o, i)
#define JEQ_IMM(d, i, o)	INSN(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, i)
#define STX_W(d, s, o)		INSN(BPF_STX | BPF_MEM | BPF_W, d, s, o, 0)
#define LD_IMM64_LO(d, s, v)	INSN(BPF_LD | BPF_DW | BPF_IMM, d, s, 0, (uint32_t)(v))
#define LD_IMM64_HI(v)		INSN(0, 0, 0, 0, (uint32_t)((uint64_t)(v) >> 32))
/* off: the module's BTF in fd_array */
#define CALL_KFUNC(id)		INSN(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_KFUNC_CALL, 1, id)
#define CALL_VMLINUX_KFUNC(id)	INSN(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_KFUNC_CALL, 0, id)
#define EXIT			INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)

static long sys_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(SYS_bpf, cmd, attr, sizeof(*attr));
}

static int fail(const char *what)
{
	fprintf(stderr, "kfuncs: %s: %s\n", what, strerror(errno));
	return 1;
}

static int pin(int fd, const char *dir, const char *name)
{
	char path[4096];
	union bpf_attr attr;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	memset(&attr, 0, sizeof(attr));
	attr.pathname = (uintptr_t)path;
	attr.bpf_fd = fd;
	return sys_bpf(BPF_OBJ_PIN, &attr) ? fail(path) : 0;
}

static int pinned(const char *dir, const char *name)
{
	char path[4096];
	union bpf_attr attr;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	memset(&attr, 0, sizeof(attr));
	attr.pathname = (uintptr_t)path;
	return sys_bpf(BPF_OBJ_GET, &attr);
}

static int results_reset(int map)
{
	int32_t value[RESULTS];
	union bpf_attr attr;
	uint32_t key = 0;
	int i;

	for (i = 0; i < RESULTS; i++)
		value[i] = UNSET;
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = map;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)value;
	return sys_bpf(BPF_MAP_UPDATE_ELEM, &attr) ? fail("results") : 0;
}

static int results_map(void)
{
	union bpf_attr attr;
	int map;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_ARRAY;
	attr.key_size = 4;
	attr.value_size = RESULTS * 4;
	attr.max_entries = 1;
	map = sys_bpf(BPF_MAP_CREATE, &attr);
	if (map < 0 || results_reset(map))
		return -1;
	return map;
}

static int load(const struct bpf_insn *insns, int count, int btf_fd)
{
	static char log[1 << 20];
	int fd_array[2] = { -1, btf_fd };
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_NETFILTER_;
	attr.expected_attach_type = BPF_NETFILTER_;
	attr.insns = (uintptr_t)insns;
	attr.insn_cnt = count;
	attr.license = (uintptr_t)"GPL";
	attr.fd_array = (uintptr_t)fd_array;
	attr.log_buf = (uintptr_t)log;
	attr.log_size = sizeof(log);
	attr.log_level = 1;
	fd = sys_bpf(BPF_PROG_LOAD, &attr);
	if (fd < 0)
		fprintf(stderr, "kfuncs: the verifier refused the program: %s\n%s", strerror(errno), log);
	return fd;
}

static int module_btf(int btf_obj)
{
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.btf_id = btf_obj;
	fd = sys_bpf(BPF_BTF_GET_FD_BY_ID, &attr);
	if (fd < 0)
		fail("the module's BTF");
	return fd;
}

static int probe(const char *dir, int btf_obj, int reject, int addr_type, int addr_type6,
		 int nat, int set_mark, int connmark)
{
	struct bpf_insn insns[256];
	int n = 0, slot = 0, map, prog, btf, i;

	btf = module_btf(btf_obj);
	map = results_map();
	if (btf < 0 || map < 0)
		return 1;

	/* r6 = ctx, r7 = ctx->state, r8 = ctx->skb, r9 = the results */
	insns[n++] = MOV64_REG(BPF_REG_6, BPF_REG_1);
	insns[n++] = LDX_DW(BPF_REG_7, BPF_REG_6, 0);
	insns[n++] = LDX_DW(BPF_REG_8, BPF_REG_6, 8);
	insns[n++] = LD_IMM64_LO(BPF_REG_9, BPF_PSEUDO_MAP_VALUE, map);
	insns[n++] = LD_IMM64_HI(0);
	for (i = 0; i < 3; i++, slot++) {
		if (!reject)
			continue;
		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_8);
		insns[n++] = MOV64_REG(BPF_REG_2, BPF_REG_7);
		insns[n++] = MOV64_IMM(BPF_REG_3, reject_with[i]);
		insns[n++] = CALL_KFUNC(reject);
		insns[n++] = STX_W(BPF_REG_9, BPF_REG_0, slot * 4);
	}
	for (i = 0; i < 3; i++, slot++) {
		if (!addr_type)
			continue;
		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_7);
		insns[n++] = MOV64_IMM(BPF_REG_2, 0x0100007f);	/* 127.0.0.1 as on the wire */
		insns[n++] = MOV64_IMM(BPF_REG_3, addrtype_flags[i]);
		insns[n++] = CALL_KFUNC(addr_type);
		insns[n++] = STX_W(BPF_REG_9, BPF_REG_0, slot * 4);
	}
	for (i = 0; i < 3; i++, slot++) {
		if (!addr_type6)
			continue;
		/* ::1: bytes 0-7 zero, bytes 8-15 00 .. 00 01 as a little-endian u64 */
		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_7);
		insns[n++] = MOV64_IMM(BPF_REG_2, 0);
		insns[n++] = LD_IMM64_LO(BPF_REG_3, 0, 1ULL << 56);
		insns[n++] = LD_IMM64_HI(1ULL << 56);
		insns[n++] = MOV64_IMM(BPF_REG_4, addrtype_flags[i]);
		insns[n++] = CALL_KFUNC(addr_type6);
		insns[n++] = STX_W(BPF_REG_9, BPF_REG_0, slot * 4);
	}
	for (i = 0; i < NAT_HOWS; i++, slot++) {
		if (!nat)
			continue;
		/* a zeroed range on the stack, 44 bytes at fp-48 */
		insns[n++] = MOV64_IMM(BPF_REG_1, 0);
		for (int at = -48; at < -4; at += 8)
			insns[n++] = STX_DW(BPF_REG_10, BPF_REG_1, at);
		insns[n++] = STX_W(BPF_REG_10, BPF_REG_1, -8);
		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_8);
		insns[n++] = MOV64_REG(BPF_REG_2, BPF_REG_7);
		insns[n++] = MOV64_REG(BPF_REG_3, BPF_REG_10);
		insns[n++] = ADD64_IMM(BPF_REG_3, -48);
		insns[n++] = MOV64_IMM(BPF_REG_4, NAT_RANGE2_SIZE);
		insns[n++] = MOV64_IMM(BPF_REG_5, i);
		insns[n++] = CALL_KFUNC(nat);
		insns[n++] = STX_W(BPF_REG_9, BPF_REG_0, slot * 4);
	}
	if (set_mark) {
		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_8);
		insns[n++] = MOV64_IMM(BPF_REG_2, 0x5);
		insns[n++] = MOV64_IMM(BPF_REG_3, 0xff);
		insns[n++] = CALL_KFUNC(set_mark);
	}
	for (i = 0; i < CONNMARK_MODES; i++, slot++) {
		if (!connmark)
			continue;
		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_8);
		insns[n++] = MOV64_IMM(BPF_REG_2, 0x5);
		insns[n++] = MOV64_IMM(BPF_REG_3, 0xff);
		insns[n++] = MOV64_IMM(BPF_REG_4, 0xff);
		insns[n++] = MOV64_IMM(BPF_REG_5, i);
		insns[n++] = CALL_KFUNC(connmark);
		insns[n++] = STX_W(BPF_REG_9, BPF_REG_0, slot * 4);
	}
	insns[n++] = MOV64_IMM(BPF_REG_0, NF_ACCEPT);
	insns[n++] = EXIT;

	prog = load(insns, n, btf);
	if (prog < 0)
		return 1;
	return pin(prog, dir, "prog") || pin(map, dir, "results");
}

/* BPF_LINK_CREATE's netfilter fields, which the host's headers lack. */
struct link_create_nf {
	uint32_t prog_fd, target_fd, attach_type, flags;
	uint32_t pf, hooknum;
	int32_t priority;
	uint32_t nf_flags;
};

static int hook(const char *dir, int btf_obj, int reject, int addr_type6, int from_skb, int slice,
		int pf, int hooknum, int with)
{
	/* the stack: the dynptr, the slice's buffer, the two addresses */
	enum { DYNPTR = -16, HEADER = -56, SADDR = -96, DADDR = -80 };
	struct link_create_nf nf = { .attach_type = BPF_NETFILTER_, .pf = pf, .hooknum = hooknum };
	struct bpf_insn insns[128];
	union bpf_attr attr;
	int n = 0, map, prog, btf, link, i, no_dynptr, no_header;

	btf = module_btf(btf_obj);
	map = results_map();
	if (btf < 0 || map < 0)
		return 1;

	insns[n++] = MOV64_REG(BPF_REG_6, BPF_REG_1);
	insns[n++] = LDX_DW(BPF_REG_7, BPF_REG_6, 0);
	insns[n++] = LDX_DW(BPF_REG_8, BPF_REG_6, 8);
	insns[n++] = LD_IMM64_LO(BPF_REG_9, BPF_PSEUDO_MAP_VALUE, map);
	insns[n++] = LD_IMM64_HI(0);
	/* bpf_dynptr_from_skb(skb, 0, &dynptr): at the hooks, skb->data is the IP header */
	insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_8);
	insns[n++] = MOV64_IMM(BPF_REG_2, 0);
	insns[n++] = MOV64_REG(BPF_REG_3, BPF_REG_10);
	insns[n++] = ADD64_IMM(BPF_REG_3, DYNPTR);
	insns[n++] = CALL_VMLINUX_KFUNC(from_skb);
	no_dynptr = n;
	insns[n++] = JNE_IMM(BPF_REG_0, 0, 0);
	/* bpf_dynptr_slice(&dynptr, 0, buffer, sizeof(struct ipv6hdr)) */
	insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_10);
	insns[n++] = ADD64_IMM(BPF_REG_1, DYNPTR);
	insns[n++] = MOV64_IMM(BPF_REG_2, 0);
	insns[n++] = MOV64_REG(BPF_REG_3, BPF_REG_10);
	insns[n++] = ADD64_IMM(BPF_REG_3, HEADER);
	insns[n++] = MOV64_IMM(BPF_REG_4, 40);
	insns[n++] = CALL_VMLINUX_KFUNC(slice);
	no_header = n;
	insns[n++] = JEQ_IMM(BPF_REG_0, 0, 0);
	/* saddr is at 8, daddr at 24: kept as the little-endian u64 pairs the kfunc takes */
	for (i = 0; i < 4; i++) {
		insns[n++] = LDX_DW(BPF_REG_1, BPF_REG_0, 8 + 8 * i);
		insns[n++] = STX_DW(BPF_REG_10, BPF_REG_1, SADDR + 8 * i);
	}
	for (i = 0; i < 6; i++) {
		int addr = i < 3 ? DADDR : SADDR;

		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_7);
		insns[n++] = LDX_DW(BPF_REG_2, BPF_REG_10, addr);
		insns[n++] = LDX_DW(BPF_REG_3, BPF_REG_10, addr + 8);
		insns[n++] = MOV64_IMM(BPF_REG_4, addrtype_flags[i % 3]);
		insns[n++] = CALL_KFUNC(addr_type6);
		insns[n++] = STX_W(BPF_REG_9, BPF_REG_0, 4 + 4 * i);
	}
	if (with >= 0) {
		insns[n++] = MOV64_REG(BPF_REG_1, BPF_REG_8);
		insns[n++] = MOV64_REG(BPF_REG_2, BPF_REG_7);
		insns[n++] = MOV64_IMM(BPF_REG_3, with);
		insns[n++] = CALL_KFUNC(reject);
		insns[n++] = STX_W(BPF_REG_9, BPF_REG_0, 0);
	}
	/* no IPv6 header to read: nothing asked */
	insns[no_dynptr].off = n - no_dynptr - 1;
	insns[no_header].off = n - no_header - 1;
	insns[n++] = MOV64_IMM(BPF_REG_0, NF_DROP);
	insns[n++] = EXIT;

	prog = load(insns, n, btf);
	if (prog < 0)
		return 1;
	nf.prog_fd = prog;
	memset(&attr, 0, sizeof(attr));
	memcpy(&attr, &nf, sizeof(nf));
	link = sys_bpf(BPF_LINK_CREATE, &attr);
	if (link < 0)
		return fail("netfilter link");
	return pin(prog, dir, "prog") || pin(map, dir, "results") || pin(link, dir, "link");
}

static uint16_t csum_add(uint32_t sum, const void *data, size_t len)
{
	const uint8_t *p = data;

	for (size_t i = 0; i < len; i += 2)
		sum += (p[i] << 8) | (i + 1 < len ? p[i + 1] : 0);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

static int send6(const char *src, const char *dst, int port)
{
	struct {
		struct ip6_hdr ip;
		struct udphdr udp;
		char data[1];
	} __attribute__((packed)) pkt = {
		.ip.ip6_flow = htonl(6 << 28),	/* the version; ip6_vfc shares its union */
		.ip.ip6_plen = htons(sizeof(pkt.udp) + sizeof(pkt.data)),
		.ip.ip6_nxt = IPPROTO_UDP,
		.ip.ip6_hlim = 64,
		.udp.source = htons(40000),
		.udp.dest = htons(port),
		.udp.len = htons(sizeof(pkt.udp) + sizeof(pkt.data)),
		.data = "x",
	};
	struct sockaddr_in6 to = { .sin6_family = AF_INET6 };
	uint32_t sum;
	int fd;

	if (inet_pton(AF_INET6, src, &pkt.ip.ip6_src) != 1 ||
	    inet_pton(AF_INET6, dst, &pkt.ip.ip6_dst) != 1) {
		fprintf(stderr, "kfuncs: not IPv6 addresses: %s %s\n", src, dst);
		return 2;
	}
	to.sin6_addr = pkt.ip.ip6_dst;
	/* the pseudo-header, then the datagram */
	sum = csum_add(0, &pkt.ip.ip6_src, 32);
	sum = csum_add(sum + IPPROTO_UDP + ntohs(pkt.udp.len), &pkt.udp, sizeof(pkt.udp) + 1);
	pkt.udp.check = htons(~sum & 0xffff) ?: 0xffff;
	/* IPPROTO_RAW: the header is ours, source included */
	fd = socket(AF_INET6, SOCK_RAW, IPPROTO_RAW);
	if (fd < 0)
		return fail("raw socket");
	if (sendto(fd, &pkt, sizeof(pkt), 0, (struct sockaddr *)&to, sizeof(to)) != sizeof(pkt))
		return fail("sendto");
	return 0;
}

static int results(const char *dir)
{
	int32_t value[RESULTS];
	union bpf_attr attr;
	uint32_t key = 0;
	int map = pinned(dir, "results"), i;

	if (map < 0)
		return fail("results map");
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = map;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)value;
	if (sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr))
		return fail("results");
	for (i = 0; i < RESULTS; i++) {
		if (value[i] == UNSET)
			printf("%s-", i ? " " : "");
		else
			printf("%s%d", i ? " " : "", value[i]);
	}
	printf("\n");
	return results_reset(map);
}

int main(int argc, char **argv)
{
	if ((argc == 7 || argc == 10) && !strcmp(argv[1], "probe"))
		return probe(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]),
			     argc == 10 ? atoi(argv[7]) : 0, argc == 10 ? atoi(argv[8]) : 0,
			     argc == 10 ? atoi(argv[9]) : 0);
	if (argc == 11 && !strcmp(argv[1], "hook"))
		return hook(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]),
			    atoi(argv[7]), atoi(argv[8]), atoi(argv[9]), atoi(argv[10]));
	if (argc == 3 && !strcmp(argv[1], "results"))
		return results(argv[2]);
	if (argc == 5 && !strcmp(argv[1], "send6"))
		return send6(argv[2], argv[3], atoi(argv[4]));
	fprintf(stderr, "usage: kfuncs probe DIR BTF_OBJ REJECT ADDR_TYPE ADDR_TYPE6 [NAT SET_MARK CONNMARK] | "
		"kfuncs hook DIR BTF_OBJ REJECT ADDR_TYPE6 FROM_SKB SLICE PF HOOKNUM WITH | "
		"kfuncs results DIR | kfuncs send6 SRC DST PORT\n");
	return 2;
}
