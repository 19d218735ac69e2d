// SPDX-License-Identifier: GPL-2.0
/*
 * sockopt flood COUNT OPTNAME LEN: COUNT setsockopt(SOL_IP, OPTNAME) calls with LEN
 * zero bytes on a raw socket, one after the other as fast as they are answered;
 * prints how many failed and with which errno. A flood of requests the helper refuses
 * without an iptables process each; for the guest, built static like udp.c.
 *
 * sockopt get OPTNAME LEN TABLE: one getsockopt(SOL_IP, OPTNAME) with a buffer of
 * LEN bytes (mapped, untouched but for TABLE's name at its start) and optlen LEN;
 * prints its errno, or the length it answered.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>

static int get(int optname, long len, const char *table)
{
	socklen_t optlen = len;
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);

	if (buf == MAP_FAILED || fd < 0) {
		perror("sockopt");
		return 1;
	}
	strncpy(buf, table, 31);
	if (getsockopt(fd, SOL_IP, optname, buf, &optlen))
		printf("get %d with optlen %ld: %s\n", optname, len, strerror(errno));
	else
		printf("get %d with optlen %ld: %u bytes\n", optname, len, optlen);
	return 0;
}

int main(int argc, char **argv)
{
	int count, optname, len, fd, failed = 0, err = 0, i;
	char *buf;

	if (argc == 5 && !strcmp(argv[1], "get"))
		return get(atoi(argv[2]), atol(argv[3]), argv[4]);
	if (argc != 5 || strcmp(argv[1], "flood")) {
		fprintf(stderr, "usage: sockopt flood COUNT OPTNAME LEN | get OPTNAME LEN TABLE\n");
		return 2;
	}
	count = atoi(argv[2]);
	optname = atoi(argv[3]);
	len = atoi(argv[4]);
	buf = calloc(1, len ? len : 1);
	fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
	if (!buf || fd < 0) {
		perror("sockopt");
		return 1;
	}
	for (i = 0; i < count; i++) {
		if (setsockopt(fd, SOL_IP, optname, buf, len)) {
			failed++;
			err = errno;
		}
	}
	printf("failed: %d of %d (%s)\n", failed, count, failed ? strerror(err) : "-");
	return 0;
}
