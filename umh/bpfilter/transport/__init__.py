"""How requests reach the service: a unix socket (unix.py) or bpfilter.ko's device (device.py)."""
