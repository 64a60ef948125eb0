"""`edgecut keys gen --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = sub.add_parser("gen", help="write service.key/.pub (HPKE) and signing.key/.pub (Ed25519)")
    gen.add_argument("--out", type=Path, default=Path("keys"), help="directory (default keys/)")
    gen.add_argument(
        "--suite",
        default="x25519",
        choices=["x25519", "mlkem768-x25519"],
        help="HPKE KEM for the service key (hybrid post-quantum optional)",
    )
    gen.add_argument("--force", action="store_true", help="overwrite existing keys (rotation)")
    gen.set_defaults(func=run_gen)


def run_gen(args: argparse.Namespace) -> int:
    from edgecut.keys import generate_keys, key_id, load_service_public

    paths = generate_keys(args.out, suite=args.suite, force=args.force)
    kid = key_id(load_service_public(paths.service_pub))
    print(f"wrote {args.out}/ service.key service.pub signing.key signing.pub (service key id {kid})")
    return 0
