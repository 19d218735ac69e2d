"""Reading the kernel log as the LOG tests need it: the lines written from now on,
and the sysctls the kernel's LOG target and bpfilter's writer depend on."""
from __future__ import annotations

import contextlib
import os
import time

NF_LOG_ALL_NETNS = "/proc/sys/net/netfilter/nf_log_all_netns"
PRINTK_DEVKMSG = "/proc/sys/kernel/printk_devkmsg"
KERNEL, USER = 0, 1   # syslog facilities: the kernel's LOG target, bpfilter's lines


@contextlib.contextmanager
def sysctls(values: dict):
    saved = {}
    try:
        for path, value in values.items():
            with open(path) as f:
                saved[path] = f.read().strip()
            with open(path, "w") as f:
                f.write(value + "\n")   # printk_devkmsg wants the newline
        yield
    finally:
        for path, value in saved.items():
            with open(path, "w") as f:
                f.write(value + "\n")   # printk_devkmsg wants the newline


@contextlib.contextmanager
def logging_everywhere():
    """The kernel's LOG target logs from test namespaces (and bpfilter's lines with
    it); /dev/kmsg as the machine has it (printk_devkmsg=ratelimit on a stock one)."""
    with sysctls({NF_LOG_ALL_NETNS: "1"}):
        yield


class Kmsg:
    """/dev/kmsg from the moment it is opened: (facility, level, text) per line,
    the text as /dev/kmsg shows it (timestamps and sequence numbers left out)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.lines: list[tuple[int, int, str]] = []

    def read(self) -> list[tuple[int, int, str]]:
        while True:
            try:
                record = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return self.lines
            except BrokenPipeError:   # overwritten before read: the test must fail
                raise AssertionError("kernel log lines were lost before the test read them")
            header, _, text = record.partition(";")
            prio = int(header.split(",")[0])
            self.lines.append((prio >> 3, prio & 7, text.split("\n")[0]))

    def wait(self, predicate, timeout: float = 10.0) -> list[tuple[int, int, str]]:
        """The lines once `predicate(lines)` holds, or when `timeout` ran out."""
        deadline = time.monotonic() + timeout
        while not predicate(self.read()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.lines

    def close(self) -> None:
        os.close(self.fd)
