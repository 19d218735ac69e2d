"""The `bpfilter` command."""
from __future__ import annotations

import argparse
import sys

from .errors import BpfilterError
from .paths import DEFAULT_ROOT, DEFAULT_SOCKET


def _replace_blob(text: str) -> bytes:
    """The ipt_replace the unmodified iptables-legacy-restore makes of text: given to
    the kernel's own table in a namespace of our own, then read back (the kernel only
    adds counters and its comefrom marks, which parse_replace recomputes anyway)."""
    import errno
    import subprocess

    from . import netns
    from .abi import sockopt

    with netns.private():
        done = subprocess.run(["iptables-legacy-restore"], input=text, text=True,
                              capture_output=True)
        if done.returncode:
            raise BpfilterError(errno.EINVAL, "iptables-legacy-restore refused the ruleset: "
                                              f"{done.stderr.strip() or done.stdout.strip()}")
        return sockopt.read_replace("filter")


def _check(args) -> int:
    from .abi import codec
    from .abi.decode import table_from_raw
    from .ext.log import logs
    from .klog import LogRing
    from .loader import load_ruleset

    text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    table = table_from_raw(codec.parse_replace(_replace_blob(text)))
    log = LogRing.create() if logs(table) else None   # only for the programs to verify
    try:
        ruleset = load_ruleset(table, log)
        try:
            for rules in ruleset.hooks.values():
                print(f"{rules.program.name}: {rules.insn_count} instructions, verified by "
                      "the kernel")
        finally:
            ruleset.close()
    finally:
        if log:
            log.close()
    return 0


def _serve(args) -> int:
    if args.device:
        from .service import serve_device
        serve_device(args.device, args.bpffs)
        return 0
    from .daemon import run_service
    return run_service(args.socket, args.bpffs, daemon=args.daemon)


def _flush(args) -> int:
    from .daemon import flush
    return flush(args.socket, args.bpffs)


def _show(args) -> int:
    from .show import show
    return show(args.bpffs, bpf=args.bpf)


def _exec(args) -> int:
    from .execute import run
    return run(args.argv, args.socket, args.bpffs)


def _env(args) -> int:
    from .execute import print_environment
    return print_environment(args.socket, args.bpffs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bpfilter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="answer iptables' socket options (what `exec` and "
                                     "bpfilter.ko forward) on a root-only unix socket")
    p.add_argument("--daemon", action="store_true",
                   help="detach once listening; log to /run/bpfilter/bpfilter.log")
    p.add_argument("--device", help="serve bpfilter.ko through this device (the module's "
                                    "helper mode) instead of a unix socket")
    p.set_defaults(func=_serve)
    p = sub.add_parser("flush", help="stop the service and detach everything bpfilter attached")
    p.set_defaults(func=_flush)
    p = sub.add_parser("show", help="tables, chains and rules with their counters, per netns")
    p.add_argument("--bpf", action="store_true",
                   help="also the programs (disassembled), instruction counts and maps")
    p.set_defaults(func=_show)
    p = sub.add_parser("check", help="validate, compile and load (without attaching) an "
                                     "iptables-save file's filter table")
    p.add_argument("file", nargs="?", default="-")
    p.set_defaults(func=_check)
    p = sub.add_parser("exec", help="run a command (iptables-legacy, say) with its iptables "
                                    "socket options sent to the service, starting one if needed",
                       usage="%(prog)s [-h] [--socket S] [--bpffs B] -- CMD [ARGS...]")
    p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_exec)
    p = sub.add_parser("env", help="shell exports that send the iptables socket options of "
                                   "every later command to the service (eval \"$(bpfilter env)\"), "
                                   "starting one if needed")
    p.set_defaults(func=_env)
    for name in ("serve", "flush", "show", "exec", "env"):
        sub.choices[name].add_argument("--socket", default=DEFAULT_SOCKET,
                                       help="the service's unix socket")
        sub.choices[name].add_argument("--bpffs", default=DEFAULT_ROOT,
                                       help="where tables are pinned")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BpfilterError as err:
        print(f"bpfilter: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
