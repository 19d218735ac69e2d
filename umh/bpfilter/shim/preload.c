// SPDX-License-Identifier: GPL-2.0
/*
 * The LD_PRELOAD shim of `bpfilter exec`: it stands where bpfilter.ko would, so
 * that an unmodified, dynamically linked iptables-legacy talks to the translator
 * service without a kernel module. The iptables and ip6tables socket options
 * and the /proc files naming their tables go to the service (kmod/bpfilter_proto.h);
 * everything else reaches libc untouched.
 *
 * No Python API is used: setuptools builds this as an "extension" only so that
 * installing the package produces it.
 *
 * Every call makes its own connection and keeps its state on the stack, so the
 * shim is as thread-safe as the kernel calls it replaces.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

/* After netinet/in.h, so that linux/libc-compat.h drops the duplicates. */
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4/ip_tables.h>
#include <linux/netfilter_ipv6/ip6_tables.h>

#include "bpfilter_proto.h"

#define DEFAULT_SOCKET "/run/bpfilter/bpfilter.sock"
#define IPT_NAMES "/proc/net/ip_tables_names"
#define IP6T_NAMES "/proc/net/ip6_tables_names"

/* Setuptools compiles with Python's CFLAGS, which this file does not control. */
#define EXPORT __attribute__((visibility("default")))

/* The counters pointer is read at one offset for both families. */
_Static_assert(offsetof(struct ipt_replace, counters) ==
	       offsetof(struct ip6t_replace, counters), "ip6t_replace layout");
_Static_assert(offsetof(struct ipt_replace, num_counters) ==
	       offsetof(struct ip6t_replace, num_counters), "ip6t_replace layout");

typedef int getsockopt_fn(int, int, int, void *, socklen_t *);
typedef int setsockopt_fn(int, int, int, const void *, socklen_t);
typedef FILE *fopen_fn(const char *, const char *);

static void *next_getsockopt, *next_setsockopt, *next_fopen, *next_fopen64;

/*
 * Resolved on first use rather than in a constructor: another library's
 * constructor may call fopen before ours has run. Threads racing here store
 * the same value.
 */
static void *next(void **slot, const char *name)
{
	void *fn = __atomic_load_n(slot, __ATOMIC_ACQUIRE);

	if (!fn) {
		fn = dlsym(RTLD_NEXT, name);
		if (!fn) {
			fprintf(stderr, "bpfilter: the preload shim cannot find %s: %s\n",
				name, dlerror());
			abort();
		}
		__atomic_store_n(slot, fn, __ATOMIC_RELEASE);
	}
	return fn;
}

static int real_getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
{
	getsockopt_fn *fn = next(&next_getsockopt, "getsockopt");

	return fn(fd, level, optname, optval, optlen);
}

/* The NFPROTO_* family whose iptables owns this option, or 0 for the kernel's. */
static int forwarded(int fd, int level, int optname, bool get)
{
	int want, domain;
	socklen_t len = sizeof(domain);

	if (level == SOL_IP) {
		want = AF_INET;
		if (get ? optname < IPT_SO_GET_INFO || optname > IPT_SO_GET_REVISION_TARGET
			: optname != IPT_SO_SET_REPLACE && optname != IPT_SO_SET_ADD_COUNTERS)
			return 0;
	} else if (level == SOL_IPV6) {
		want = AF_INET6;
		if (get ? optname != IP6T_SO_GET_INFO && optname != IP6T_SO_GET_ENTRIES &&
			  optname != IP6T_SO_GET_REVISION_MATCH &&
			  optname != IP6T_SO_GET_REVISION_TARGET
			: optname != IP6T_SO_SET_REPLACE && optname != IP6T_SO_SET_ADD_COUNTERS)
			return 0;
	} else {
		return 0;
	}
	/* A failure here (not a socket, say) recurs, with its errno, in the kernel's call. */
	if (real_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 || domain != want)
		return 0;
	return want == AF_INET ? NFPROTO_IPV4 : NFPROTO_IPV6;
}

static const char *service_path(void)
{
	const char *path = getenv("BPFILTER_SOCKET");

	return path && *path ? path : DEFAULT_SOCKET;
}

static int fail(int err)
{
	errno = err;
	return -1;
}

static int unreachable(const char *path, int err)
{
	fprintf(stderr, "bpfilter: cannot reach the bpfilter service at %s: %s\n",
		path, strerror(err));
	return fail(ECONNREFUSED);
}

/* EFAULT is the caller's bad pointer, answered as the kernel would: silently. */
static int lost(const char *path, int err)
{
	if (err != EFAULT)
		fprintf(stderr, "bpfilter: lost the bpfilter service at %s: %s\n",
			path, strerror(err));
	return fail(err);
}

static int bad_reply(const char *path, const char *why)
{
	fprintf(stderr, "bpfilter: bad reply from the bpfilter service at %s: %s\n", path, why);
	return fail(EPROTO);
}

static int write_full(int sock, const void *buf, size_t len)
{
	while (len) {
		ssize_t n = send(sock, buf, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf = (const char *)buf + n;
		len -= n;
	}
	return 0;
}

static int read_full(int sock, void *buf, size_t len)
{
	while (len) {
		ssize_t n = recv(sock, buf, len, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (n == 0)
			return fail(ECONNRESET);
		buf = (char *)buf + n;
		len -= n;
	}
	return 0;
}

/* The netns fd rides with the first bytes; the rest may take more sends. */
static int send_request(int sock, const struct bpfilter_request *req, const void *payload, int ns)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov[2] = {
		{ .iov_base = (void *)req, .iov_len = sizeof(*req) },
		{ .iov_base = (void *)payload, .iov_len = req->len },
	};
	struct msghdr msg = {
		.msg_iov = iov,
		.msg_iovlen = 2,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
	size_t sent;
	ssize_t n;

	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &ns, sizeof(int));
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -1;
	sent = n;
	if (sent < sizeof(*req)) {
		if (write_full(sock, (const char *)req + sent, sizeof(*req) - sent) < 0)
			return -1;
		sent = sizeof(*req);
	}
	sent -= sizeof(*req);
	return write_full(sock, (const char *)payload + sent, req->len - sent);
}

/*
 * Sends req (op, family, optname and len filled in) with its payload and the
 * calling thread's netns, and reads a well-formed reply header. Returns the
 * connection, for the caller to read the reply payload where it belongs, or
 * -1 with errno set.
 */
static int ask(struct bpfilter_request *req, const void *payload,
	       struct bpfilter_reply *reply, const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct stat st;
	int sock, ns, err;

	if (req->len > BPFILTER_MAX_PAYLOAD)
		return fail(ENOMEM);
	if (strlen(path) >= sizeof(addr.sun_path))
		return unreachable(path, ENAMETOOLONG);
	strcpy(addr.sun_path, path);

	ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (ns < 0 || fstat(ns, &st) < 0) {
		err = errno;
		fprintf(stderr, "bpfilter: cannot open this thread's network namespace: %s\n",
			strerror(err));
		if (ns >= 0)
			close(ns);
		return fail(err);
	}
	req->magic = BPFILTER_MAGIC;
	req->version = BPFILTER_PROTO_VERSION;
	req->netns_cookie = 0;
	req->netns_inum = st.st_ino;
	req->pid = gettid();
	req->netns_fd = -1;

	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		err = errno;
		close(ns);
		return unreachable(path, err);
	}
	while (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		if (errno == EINTR)
			continue;
		err = errno;
		close(ns);
		close(sock);
		return unreachable(path, err);
	}
	err = send_request(sock, req, payload, ns) < 0 ||
	      read_full(sock, reply, sizeof(*reply)) < 0 ? errno : 0;
	close(ns);
	if (err) {
		close(sock);
		return lost(path, err);
	}
	if (reply->magic != BPFILTER_MAGIC || reply->version != BPFILTER_PROTO_VERSION) {
		close(sock);
		return bad_reply(path, "wrong magic or version");
	}
	if (reply->status > 0 || reply->status < -4095) {
		close(sock);
		return bad_reply(path, "status is not 0 or -errno");
	}
	if (reply->len > BPFILTER_MAX_PAYLOAD) {
		close(sock);
		return bad_reply(path, "payload too large");
	}
	return sock;
}

/*
 * A refusal's payload says which rule and why: the caller's stderr is where a
 * person running iptables will look, next to iptables' own "line N failed".
 */
static void print_refusal(int sock, uint32_t len)
{
	char message[4096];
	size_t size = len < sizeof(message) - 1 ? len : sizeof(message) - 1;

	if (size && read_full(sock, message, size) == 0) {
		message[size] = '\0';
		fprintf(stderr, "bpfilter: %s\n", message);
	}
}

/* Reads the reply payload into dst, closes the connection and returns the status. */
static int finish(int sock, const struct bpfilter_reply *reply, void *dst, const char *path)
{
	int err = reply->status == 0 && read_full(sock, dst, reply->len) < 0 ? errno : 0;

	if (reply->status)
		print_refusal(sock, reply->len);
	close(sock);
	if (err)
		return lost(path, err);
	return reply->status ? fail(-reply->status) : 0;
}

/*
 * Copies between the caller's memory and ours through the kernel, as its
 * get_user() and put_user() would: a bad pointer is EFAULT, not a crash.
 */
static bool user_copy(void *to, const void *from, size_t len, bool out)
{
	struct iovec local = { .iov_base = out ? (void *)from : to, .iov_len = len };
	struct iovec remote = { .iov_base = out ? to : (void *)from, .iov_len = len };
	ssize_t n = out ? process_vm_writev(getpid(), &local, 1, &remote, 1, 0)
			: process_vm_readv(getpid(), &local, 1, &remote, 1, 0);

	return n == (ssize_t)len;
}

EXPORT int getsockopt(int fd, int level, int optname, void *restrict optval,
		      socklen_t *restrict optlen)
{
	socklen_t len;
	int family = forwarded(fd, level, optname, true);
	const char *path = service_path();
	struct bpfilter_request req;
	struct bpfilter_reply reply;
	int sock;

	if (!family)
		return real_getsockopt(fd, level, optname, optval, optlen);
	if (!optlen || !user_copy(&len, optlen, sizeof(len), false))
		return fail(EFAULT);
	/* Only what the kernel would read: iptables' buffer for the entries may be large. */
	req = (struct bpfilter_request){
		.op = BPFILTER_OP_GETSOCKOPT, .family = family, .optname = optname,
		.len = bpfilter_get_reads(family, optname, len), .optlen = len,
	};
	sock = ask(&req, optval, &reply, path);
	if (sock < 0)
		return -1;
	if (reply.status == 0 && reply.len > len) {
		close(sock);
		return bad_reply(path, "more bytes than the caller's optlen");
	}
	if (finish(sock, &reply, optval, path) < 0)
		return -1;
	len = reply.len;
	if (!user_copy(optlen, &len, sizeof(len), true))
		return fail(EFAULT);
	return 0;
}

/*
 * The kernel writes the replaced table's counters to ipt_replace.counters once the
 * new table is in place, and a pointer it cannot write to fails nothing (it only
 * warns): the counters are copied the same way, through the kernel, which refuses a
 * bad pointer with EFAULT instead of crashing the caller. False when the reply does
 * not fit the room the caller announced (a protocol error).
 */
static bool put_counters(int sock, const void *optval, socklen_t optlen, uint32_t len)
{
	struct ipt_replace repl;
	struct iovec local, remote;
	void *buf;
	bool ok;

	if (optlen < sizeof(repl))
		return false;
	memcpy(&repl, optval, sizeof(repl));
	if (len > (uint64_t)repl.num_counters * sizeof(struct xt_counters))
		return false;
	buf = malloc(len);
	if (!buf)
		return false;
	ok = read_full(sock, buf, len) == 0;
	if (ok) {
		local = (struct iovec){ .iov_base = buf, .iov_len = len };
		remote = (struct iovec){ .iov_base = repl.counters, .iov_len = len };
		process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
	}
	free(buf);
	return ok;
}

EXPORT int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
{
	int family = forwarded(fd, level, optname, false);
	const char *path = service_path();
	struct bpfilter_request req;
	struct bpfilter_reply reply;
	int sock;

	if (!family) {
		setsockopt_fn *fn = next(&next_setsockopt, "setsockopt");

		return fn(fd, level, optname, optval, optlen);
	}
	req = (struct bpfilter_request){
		.op = BPFILTER_OP_SETSOCKOPT, .family = family, .optname = optname, .len = optlen,
		.optlen = optlen,
	};
	sock = ask(&req, optval, &reply, path);
	if (sock < 0)
		return -1;
	if (reply.status == 0 && reply.len) {
		/* IPT_SO_SET_REPLACE == IP6T_SO_SET_REPLACE */
		if (optname != IPT_SO_SET_REPLACE ||
		    !put_counters(sock, optval, optlen, reply.len)) {
			close(sock);
			return bad_reply(path, "payload the caller has no room for");
		}
		reply.len = 0;
	}
	return finish(sock, &reply, NULL, path);
}

/* The NFPROTO_* family whose table names path lists, or 0 for any other file. */
static int names_file(const char *path, const char *mode)
{
	if (!path || !mode || mode[0] != 'r' || strchr(mode, '+'))
		return 0;
	if (!strcmp(path, IPT_NAMES))
		return NFPROTO_IPV4;
	if (!strcmp(path, IP6T_NAMES))
		return NFPROTO_IPV6;
	return 0;
}

/* The service's table list as a stream that owns its buffer, so fclose frees all. */
static FILE *table_names(int family)
{
	struct bpfilter_request req = { .op = BPFILTER_OP_TABLE_NAMES, .family = family };
	const char *path = service_path();
	struct bpfilter_reply reply;
	FILE *file;
	char *buf;
	int sock, err;

	sock = ask(&req, NULL, &reply, path);
	if (sock < 0)
		return NULL;
	buf = malloc(reply.len + 1);
	if (!buf) {
		close(sock);
		fail(ENOMEM);
		return NULL;
	}
	if (finish(sock, &reply, buf, path) < 0) {
		free(buf);
		return NULL;
	}
	/* One spare byte: a "w+" memory stream NUL-terminates what it holds. */
	file = fmemopen(NULL, reply.len + 1, "w+");
	if (file && (fwrite(buf, 1, reply.len, file) != reply.len || fseek(file, 0, SEEK_SET))) {
		err = errno;
		fclose(file);
		file = NULL;
		errno = err;
	}
	free(buf);
	return file;
}

EXPORT FILE *fopen(const char *path, const char *mode)
{
	int family = names_file(path, mode);
	fopen_fn *fn;

	if (family)
		return table_names(family);
	fn = next(&next_fopen, "fopen");
	return fn(path, mode);
}

EXPORT FILE *fopen64(const char *path, const char *mode)
{
	int family = names_file(path, mode);
	fopen_fn *fn;

	if (family)
		return table_names(family);
	fn = next(&next_fopen64, "fopen64");
	return fn(path, mode);
}
