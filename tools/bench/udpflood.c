/*
 * The packet-rate load for tools/bench: a UDP flood and its sink.
 *
 *   udpflood send SRC SPORT DST DPORT PAYLOAD SECONDS CPU
 *   udpflood sink PORT...
 *
 * `send` floods one 5-tuple through a connected socket with sendmmsg, so the
 * cost per packet is the kernel's, not an interpreter's; it prints how many
 * datagrams the kernel took. `sink` binds the ports and never reads: once a
 * socket's buffer is full UDP drops at the socket, after the INPUT hook, and
 * the bench counts what got that far (Ip InDelivers of the sink's netns, read
 * through /proc/PID/net/snmp). A reader would only add its own cost, on the
 * other core, to a measurement of the filter. `send` pins itself to CPU: veth
 * delivers in the sender's softirq, so that one core runs the whole path.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
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
	int i;

	for (i = 0; i < nports; i++) {
		struct sockaddr_in any = endpoint("0.0.0.0", ports[i]);
		int fd = socket(AF_INET, SOCK_DGRAM, 0), size = 1 << 20;

		if (fd < 0)
			die("socket");
		setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
		if (bind(fd, (struct sockaddr *)&any, sizeof(any)))
			die("bind");
	}
	/* The bench reads our netns' counters once we are bound: say so. */
	printf("ready\n");
	fflush(stdout);
	while (!stop)
		pause();
	return 0;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal };

	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (argc == 9 && !strcmp(argv[1], "send"))
		return flood(argv + 2);
	if (argc >= 3 && !strcmp(argv[1], "sink"))
		return sink(argc - 2, argv + 2);
	fprintf(stderr, "usage: udpflood send SRC SPORT DST DPORT PAYLOAD SECONDS CPU\n"
			"       udpflood sink PORT...\n");
	return 2;
}
