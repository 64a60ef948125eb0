"""`edgecut keys gen --out DIR` (service + signing keys) and `edgecut keys gen --device` (a device key)."""

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
    gen.add_argument(
        "--device",
        action="store_true",
        help="write device.key/.pub instead: the key encrypted bundles are opened with on a device",
    )
    gen.set_defaults(func=run_gen)


def run_gen(args: argparse.Namespace) -> int:
    from edgecut.keys import (
        generate_device_keys,
        generate_keys,
        key_id,
        load_device_public,
        load_service_public,
    )

    if args.device:
        _, public = generate_device_keys(args.out, force=args.force)
        print(f"wrote {args.out}/ device.key device.pub (device key id {key_id(load_device_public(public))})")
        return 0
    paths = generate_keys(args.out, suite=args.suite, force=args.force)
    kid = key_id(load_service_public(paths.service_pub))
    print(f"wrote {args.out}/ service.key service.pub signing.key signing.pub (service key id {kid})")
    return 0
