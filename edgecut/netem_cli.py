"""`edgecut netem --listen 127.0.0.1:0 --to HOST:PORT --bandwidth 8mbit --rtt 40ms`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:0", help="address to accept edge connections")
    p.add_argument("--to", required=True, help="tail service address HOST:PORT")
    p.add_argument("--bandwidth", help="e.g. 8mbit, 512kbit (both directions); default unlimited")
    p.add_argument("--rtt", help="added round-trip time, e.g. 40ms")
    p.add_argument(
        "--burst",
        type=int,
        metavar="BYTES",
        help="token bucket depth: bytes that cross at once after a pause (default: 4 ms of the "
        "bandwidth, at least 1500, as the sweep uses)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecut.netem import run_netem

    if args.burst is not None and args.burst < 1:
        from edgecut.errors import UsageError

        raise UsageError(f"--burst {args.burst}: must be at least 1 byte")
    run_netem(args.listen, args.to, args.bandwidth, args.rtt, args.burst)
    return 0
