/* SPDX-License-Identifier: GPL-2.0 */
/* The kernel's own matches (xtmatch.c), as bpfilter.c uses them. */
#ifndef _BPFILTER_XTMATCH_H
#define _BPFILTER_XTMATCH_H

int bpfilter_xt_init(void);
void bpfilter_xt_exit(void);
long bpfilter_xt_ioctl(unsigned int cmd, unsigned long arg);

#endif /* _BPFILTER_XTMATCH_H */
