"""The `bpfilter` command."""
from __future__ import annotations

import argparse
import sys

from .errors import BpfilterError
from .paths import DEFAULT_ROOT, DEFAULT_SOCKET


def _check(args) -> int:
    from .check import run
    from .model import Family
    family = Family.IPV6 if args.ipv6 else Family.IPV4 if args.ipv4 else None
    return run(args.file, family)


def _serve(args) -> int:
    if args.device:
        from .transport.device import serve_device
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
    p = sub.add_parser("check", help="every table of an iptables-save or ip6tables-save file "
                                     "through the service's checks, compilation and the "
                                     "kernel's verifier, nothing attached")
    p.add_argument("file", nargs="?", default="-")
    family = p.add_mutually_exclusive_group()
    family.add_argument("-4", dest="ipv4", action="store_true", help="an iptables-save file")
    family.add_argument("-6", dest="ipv6", action="store_true",
                        help="an ip6tables-save file (default: guessed from its addresses)")
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
