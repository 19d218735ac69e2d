// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's UDP traffic, built static so it needs nothing from the initramfs:
 * busybox nc sends one datagram per run and cannot say how many it received.
 *
 * ADDR is IPv4 or IPv6, an IPv6 one with its zone if it needs one (ff02::1%eth0);
 * recv and serve listen on both.
 *
 *   udp send ADDR PORT COUNT   COUNT one-byte datagrams to ADDR:PORT
 *   udp recv PORT SECONDS      print how many datagrams arrived on PORT in SECONDS
 *   udp serve PORT SECONDS [peers|drain|headers|transparent]
 *                              for SECONDS, echo UDP datagrams and accept TCP
 *                              connections on PORT (so that only a firewall can
 *                              refuse them); with "peers", a line for each, with the
 *                              address and port it came from (what NAT made of it);
 *                              with "drain", each connection reset once accepted
 *                              (for connrate: a server that keeps up); with
 *                              "headers", as "peers" and what the headers said: a
 *                              datagram's TTL (hop limit) and TOS (traffic class), a
 *                              connection's MSS (TCP_MAXSEG: the SYN's MSS option,
 *                              less the options every segment carries) and the
 *                              options it agreed (TCP_INFO: sack, ts, wscale, ecn,
 *                              as the SYN offered them); and each
 *                              echo sent from the address its datagram was sent
 *                              to (for a server with several); with
 *                              "transparent", as "peers", its TCP sockets
 *                              IP_TRANSPARENT (a TPROXY target's), and the address
 *                              each connection was made to
 *   udp connrate ADDR PORT SECONDS
 *                              TCP connections to ADDR:PORT one after another for
 *                              SECONDS, each reset once made: "connections N in
 *                              MS ms, failed F"
 *   udp ask ADDR PORT [SIZE [FROM]]
 *                              one datagram (SIZE bytes, default 1) from a connect()ed
 *                              socket (bound to the local address FROM), then what
 *                              came back within 2 s: "reply", "no reply", or the error
 *                              an ICMP answer raised (REJECT, conntrack's RELATED)
 *   udp connect ADDR PORT      a TCP connect() of two SYNs: "connected", "no answer"
 *                              (both went unanswered), or its error (a reset:
 *                              "Connection refused")
 *   udp solicit ADDR HOPS      a neighbour solicitation for the IPv6 address ADDR, sent
 *                              to ADDR itself with hop limit HOPS, then within 2 s:
 *                              "advertised" (ADDR's neighbour advertisement came
 *                              back) or "no advertisement"; the kernel answers only a
 *                              hop limit of 255, firewalls often look at it too
 */
#define _GNU_SOURCE	/* struct in6_pktinfo */
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/icmp6.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_DATAGRAM 65536

static char buf[MAX_DATAGRAM];

static int usage(void)
{
	fprintf(stderr, "usage: udp send ADDR PORT COUNT | udp recv PORT SECONDS | "
		"udp serve PORT SECONDS [peers|drain|headers|transparent] | udp connrate ADDR PORT SECONDS | udp ask ADDR PORT [SIZE [FROM]] | udp connect ADDR PORT | "
		"udp solicit ADDR HOPS\n");
	return 2;
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* The socket address of ADDR:PORT, IPv4 or IPv6; its length, 0 if ADDR is neither. */
static socklen_t peer(const char *addr, int port, struct sockaddr_storage *to)
{
	struct sockaddr_in *in = (struct sockaddr_in *)to;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)to;
	char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 1], *zone;

	memset(to, 0, sizeof(*to));
	if (inet_pton(AF_INET, addr, &in->sin_addr) == 1) {
		in->sin_family = AF_INET;
		in->sin_port = htons(port);
		return sizeof(*in);
	}
	snprintf(host, sizeof(host), "%s", addr);
	zone = strchr(host, '%');
	if (zone) {
		*zone++ = '\0';
		in6->sin6_scope_id = if_nametoindex(zone);
		if (!in6->sin6_scope_id)
			return 0;
	}
	if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(port);
		return sizeof(*in6);
	}
	return 0;
}

/*
 * A socket of `type` bound to PORT of every address of `family`; an IPv6 one only
 * for IPv6 (its IPv4 twin is the other socket). -1 after saying why.
 */
static int bound(int family, int type, int port)
{
	struct sockaddr_in me4 = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct sockaddr_in6 me6 = { .sin6_family = AF_INET6, .sin6_port = htons(port) };
	int fd = socket(family, type, 0), one = 1;

	if (fd < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    (family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one))) ||
	    (family == AF_INET ? bind(fd, (struct sockaddr *)&me4, sizeof(me4))
			       : bind(fd, (struct sockaddr *)&me6, sizeof(me6))) ||
	    (type == SOCK_STREAM && listen(fd, 16))) {
		perror("bind");
		return -1;
	}
	return fd;
}

static int do_send(const char *addr, int port, int count)
{
	struct sockaddr_storage to;
	socklen_t len = peer(addr, port, &to);
	int on = 1, fd;

	if (!len)
		return usage();
	fd = socket(to.ss_family, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	/* Broadcast destinations too (addrtype BROADCAST rules). */
	if (setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &on, sizeof(on))) {
		perror("SO_BROADCAST");
		return 1;
	}
	for (int i = 0; i < count; i++) {
		/* A DROP on the far side is silent, so every send should succeed. */
		if (sendto(fd, "x", 1, 0, (struct sockaddr *)&to, len) != 1) {
			perror("sendto");
			return 1;
		}
	}
	printf("sent %d\n", count);
	return 0;
}

static int do_recv(int port, int seconds)
{
	long deadline = now_ms() + seconds * 1000L;
	struct pollfd p[2] = {
		{ .fd = bound(AF_INET, SOCK_DGRAM, port), .events = POLLIN },
		{ .fd = bound(AF_INET6, SOCK_DGRAM, port), .events = POLLIN },
	};
	int received = 0;

	if (p[0].fd < 0 || p[1].fd < 0)
		return 1;
	/* The sender starts after us; tell the scenario when it may. */
	printf("listening %d\n", port);
	fflush(stdout);
	for (long left; (left = deadline - now_ms()) > 0;) {
		int n = poll(p, 2, (int)left);

		if (n < 0 && errno != EINTR) {
			perror("poll");
			return 1;
		}
		for (int i = 0; n > 0 && i < 2; i++)
			if (p[i].revents & POLLIN && recv(p[i].fd, buf, sizeof(buf), 0) >= 0)
				received++;
	}
	printf("received %d\n", received);
	return 0;
}

/* "udp|tcp from ADDR port PORT" for a datagram or connection from `from`. */
/* The address of `sa` as text into `host`; its port. */
static int address_and_port(const struct sockaddr_storage *sa, char host[INET6_ADDRSTRLEN])
{
	const void *addr;
	int port;

	if (sa->ss_family == AF_INET) {
		addr = &((const struct sockaddr_in *)sa)->sin_addr;
		port = ntohs(((const struct sockaddr_in *)sa)->sin_port);
	} else {
		addr = &((const struct sockaddr_in6 *)sa)->sin6_addr;
		port = ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
	}
	inet_ntop(sa->ss_family, addr, host, INET6_ADDRSTRLEN);
	return port;
}

static void print_peer(const char *proto, const struct sockaddr_storage *from)
{
	char host[INET6_ADDRSTRLEN];
	int port = address_and_port(from, host);

	printf("%s from %s port %s\n", proto, host, port < 1024 ? "low" : "high");
	fflush(stdout);
}

static void reset(int fd);

enum serve_mode { SERVE_QUIET, SERVE_PEERS, SERVE_DRAIN, SERVE_HEADERS, SERVE_TRANSPARENT };

/*
 * A datagram's TTL and TOS (IPv6: hop limit and traffic class), from its cmsgs; its
 * destination address kept in `reply` (a cmsg for sendmsg) so that the echo leaves
 * from it.
 */
static void print_headers(struct msghdr *msg, struct msghdr *reply)
{
	struct cmsghdr *out = CMSG_FIRSTHDR(reply);
	int ttl = -1, tos = -1;

	reply->msg_controllen = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
		if ((c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) ||
		    (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO)) {
			memcpy(out, c, c->cmsg_len);
			if (c->cmsg_level == IPPROTO_IP) {
				struct in_pktinfo *info = (struct in_pktinfo *)CMSG_DATA(out);

				info->ipi_spec_dst = info->ipi_addr;
				info->ipi_ifindex = 0;
			} else {
				((struct in6_pktinfo *)CMSG_DATA(out))->ipi6_ifindex = 0;
			}
			reply->msg_controllen = CMSG_SPACE(c->cmsg_len - CMSG_LEN(0));
		}
		if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_TTL)
			memcpy(&ttl, CMSG_DATA(c), sizeof(ttl));
		else if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_TOS)
			tos = *(unsigned char *)CMSG_DATA(c);
		else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_HOPLIMIT)
			memcpy(&ttl, CMSG_DATA(c), sizeof(ttl));
		else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_TCLASS)
			memcpy(&tos, CMSG_DATA(c), sizeof(tos));
	}
	printf("  ttl %d tos 0x%02x\n", ttl, tos);
	fflush(stdout);
}

static int do_serve(int port, int seconds, enum serve_mode mode)
{
	int peers = mode == SERVE_PEERS || mode == SERVE_HEADERS || mode == SERVE_TRANSPARENT;
	int drain = mode == SERVE_DRAIN;
	static const int on = 1;
	char control[256], reply_control[256];
	long deadline = now_ms() + seconds * 1000L;
	/* UDP then TCP, IPv4 then IPv6 */
	struct pollfd p[4] = {
		{ .fd = bound(AF_INET, SOCK_DGRAM, port), .events = POLLIN },
		{ .fd = bound(AF_INET6, SOCK_DGRAM, port), .events = POLLIN },
		{ .fd = bound(AF_INET, SOCK_STREAM, port), .events = POLLIN },
		{ .fd = bound(AF_INET6, SOCK_STREAM, port), .events = POLLIN },
	};
	int echoed = 0, accepted = 0;

	for (int i = 0; i < 4; i++)
		if (p[i].fd < 0)
			return 1;
	if (mode == SERVE_HEADERS &&
	    (setsockopt(p[0].fd, IPPROTO_IP, IP_RECVTTL, &on, sizeof(on)) ||
	     setsockopt(p[0].fd, IPPROTO_IP, IP_RECVTOS, &on, sizeof(on)) ||
	     setsockopt(p[0].fd, IPPROTO_IP, IP_PKTINFO, &on, sizeof(on)) ||
	     setsockopt(p[1].fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &on, sizeof(on)) ||
	     setsockopt(p[1].fd, IPPROTO_IPV6, IPV6_RECVHOPLIMIT, &on, sizeof(on)) ||
	     setsockopt(p[1].fd, IPPROTO_IPV6, IPV6_RECVTCLASS, &on, sizeof(on)))) {
		perror("setsockopt");
		return 1;
	}
	if (mode == SERVE_TRANSPARENT &&
	    (setsockopt(p[2].fd, IPPROTO_IP, IP_TRANSPARENT, &on, sizeof(on)) ||
	     setsockopt(p[3].fd, IPPROTO_IPV6, IPV6_TRANSPARENT, &on, sizeof(on)))) {
		perror("setsockopt");
		return 1;
	}
	printf("listening %d\n", port);
	fflush(stdout);
	for (long left; (left = deadline - now_ms()) > 0;) {
		if (poll(p, 4, (int)left) < 0 && errno != EINTR) {
			perror("poll");
			return 1;
		}
		for (int i = 0; i < 2; i++) {
			struct sockaddr_storage from;
			struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
			struct msghdr msg = {
				.msg_name = &from, .msg_namelen = sizeof(from), .msg_iov = &iov,
				.msg_iovlen = 1, .msg_control = control,
				.msg_controllen = sizeof(control),
			};
			struct msghdr reply = {
				.msg_name = &from, .msg_iov = &iov, .msg_iovlen = 1,
				.msg_control = reply_control,
				.msg_controllen = sizeof(reply_control),
			};
			ssize_t n;

			if (!(p[i].revents & POLLIN))
				continue;
			n = recvmsg(p[i].fd, &msg, 0);
			if (n < 0)
				continue;
			if (peers)
				print_peer("udp", &from);
			reply.msg_namelen = msg.msg_namelen;
			iov.iov_len = n;
			if (mode == SERVE_HEADERS)
				print_headers(&msg, &reply);
			else
				reply.msg_controllen = 0;
			if (!reply.msg_controllen)
				reply.msg_control = NULL;
			if (sendmsg(p[i].fd, &reply, 0) == n)
				echoed++;
		}
		for (int i = 2; i < 4; i++) {
			struct sockaddr_storage from;
			socklen_t len = sizeof(from);

			int fd;

			/* Left open: the client's reset ends it, and nothing more is sent. */
			if (p[i].revents & POLLIN &&
			    (fd = accept(p[i].fd, (struct sockaddr *)&from, &len)) >= 0) {
				accepted++;
				if (peers)
					print_peer("tcp", &from);
				if (mode == SERVE_HEADERS) {
					int mss = -1;
					socklen_t size = sizeof(mss);

					struct tcp_info info = { 0 };
					socklen_t info_size = sizeof(info);

					getsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, &size);
					printf("  mss %d\n", mss);
					getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &info_size);
					printf("  options%s%s%s%s\n",
					       info.tcpi_options & TCPI_OPT_SACK ? " sack" : "",
					       info.tcpi_options & TCPI_OPT_TIMESTAMPS ? " ts" : "",
					       info.tcpi_options & TCPI_OPT_WSCALE ? " wscale" : "",
					       info.tcpi_options & TCPI_OPT_ECN ? " ecn" : "");
					fflush(stdout);
				}
				if (mode == SERVE_TRANSPARENT) {
					struct sockaddr_storage to;
					char host[INET6_ADDRSTRLEN];
					socklen_t to_len = sizeof(to);
					int to_port;

					getsockname(fd, (struct sockaddr *)&to, &to_len);
					to_port = address_and_port(&to, host);
					printf("  to %s port %d\n", host, to_port);
					fflush(stdout);
				}
				if (drain)
					reset(fd);
			}
		}
	}
	printf("echoed %d accepted %d\n", echoed, accepted);
	return 0;
}

static void reset(int fd)
{
	static const struct linger abort_now = { .l_onoff = 1, .l_linger = 0 };

	setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_now, sizeof(abort_now));
	close(fd);
}

static int do_connrate(const char *addr, int port, int seconds)
{
	struct sockaddr_storage to;
	socklen_t tolen = peer(addr, port, &to);
	long start = now_ms(), deadline = start + 1000L * seconds;
	long made = 0, failed = 0;

	if (!tolen)
		return usage();
	while (now_ms() < deadline) {
		int fd = socket(to.ss_family, SOCK_STREAM, 0), one = 1;

		if (fd < 0) {
			perror("socket");
			return 1;
		}
		/* an unanswered connection fails after one retransmission, not minutes */
		setsockopt(fd, IPPROTO_TCP, TCP_SYNCNT, &one, sizeof(one));
		if (connect(fd, (struct sockaddr *)&to, tolen) == 0)
			made++;
		else
			failed++;
		reset(fd);
	}
	printf("connections %ld in %ld ms, failed %ld\n", made, now_ms() - start, failed);
	return 0;
}

static int do_ask(const char *addr, int port, int size, const char *from)
{
	struct sockaddr_storage to, me;
	socklen_t len = peer(addr, port, &to), melen = from ? peer(from, 0, &me) : 0;
	struct pollfd p = { .events = POLLIN };
	int fd;

	if (!len || size < 1 || size > MAX_DATAGRAM || (from && melen != len))
		return usage();
	fd = p.fd = socket(to.ss_family, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	if (from && bind(fd, (struct sockaddr *)&me, melen)) {
		perror("bind");
		return 1;
	}
	if (connect(fd, (struct sockaddr *)&to, len)) {
		perror("connect");
		return 1;
	}
	/* An error the send itself meets (a REJECT at OUTPUT) is the answer too. */
	memset(buf, 'x', size);
	if (send(fd, buf, size, 0) != size) {
		printf("%s\n", strerror(errno));
		return 0;
	}
	if (poll(&p, 1, 2000) <= 0)
		printf("no reply\n");
	else if (recv(fd, buf, sizeof(buf), 0) < 0)
		printf("%s\n", strerror(errno));
	else
		printf("reply\n");
	return 0;
}

static int do_connect(const char *addr, int port)
{
	static const struct linger abort_now = { .l_onoff = 1, .l_linger = 0 };
	struct sockaddr_storage to;
	socklen_t tolen = peer(addr, port, &to), len = sizeof(int);
	struct pollfd p = { .events = POLLOUT };
	int fd, err = 0, one = 1;

	if (!tolen)
		return usage();
	fd = p.fd = socket(to.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	/*
	 * One retransmission, then the kernel gives up: an unanswered connect sends
	 * exactly two SYNs however slow the guest runs, where waiting a fixed time
	 * races the retransmission timer, and the scenarios compare counters.
	 */
	setsockopt(fd, IPPROTO_TCP, TCP_SYNCNT, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&to, tolen))
		err = errno;
	if (err == EINPROGRESS) {
		if (poll(&p, 1, 30000) <= 0) {
			printf("no answer\n");
			return 0;
		}
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
	}
	if (err == ETIMEDOUT) {
		printf("no answer\n");
		return 0;
	}
	printf("%s\n", err ? strerror(err) : "connected");
	/*
	 * Ended with a reset: a FIN exchange's packets depend on timing, and the
	 * scenario compares counters.
	 */
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_now, sizeof(abort_now));
	close(fd);
	return 0;
}

static int do_solicit(const char *addr, int hops)
{
	struct sockaddr_storage to;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&to;
	socklen_t len = peer(addr, 0, &to);
	/* No source link-layer address option: the neighbour entries are static. */
	struct nd_neighbor_solicit ns = { .nd_ns_type = ND_NEIGHBOR_SOLICIT };
	const struct nd_neighbor_advert *na = (const void *)buf;
	struct pollfd p = { .events = POLLIN };
	long deadline = now_ms() + 2000;
	struct icmp6_filter filter;
	int fd;

	if (len != sizeof(*in6) || hops < 0 || hops > 255)
		return usage();
	ICMP6_FILTER_SETBLOCKALL(&filter);
	ICMP6_FILTER_SETPASS(ND_NEIGHBOR_ADVERT, &filter);
	fd = p.fd = socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6);
	if (fd < 0 ||
	    setsockopt(fd, IPPROTO_ICMPV6, ICMP6_FILTER, &filter, sizeof(filter)) ||
	    setsockopt(fd, IPPROTO_IPV6, IPV6_UNICAST_HOPS, &hops, sizeof(hops))) {
		perror("socket");
		return 1;
	}
	ns.nd_ns_target = in6->sin6_addr;
	/* The kernel fills in an ICMPv6 raw socket's checksum. */
	if (sendto(fd, &ns, sizeof(ns), 0, (struct sockaddr *)&to, len) != sizeof(ns)) {
		printf("%s\n", strerror(errno));
		return 0;
	}
	for (long left; (left = deadline - now_ms()) > 0;) {
		if (poll(&p, 1, (int)left) <= 0)
			break;
		if (recv(fd, buf, sizeof(buf), 0) >= (ssize_t)sizeof(*na) &&
		    !memcmp(&na->nd_na_target, &in6->sin6_addr, sizeof(in6->sin6_addr))) {
			printf("advertised\n");
			return 0;
		}
	}
	printf("no advertisement\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "send"))
		return do_send(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc >= 4 && argc <= 6 && !strcmp(argv[1], "ask"))
		return do_ask(argv[2], atoi(argv[3]), argc >= 5 ? atoi(argv[4]) : 1,
			      argc == 6 ? argv[5] : NULL);
	if (argc == 4 && !strcmp(argv[1], "recv"))
		return do_recv(atoi(argv[2]), atoi(argv[3]));
	if (argc >= 4 && argc <= 5 && !strcmp(argv[1], "serve")) {
		static const char *const modes[] = { "", "peers", "drain", "headers", "transparent" };
		const char *mode = argc == 5 ? argv[4] : "";

		for (int m = 0; m < 5; m++)
			if (!strcmp(mode, modes[m]))
				return do_serve(atoi(argv[2]), atoi(argv[3]), m);
		return usage();
	}
	if (argc == 5 && !strcmp(argv[1], "connrate"))
		return do_connrate(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc == 4 && !strcmp(argv[1], "connect"))
		return do_connect(argv[2], atoi(argv[3]));
	if (argc == 4 && !strcmp(argv[1], "solicit"))
		return do_solicit(argv[2], atoi(argv[3]));
	return usage();
}
