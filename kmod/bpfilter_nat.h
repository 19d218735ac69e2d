/* SPDX-License-Identifier: GPL-2.0 */
/* The nat table's part of bpfilter.ko (nat.c), as bpfilter.c uses it. */
#ifndef _BPFILTER_NAT_H
#define _BPFILTER_NAT_H

int bpfilter_nat_init(void);
void bpfilter_nat_exit(void);
long bpfilter_nat_ioctl(unsigned int cmd, unsigned long arg);

#endif /* _BPFILTER_NAT_H */
