/*
 * The packet-rate load for tools/bench: a UDP flood and its sink.
 *
 *   udpflood send SRC SPORT DST DPORT PAYLOAD SECONDS CPU
 *   udpflood sink PORT...
 *
 * `send` floods one 5-tuple (IPv4 or IPv6, as its addresses say) through a
 * connected socket with sendmmsg, so the cost per packet is the kernel's, not an
 * interpreter's; it prints "ready" as it starts, and at the end how many datagrams
 * the kernel took. `sink` binds the
 * ports, IPv4 and IPv6, and never reads: once a socket's buffer is full UDP drops
 * at the socket, after the INPUT hook, and the bench counts what got that far (Ip
 * InDelivers or Ip6InDelivers of the sink's netns, read through /proc/PID/net/snmp
 * or snmp6). A reader would only add its own cost, on the other core, to a
 * measurement of the filter. `send` pins itself to CPU: veth delivers in the
 * sender's softirq, so that one core runs the whole path.
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

/* addr:port of either family; returns its length */
static socklen_t endpoint(const char *addr, const char *port, struct sockaddr_storage *ss)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof(*ss));
	if (inet_pton(AF_INET, addr, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons(atoi(port));
		return sizeof(*sin);
	}
	if (inet_pton(AF_INET6, addr, &sin6->sin6_addr) == 1) {
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(atoi(port));
		return sizeof(*sin6);
	}
	fprintf(stderr, "udpflood: bad address %s\n", addr);
	exit(2);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int flood(char **argv)
{
	struct sockaddr_storage src, dst;
	socklen_t src_len = endpoint(argv[0], argv[1], &src), dst_len = endpoint(argv[2], argv[3], &dst);
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
	fd = socket(src.ss_family, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	if (bind(fd, (struct sockaddr *)&src, src_len))
		die("bind");
	if (connect(fd, (struct sockaddr *)&dst, dst_len))
		die("connect");
	/* The bench's window starts once we send: a loaded machine may start us late. */
	printf("ready\n");
	fflush(stdout);
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
	static const char *const any[] = { "0.0.0.0", "::" };
	int i, j, on = 1;

	for (i = 0; i < nports; i++) {
		for (j = 0; j < 2; j++) {
			struct sockaddr_storage ss;
			socklen_t len = endpoint(any[j], ports[i], &ss);
			int fd = socket(ss.ss_family, SOCK_DGRAM, 0), size = 1 << 20;

			if (fd < 0)
				die("socket");
			setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
			/* each family its own socket: IPv4 is the other one's */
			if (ss.ss_family == AF_INET6 &&
			    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on)))
				die("IPV6_V6ONLY");
			if (bind(fd, (struct sockaddr *)&ss, len))
				die("bind");
		}
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
