"""The `bpfilter` command."""
from __future__ import annotations

import argparse
import sys

from .errors import BpfilterError


def _check(args) -> int:
    from .abi import codec
    from .abi.decode import table_from_raw
    from .loader import load_ruleset
    from .scratch import replace_blob

    text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    table = table_from_raw(codec.parse_replace(replace_blob(text)))
    ruleset = load_ruleset(table)
    try:
        for rules in ruleset.hooks.values():
            print(f"{rules.program.name}: {rules.insn_count} instructions, verified by the kernel")
    finally:
        ruleset.close()
    return 0


def _demo(args) -> int:
    from .demo import run
    return run(verbose=args.verbose)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bpfilter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="filter real traffic between namespaces it makes, "
                                    "side by side with the kernel's iptables")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_demo)
    p = sub.add_parser("check", help="validate, compile and load (without attaching) an "
                                     "iptables-save file's filter table")
    p.add_argument("file", nargs="?", default="-")
    p.set_defaults(func=_check)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BpfilterError as err:
        print(f"bpfilter: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
