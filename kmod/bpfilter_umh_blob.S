/* SPDX-License-Identifier: GPL-2.0 */
/* The frozen helper (tools/build-helper.sh); BPFILTER_UMH is its path, from Kbuild. */
	.section .rodata, "a"
	.global bpfilter_umh_start
bpfilter_umh_start:
	.incbin BPFILTER_UMH
	.global bpfilter_umh_end
bpfilter_umh_end:
