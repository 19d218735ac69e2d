# bpfilter.ko for the running kernel, or for the kernel built in KDIR. The helper it
# embeds must be built first: tools/build-helper.sh does both.
KDIR ?= /lib/modules/$(shell uname -r)/build

modules clean:
	$(MAKE) -C $(KDIR) M=$(CURDIR) $@

.PHONY: modules clean
