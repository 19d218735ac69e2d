"""Where the service listens and pins, without importing the service: `bpfilter exec`
runs before every iptables command and must start fast."""
import os

DEFAULT_SOCKET = os.environ.get("BPFILTER_SOCKET", "/run/bpfilter/bpfilter.sock")
DEFAULT_ROOT = os.environ.get("BPFILTER_BPFFS", "/run/bpfilter/bpffs")
