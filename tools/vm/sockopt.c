// SPDX-License-Identifier: GPL-2.0
/*
 * sockopt flood COUNT OPTNAME LEN: COUNT setsockopt(SOL_IP, OPTNAME) calls with LEN
 * zero bytes on a raw socket, one after the other as fast as they are answered;
 * prints how many failed and with which errno. A flood of requests the helper refuses
 * without an iptables process each; for the guest, built static like udp.c.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	int count, optname, len, fd, failed = 0, err = 0, i;
	char *buf;

	if (argc != 5 || strcmp(argv[1], "flood")) {
		fprintf(stderr, "usage: sockopt flood COUNT OPTNAME LEN\n");
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
