# bpfilter.ko for the running kernel, or for the kernel built in KDIR. The helper it
# embeds must be built first: tools/build-helper.sh does both.
KDIR ?= /lib/modules/$(shell uname -r)/build
VERSION := $(shell sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' dkms.conf)
DKMS_SOURCE ?= /usr/src/bpfilter-$(VERSION)
HELPER ?= build/bpfilter-umh

modules clean:
	$(MAKE) -C $(KDIR) M=$(CURDIR) $@

# What DKMS builds from: the module's sources and the helper, built beforehand.
dkms-source: $(HELPER)
	install -d $(DKMS_SOURCE)/kmod $(DKMS_SOURCE)/build
	install -m 644 Kbuild Makefile dkms.conf $(DKMS_SOURCE)/
	install -m 644 kmod/bpfilter.c kmod/nat.c kmod/mark.c kmod/xtmatch.c kmod/mangle.c kmod/trace.c kmod/bpfilter_nat.h kmod/bpfilter_xtmatch.h kmod/bpfilter_proto.h kmod/bpfilter_umh_blob.S $(DKMS_SOURCE)/kmod/
	install -m 755 $(HELPER) $(DKMS_SOURCE)/build/bpfilter-umh

.PHONY: modules clean dkms-source

# The Debian packages (bpfilter-dkms, bpfilter) in dist/: tools/deb.py.
deb:
	python3 tools/deb.py

.PHONY: deb
