// SPDX-License-Identifier: GPL-2.0
/*
 * kfuncs: netfilter BPF programs that call bpfilter.ko's kfuncs directly, for the
 * guest, which has bpftool but neither a compiler nor Python. Built static, like
 * udp.c. The kfuncs are named by their type ids in the module's BTF and the
 * module's BTF object id (bpftool btf dump file /sys/kernel/btf/bpfilter,
 * bpftool btf show), 0 leaving a kfunc out (a module without it).
 *
 *   kfuncs probe DIR BTF_OBJ REJECT ADDR_TYPE ADDR_TYPE6
 *       pins DIR/prog, a program that calls every kfunc with the skb and the state
 *       of its context: bpfilter_reject() with 3, 6 and 7 (port-unreachable,
 *       host-prohibited and tcp-reset for IPv4; addr-unreach, tcp-reset and
 *       policy-fail for IPv6), bpfilter_addr_type() for 127.0.0.1 and
 *       bpfilter_addr_type6() for ::1, each with flags 0, limit-iface-in and
 *       limit-iface-out; it keeps their answers in DIR/results and returns
 *       NF_ACCEPT. What BPF_PROG_TEST_RUN gives it is up to `bpftool prog run`.
 *   kfuncs results DIR
 *       the answers of the last run, in that order, as signed numbers ("-" for
 *       none: the program did not run, or left the kfunc out), then forgets them.
 */
#include <errno.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Newer than the host's uapi headers (Debian 12's are Linux 6.1's). */
#define BPF_PROG_TYPE_NETFILTER_ 32
#define BPF_NETFILTER_ 45

#define NF_ACCEPT 1
#define XT_ADDRTYPE_LIMIT_IFACE_IN 4
#define XT_ADDRTYPE_LIMIT_IFACE_OUT 8

static const int reject_with[] = { 3, 6, 7 };
static const int addrtype_flags[] = { 0, XT_ADDRTYPE_LIMIT_IFACE_IN, XT_ADDRTYPE_LIMIT_IFACE_OUT };
#define RESULTS 9
#define UNSET INT32_MIN

#define INSN(c, d, s, o, i) \
	((struct bpf_insn) { .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define MOV64_REG(d, s)		INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define MOV64_IMM(d, i)		INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define LDX_DW(d, s, o)		INSN(BPF_LDX | BPF_MEM | BPF_DW, d, s, o, 0)
#define STX_W(d, s, o)		INSN(BPF_STX | BPF_MEM | BPF_W, d, s, o, 0)
#define LD_IMM64_LO(d, s, v)	INSN(BPF_LD | BPF_DW | BPF_IMM, d, s, 0, (uint32_t)(v))
#define LD_IMM64_HI(v)		INSN(0, 0, 0, 0, (uint32_t)((uint64_t)(v) >> 32))
/* off: the module's BTF in fd_array */
#define CALL_KFUNC(id)		INSN(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_KFUNC_CALL, 1, id)
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

static int probe(const char *dir, int btf_obj, int reject, int addr_type, int addr_type6)
{
	struct bpf_insn insns[128];
	union bpf_attr attr;
	int n = 0, slot = 0, map, prog, btf, i;

	memset(&attr, 0, sizeof(attr));
	attr.btf_id = btf_obj;
	btf = sys_bpf(BPF_BTF_GET_FD_BY_ID, &attr);
	if (btf < 0)
		return fail("the module's BTF");
	map = results_map();
	if (map < 0)
		return fail("results map");

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
	insns[n++] = MOV64_IMM(BPF_REG_0, NF_ACCEPT);
	insns[n++] = EXIT;

	prog = load(insns, n, btf);
	if (prog < 0)
		return 1;
	return pin(prog, dir, "prog") || pin(map, dir, "results");
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
	if (argc == 7 && !strcmp(argv[1], "probe"))
		return probe(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
	if (argc == 3 && !strcmp(argv[1], "results"))
		return results(argv[2]);
	fprintf(stderr, "usage: kfuncs probe DIR BTF_OBJ REJECT ADDR_TYPE ADDR_TYPE6 | "
		"kfuncs results DIR\n");
	return 2;
}
