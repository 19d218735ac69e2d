// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's UDP traffic, built static so it needs nothing from the initramfs:
 * busybox nc sends one datagram per run and cannot say how many it received.
 *
 *   udp send ADDR PORT COUNT   COUNT one-byte datagrams to ADDR:PORT
 *   udp recv PORT SECONDS      print how many datagrams arrived on PORT in SECONDS
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
	fprintf(stderr, "usage: udp send ADDR PORT COUNT | udp recv PORT SECONDS\n");
	return 2;
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static int do_send(int fd, const char *addr, int port, int count)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port) };

	if (inet_pton(AF_INET, addr, &to.sin_addr) != 1)
		return usage();
	for (int i = 0; i < count; i++) {
		/* A DROP on the far side is silent, so every send should succeed. */
		if (sendto(fd, "x", 1, 0, (struct sockaddr *)&to, sizeof(to)) != 1) {
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

int main(int argc, char **argv)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);

	if (fd < 0) {
		perror("socket");
		return 1;
	}
	if (argc == 5 && !strcmp(argv[1], "send"))
		return do_send(fd, argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc == 4 && !strcmp(argv[1], "recv"))
		return do_recv(fd, atoi(argv[2]), atoi(argv[3]));
	return usage();
}
