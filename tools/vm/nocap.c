// SPDX-License-Identifier: GPL-2.0
/*
 * nocap CMD [ARGS...]: runs CMD as the same user but without CAP_NET_ADMIN,
 * which not even root gets back across exec once it has left the bounding set.
 * The guest has neither capsh nor setpriv; built static, like udp.c.
 */
#include <linux/capability.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
	struct __user_cap_data_struct *d = &data[CAP_TO_INDEX(CAP_NET_ADMIN)];

	if (argc < 2) {
		fprintf(stderr, "usage: nocap CMD [ARGS...]\n");
		return 2;
	}
	if (prctl(PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) ||
	    syscall(SYS_capget, &hdr, data)) {
		perror("nocap");
		return 1;
	}
	d->effective &= ~CAP_TO_MASK(CAP_NET_ADMIN);
	d->permitted &= ~CAP_TO_MASK(CAP_NET_ADMIN);
	d->inheritable &= ~CAP_TO_MASK(CAP_NET_ADMIN);
	if (syscall(SYS_capset, &hdr, data)) {
		perror("nocap");
		return 1;
	}
	execvp(argv[1], argv + 1);
	perror(argv[1]);
	return 127;
}
