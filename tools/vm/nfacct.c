// SPDX-License-Identifier: GPL-2.0
/*
 * nfacct add NAME | nfacct get NAME: what the nfacct tool does with nfnetlink_acct's
 * objects of the calling namespace (the guest has no nfacct): make one, or print its
 * counters as "pkts N bytes M". Built static, like udp.c.
 */
#include <endian.h>
#include <errno.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_acct.h>
#include <linux/netlink.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int request(int fd, int type, int flags, const char *name, char *reply, size_t size)
{
	struct {
		struct nlmsghdr nh;
		struct nfgenmsg nfg;
		char attrs[NLA_HDRLEN + NFACCT_NAME_MAX + 4];
	} req = {0};
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	struct nlattr *attr = (struct nlattr *)req.attrs;
	size_t len = strlen(name) + 1;

	if (len > NFACCT_NAME_MAX) {
		fprintf(stderr, "nfacct: name too long\n");
		return -1;
	}
	attr->nla_type = NFACCT_NAME;
	attr->nla_len = NLA_HDRLEN + len;
	memcpy(req.attrs + NLA_HDRLEN, name, len);
	req.nh.nlmsg_len = NLMSG_LENGTH(sizeof(req.nfg)) + NLA_ALIGN(attr->nla_len);
	req.nh.nlmsg_type = NFNL_SUBSYS_ACCT << 8 | type;
	req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | flags;
	req.nh.nlmsg_seq = 1;
	req.nfg.nfgen_family = AF_UNSPEC;
	req.nfg.version = NFNETLINK_V0;
	if (sendto(fd, &req, req.nh.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return -1;
	return recv(fd, reply, size, 0);
}

int main(int argc, char **argv)
{
	char reply[4096];
	struct nlmsghdr *nh = (struct nlmsghdr *)reply;
	int fd, n, add;

	if (argc != 3 || (strcmp(argv[1], "add") && strcmp(argv[1], "get"))) {
		fprintf(stderr, "usage: nfacct add NAME | nfacct get NAME\n");
		return 2;
	}
	add = !strcmp(argv[1], "add");
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
	if (fd < 0) {
		perror("nfacct: socket");
		return 1;
	}
	n = request(fd, add ? NFNL_MSG_ACCT_NEW : NFNL_MSG_ACCT_GET,
		    add ? NLM_F_CREATE | NLM_F_EXCL : 0, argv[2], reply, sizeof(reply));
	if (n < 0 || !NLMSG_OK(nh, (unsigned int)n)) {
		perror("nfacct");
		return 1;
	}
	if (nh->nlmsg_type == NLMSG_ERROR) {
		int err = ((struct nlmsgerr *)NLMSG_DATA(nh))->error;

		if (err) {
			fprintf(stderr, "nfacct: %s\n", strerror(-err));
			return 1;
		}
		return 0;	/* add's acknowledgement */
	}
	{
		uint64_t pkts = 0, bytes = 0;
		int left = NLMSG_PAYLOAD(nh, sizeof(struct nfgenmsg));
		struct nlattr *attr = (struct nlattr *)((char *)NLMSG_DATA(nh) + sizeof(struct nfgenmsg));

		while (left >= NLA_HDRLEN && attr->nla_len >= NLA_HDRLEN && attr->nla_len <= left) {
			uint64_t value;

			memcpy(&value, (char *)attr + NLA_HDRLEN, sizeof(value));
			if ((attr->nla_type & NLA_TYPE_MASK) == NFACCT_PKTS)
				pkts = be64toh(value);
			if ((attr->nla_type & NLA_TYPE_MASK) == NFACCT_BYTES)
				bytes = be64toh(value);
			left -= NLA_ALIGN(attr->nla_len);
			attr = (struct nlattr *)((char *)attr + NLA_ALIGN(attr->nla_len));
		}
		printf("pkts %llu bytes %llu\n", (unsigned long long)pkts, (unsigned long long)bytes);
	}
	close(fd);
	return 0;
}
