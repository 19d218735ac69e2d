// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's UDP traffic, built static so it needs nothing from the initramfs:
 * busybox nc sends one datagram per run and cannot say how many it received.
 *
 * ADDR is IPv4 or IPv6 (recv and serve listen on IPv4 only).
 *
 *   udp send ADDR PORT COUNT   COUNT one-byte datagrams to ADDR:PORT
 *   udp recv PORT SECONDS      print how many datagrams arrived on PORT in SECONDS
 *   udp serve PORT SECONDS     for SECONDS, echo UDP datagrams and accept TCP
 *                              connections on PORT (so that only a firewall can
 *                              refuse them)
 *   udp ask ADDR PORT          one datagram from a connect()ed socket, then what
 *                              came back within 2 s: "reply", "no reply", or the
 *                              error an ICMP answer raised (REJECT, conntrack's RELATED)
 *   udp connect ADDR PORT      a TCP connect() within 2 s: "connected", "no answer",
 *                              or its error (a reset: "Connection refused")
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int usage(void)
{
	fprintf(stderr, "usage: udp send ADDR PORT COUNT | udp recv PORT SECONDS | "
		"udp serve PORT SECONDS | udp ask ADDR PORT | udp connect ADDR PORT\n");
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

	memset(to, 0, sizeof(*to));
	if (inet_pton(AF_INET, addr, &in->sin_addr) == 1) {
		in->sin_family = AF_INET;
		in->sin_port = htons(port);
		return sizeof(*in);
	}
	if (inet_pton(AF_INET6, addr, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(port);
		return sizeof(*in6);
	}
	return 0;
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

static int do_recv(int fd, int port, int seconds)
{
	struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons(port) };
	long deadline = now_ms() + seconds * 1000L;
	int received = 0;
	char buf[2048];

	if (bind(fd, (struct sockaddr *)&me, sizeof(me))) {
		perror("bind");
		return 1;
	}
	/* The sender starts after us; tell the scenario when it may. */
	printf("listening %d\n", port);
	fflush(stdout);
	for (long left; (left = deadline - now_ms()) > 0;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int n = poll(&p, 1, (int)left);

		if (n < 0 && errno != EINTR) {
			perror("poll");
			return 1;
		}
		if (n > 0 && recv(fd, buf, sizeof(buf), 0) >= 0)
			received++;
	}
	printf("received %d\n", received);
	return 0;
}

static int do_serve(int fd, int port, int seconds)
{
	struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons(port) };
	long deadline = now_ms() + seconds * 1000L;
	int tcp = socket(AF_INET, SOCK_STREAM, 0), one = 1, echoed = 0, accepted = 0;
	char buf[2048];

	if (tcp < 0 || setsockopt(tcp, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(fd, (struct sockaddr *)&me, sizeof(me)) ||
	    bind(tcp, (struct sockaddr *)&me, sizeof(me)) || listen(tcp, 16)) {
		perror("serve");
		return 1;
	}
	printf("listening %d\n", port);
	fflush(stdout);
	for (long left; (left = deadline - now_ms()) > 0;) {
		struct pollfd p[2] = { { .fd = fd, .events = POLLIN }, { .fd = tcp, .events = POLLIN } };
		struct sockaddr_in from;
		socklen_t len = sizeof(from);
		ssize_t n;

		if (poll(p, 2, (int)left) < 0 && errno != EINTR) {
			perror("poll");
			return 1;
		}
		if (p[0].revents & POLLIN) {
			n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &len);
			if (n >= 0 && sendto(fd, buf, n, 0, (struct sockaddr *)&from, len) == n)
				echoed++;
		}
		if (p[1].revents & POLLIN) {
			int conn = accept(tcp, NULL, NULL);

			/* Left open: the client's reset ends it, and nothing more is sent. */
			if (conn >= 0)
				accepted++;
		}
	}
	printf("echoed %d accepted %d\n", echoed, accepted);
	return 0;
}

static int do_ask(const char *addr, int port)
{
	struct sockaddr_storage to;
	socklen_t len = peer(addr, port, &to);
	struct pollfd p = { .events = POLLIN };
	char buf[2048];
	int fd;

	if (!len)
		return usage();
	fd = p.fd = socket(to.ss_family, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	if (connect(fd, (struct sockaddr *)&to, len)) {
		perror("connect");
		return 1;
	}
	/* An error the send itself meets (a REJECT at OUTPUT) is the answer too. */
	if (send(fd, "x", 1, 0) != 1) {
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
	int fd, err = 0;

	if (!tolen)
		return usage();
	fd = p.fd = socket(to.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	if (connect(fd, (struct sockaddr *)&to, tolen))
		err = errno;
	if (err == EINPROGRESS) {
		if (poll(&p, 1, 2000) <= 0) {
			printf("no answer\n");
			return 0;
		}
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
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

int main(int argc, char **argv)
{
	int fd;

	if (argc == 5 && !strcmp(argv[1], "send"))
		return do_send(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc == 4 && !strcmp(argv[1], "ask"))
		return do_ask(argv[2], atoi(argv[3]));
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	if (argc == 4 && !strcmp(argv[1], "recv"))
		return do_recv(fd, atoi(argv[2]), atoi(argv[3]));
	if (argc == 4 && !strcmp(argv[1], "serve"))
		return do_serve(fd, atoi(argv[2]), atoi(argv[3]));
	if (argc == 4 && !strcmp(argv[1], "connect"))
		return do_connect(argv[2], atoi(argv[3]));
	return usage();
}
