"""The one error type every layer raises for bad input.

It carries the errno the kernel's iptables would have returned, so that the
service can hand it back to the unmodified iptables binary, and a message that
names the entry (rule) and the problem for the log and for stderr.
"""
import errno as _errno


class BpfilterError(Exception):
    def __init__(self, err: int, message: str, entry: "int | None" = None):
        self.errno = err
        self.entry = entry
        where = f"entry {entry}: " if entry is not None else ""
        super().__init__(f"{where}{message} ({_errno.errorcode.get(err, err)})")


def invalid(message: str, entry: "int | None" = None) -> BpfilterError:
    return BpfilterError(_errno.EINVAL, message, entry)
