#!/usr/bin/env python3
"""Runs shell commands in a fresh qemu guest with one of Debian's kernels (default:
Debian 13's 6.12; BPFILTER_VM_KERNEL, see README.md), prints their output and exits
with their status. The first run downloads the kernel (cached); later ones boot in
seconds. Needs tools/vm/setup.sh once, as root.
Exits 124 when the guest gives no result (timeout, kernel panic), 125 when --module
does not load.

    python3 tools/vm/run.py -c 'iptables-legacy -L -v -n'
    python3 tools/vm/run.py --scenario tools/vm/scenarios/iptables-udp-drop.sh
    python3 tools/vm/run.py --extra build/helper:/usr/bin/helper -c 'helper --version'
    python3 tools/vm/run.py --build-module     # bpfilter.ko for the guest: its path
    python3 tools/vm/run.py --module PATH.ko -c 'lsmod; dmesg | tail'
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def extra(spec: str) -> tuple[str, str]:
    host, sep, guest = spec.rpartition(":")
    if not sep or not host or not guest.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected FILE:/GUEST/PATH, got {spec!r}")
    return guest, host


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--scenario", type=Path, metavar="FILE", help="shell script to run")
    what.add_argument("-c", dest="command", metavar="COMMANDS", help="shell commands to run")
    what.add_argument("--build-module", action="store_true",
                      help="build bpfilter.ko for the guest's kernel (its helper built "
                           "beforehand: tools/build-helper.sh --helper-only); print its path")
    parser.add_argument("--extra", type=extra, action="append", default=[],
                        metavar="FILE:GUESTPATH", help="copy a host file into the guest")
    parser.add_argument("--module", metavar="PATH.ko", help="load this module before the scenario")
    parser.add_argument("--timeout", type=float, default=harness.DEFAULT_TIMEOUT,
                        help="seconds before the guest is killed (default %(default)s)")
    parser.add_argument("--console", action="store_true",
                        help="show the guest's kernel console on stderr as it runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[vm] %(message)s", stream=sys.stderr)

    try:
        if args.build_module:
            print(harness.build_module(Path(__file__).resolve().parents[2]))
            return 0
        script = args.scenario.read_text() if args.scenario else args.command
        result = harness.run_scenario(script, dict(args.extra), module=args.module,
                                      timeout=args.timeout,
                                      console_to=sys.stderr if args.console else None)
    except harness.VMError as e:
        print(f"[vm] {e}", file=sys.stderr)
        return 124
    sys.stdout.write(result.output)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
