"""`python3 -m bpfilter_lab demo [-v]`."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bpfilter_lab")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="filter real traffic between namespaces it makes, "
                                    "side by side with the kernel's iptables")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also every table bpfilter holds, with its programs")
    args = parser.parse_args(argv)
    from .demo import run
    return run(verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
