/*
 * The packet-rate load for tools/bench: a UDP flood and its sink.
 *
 *   udpflood send SRC SPORT DST DPORT PAYLOAD SECONDS CPU
 *   udpflood sink CPU PORT...
 *
 * `send` floods one 5-tuple through a connected socket with sendmmsg, so the
 * cost per packet is the kernel's, not an interpreter's; it prints how many
 * datagrams the kernel took. `sink` binds the ports and drains them so the
 * receiver's socket buffers never become the bottleneck; the bench counts
 * what passed the INPUT hook from the sink's netns (/proc/PID/net/snmp), not
 * from here. Both pin themselves to CPU so that the sender (which also runs
 * the receive path: veth delivers in the sender's softirq) and the sink
 * never share a core.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void pin(const char *cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(atoi(cpu), &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		perror("sched_setaffinity");
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static struct sockaddr_in endpoint(const char *addr, const char *port)
{
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(atoi(port)) };

	if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1) {
		fprintf(stderr, "udpflood: bad address %s\n", addr);
		exit(2);
	}
	return sin;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int flood(char **argv)
{
	struct sockaddr_in src = endpoint(argv[0], argv[1]), dst = endpoint(argv[2], argv[3]);
	size_t len = atoi(argv[4]);
	double end = now() + atof(argv[5]);
	static char payload[1500];
	struct mmsghdr msgs[BATCH];
	struct iovec iov = { payload, len };
	unsigned long long sent = 0;
	int fd, i, n;

	pin(argv[6]);
	if (len > sizeof(payload))
		len = iov.iov_len = sizeof(payload);
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	if (bind(fd, (struct sockaddr *)&src, sizeof(src)))
		die("bind");
	if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)))
		die("connect");
	memset(msgs, 0, sizeof(msgs));
	for (i = 0; i < BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	while (!stop && now() < end) {
		n = sendmmsg(fd, msgs, BATCH, 0);
		if (n > 0)
			sent += n;
		/* A full device queue or an ICMP error queued on the socket is load, not failure. */
		else if (errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED)
			die("sendmmsg");
	}
	printf("%llu\n", sent);
	return 0;
}

static int sink(int nports, char **ports)
{
	struct pollfd pfd[16];
	static char bufs[BATCH][2048];
	struct iovec iov[BATCH];
	struct mmsghdr msgs[BATCH];
	int i;

	if (nports > 16) {
		fprintf(stderr, "udpflood: at most 16 ports\n");
		return 2;
	}
	for (i = 0; i < nports; i++) {
		struct sockaddr_in any = endpoint("0.0.0.0", ports[i]);
		int size = 8 << 20;

		pfd[i].fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
		pfd[i].events = POLLIN;
		if (pfd[i].fd < 0)
			die("socket");
		setsockopt(pfd[i].fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
		if (bind(pfd[i].fd, (struct sockaddr *)&any, sizeof(any)))
			die("bind");
	}
	for (i = 0; i < BATCH; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = sizeof(bufs[i]);
		memset(&msgs[i], 0, sizeof(msgs[i]));
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	/* The bench reads our netns' counters once we are bound: say so. */
	printf("ready\n");
	fflush(stdout);
	while (!stop) {
		if (poll(pfd, nports, 200) < 0 && errno != EINTR)
			die("poll");
		for (i = 0; i < nports; i++)
			if (pfd[i].revents & POLLIN)
				while (recvmmsg(pfd[i].fd, msgs, BATCH, MSG_DONTWAIT, NULL) > 0)
					;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal };

	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (argc == 9 && !strcmp(argv[1], "send"))
		return flood(argv + 2);
	if (argc >= 4 && !strcmp(argv[1], "sink")) {
		pin(argv[2]);
		return sink(argc - 3, argv + 3);
	}
	fprintf(stderr, "usage: udpflood send SRC SPORT DST DPORT PAYLOAD SECONDS CPU\n"
			"       udpflood sink CPU PORT...\n");
	return 2;
}
