"""`edgecut bundle protect|quantize`: prepare a partitioned bundle for a device.

`protect` encrypts a copy for one device (edgecut.protect; works on an edge-only install);
`quantize` adds int8 edge heads (edgecut.partition.int8; needs the partition extra).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgecut.variants import DEFAULT_BUDGET

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    protect = sub.add_parser("protect", help="write a copy whose model files are encrypted for one device")
    protect.add_argument("bundle", type=Path, help="plaintext bundle (the tail service keeps serving it)")
    protect.add_argument("--device-key", type=Path, required=True, help="the device's device.pub")
    protect.add_argument("-o", "--out", type=Path, help="device copy to write (default BUNDLE.device)")
    protect.add_argument("--sign", type=Path, metavar="KEY", help="Ed25519 signing key for the copy")
    protect.add_argument("--force", action="store_true", help="replace an existing output directory")
    protect.set_defaults(func=run_protect)
    quantize = sub.add_parser("quantize", help="add int8 edge heads, measured per cut")
    quantize.add_argument("bundle", type=Path)
    add_quantize_options(quantize, "--calibrate")
    quantize.add_argument("--calibration-samples", type=int, default=32, help="augmented photos (32)")
    quantize.add_argument("--heldout-samples", type=int, default=64, help="held-out augmented photos (64)")
    quantize.add_argument("--sign", type=Path, metavar="KEY", help="re-sign the manifest with this key")
    quantize.add_argument("--json", action="store_true", help="print the per-cut report as JSON")
    quantize.set_defaults(func=run_quantize)


def add_quantize_options(p: argparse.ArgumentParser, photos_flag: str | None) -> None:
    if photos_flag:
        p.add_argument(photos_flag, default="builtin", metavar="DIR|builtin", help="calibration photos")
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help=f"largest top-1 disagreement an int8 head may add to be offered (default {DEFAULT_BUDGET})",
    )


def _signing_key(path: Path | None) -> object:
    if path is None:
        return None
    from edgecut.keys import load_signing_private

    return load_signing_private(path)


def protect(bundle: Path, device_pub: Path, out: Path | None, sign: Path | None, force: bool) -> Path:
    from edgecut.bundle import load_bundle
    from edgecut.keys import key_id, load_device_public
    from edgecut.protect import protect_bundle

    device = load_device_public(device_pub)
    out = out or bundle.with_name(bundle.name + ".device")
    protect_bundle(load_bundle(bundle), device, out, signing_key=_signing_key(sign), force=force)
    log.info("%s → %s: model files encrypted for device key %s", bundle, out, key_id(device))
    return out


def run_protect(args: argparse.Namespace) -> int:
    out = protect(args.bundle, args.device_key, args.out, args.sign, args.force)
    print(f"{args.bundle} → {out}: model files encrypted for the device key in {args.device_key}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from edgecut.bundle import load_bundle
    from edgecut.partition.int8 import quantize_bundle

    bundle = quantize_bundle(
        load_bundle(args.bundle),
        args.calibrate,
        budget=args.budget,
        signing_key=_signing_key(args.sign),
        calib_count=args.calibration_samples,
        heldout_count=args.heldout_samples,
    )
    print_report(bundle.manifest.variants[-1], args.json)
    return 0


def print_report(variant: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(variant, indent=1))
        return
    for c in variant["cuts"]:
        ms = c["edge_ms"]
        print(
            f"{c['cut']:>7}: head {ms['float']['1']:.2f} → {ms['int8']['1']:.2f} ms (1 thread), "
            f"{c['model_bytes']['float'] / 1e6:.2f} → {c['model_bytes']['int8'] / 1e6:.2f} MB, "
            f"agreement {100 * c['agreement']:.1f} % — {'offered' if c['offered'] else 'not offered'}"
        )
