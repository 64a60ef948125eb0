"""`edgecut partition MODEL -o BUNDLE`."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from edgecut.errors import DependencyError, UsageError
from edgecut.partition.bundle_cli import add_quantize_options
from edgecut.partition.cuts import DEFAULT_MAX_CUTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="an .onnx file, a built-in name (efficientnet-lite0) or "
        "a torch factory 'package.module:function'",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--input-shape", help="static input shape for dynamic models, e.g. 1x3x224x224")
    p.add_argument(
        "--max-cuts",
        type=int,
        default=DEFAULT_MAX_CUTS,
        help=f"cuts to keep, input and output included (default {DEFAULT_MAX_CUTS})",
    )
    p.add_argument(
        "--all-cuts", action="store_true", help="keep every position (up to --max-cuts), not only useful ones"
    )
    p.add_argument(
        "--preprocess",
        metavar="PRESET[,KEY=VALUE…]",
        help="how photos become the model input, stored in the bundle: a preset (imagenet, "
        "efficientnet-lite, raw01, raw255, caffe) and/or size=HxW, resize=crop|stretch, "
        "layout=NCHW|NHWC, color=RGB|BGR, scale=1/255, mean=A:B:C, std=A:B:C "
        "(built-ins bring their own)",
    )
    p.add_argument("--name", help="model name in the manifest (default: from the source)")
    p.add_argument("--model-version", default="1", help="model version in the manifest")
    p.add_argument("--sign", type=Path, metavar="KEY", help="Ed25519 signing key (edgecut keys gen)")
    p.add_argument(
        "--calibrate",
        metavar="DIR|builtin",
        help="calibrate codecs and measure fidelity on photos: builtin (photos shipped with "
        "scikit-image and matplotlib, split by photo) or a directory (every 4th image held out)",
    )
    p.add_argument(
        "--heldout",
        metavar="DIR",
        help="with --calibrate: measure fidelity on this folder of your own photos instead",
    )
    p.add_argument(
        "--tflite",
        action="store_true",
        help="also convert edge-side segments to LiteRT (.tflite); needs litert-torch",
    )
    p.add_argument(
        "--int8-head",
        action="store_true",
        help="also write int8 edge heads (static QDQ), measured per cut on the --calibrate photos",
    )
    add_quantize_options(p, None)
    p.add_argument(
        "--encrypt-edge",
        type=Path,
        metavar="DEVICE_PUB",
        help="also write an encrypted device copy (OUT.device) for this device.pub",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgecut.partition.build import partition
    from edgecut.partition.load import load_model, parse_shape
    from edgecut.partition.preprocessing import parse as parse_preprocess

    if args.heldout and not args.calibrate:
        raise UsageError("--heldout needs --calibrate (the photos to fit the codecs on)")
    for folder in (args.calibrate, args.heldout):
        if folder and folder != "builtin":
            from edgecut.images import list_images

            list_images(Path(folder))  # a wrong folder is an error now, not after partitioning
    if args.out.exists() and not args.force:
        raise UsageError(f"output directory '{args.out}' exists (use --force to replace it)")
    if args.tflite and importlib.util.find_spec("litert_torch") is None:
        raise DependencyError(
            "--tflite needs the LiteRT converter (litert-torch), not installed",
            hint="pip install litert-torch && pip install --no-deps onnx2torch",
        )
    if args.encrypt_edge is not None:  # a wrong key file fails now, not after minutes of partitioning
        from edgecut.keys import load_device_public

        load_device_public(args.encrypt_edge)
    if args.calibrate:
        check_photos(args.calibrate)
    key = None
    if args.sign is not None:
        from edgecut.keys import load_signing_private

        key = load_signing_private(args.sign)
    shape = parse_shape(args.input_shape) if args.input_shape else None
    declared = parse_preprocess(args.preprocess) if args.preprocess is not None else None
    loaded = load_model(
        args.model, input_shape=shape, name=args.name, version=args.model_version, preprocess=declared
    )
    if args.calibrate and loaded.preprocess.kind != "image":
        raise UsageError(
            f"--calibrate needs a model that takes one image; '{args.model}' takes tensors",
            hint="declare its preprocessing with --preprocess (docs/bundle-format.md), or drop --calibrate",
        )
    bundle = partition(
        loaded,
        args.out,
        max_cuts=args.max_cuts,
        mode="all" if args.all_cuts else "useful",
        force=args.force,
        signing_key=key,
    )
    if args.calibrate:
        from edgecut.partition.calibrate import calibrate_bundle

        bundle = calibrate_bundle(bundle, args.calibrate, heldout=args.heldout, signing_key=key)
    if args.tflite:
        from edgecut.partition.tflite import convert_bundle

        bundle = convert_bundle(bundle, signing_key=key)
    if args.int8_head:
        from edgecut.partition.int8 import quantize_bundle

        bundle = quantize_bundle(bundle, args.calibrate or "builtin", budget=args.budget, signing_key=key)
    device_copy = None
    if args.encrypt_edge is not None:
        from edgecut.partition.bundle_cli import protect

        device_copy = protect(args.out, args.encrypt_edge, None, args.sign, args.force)
    v = bundle.manifest.verification
    if args.json:
        print(
            json.dumps(
                {
                    "bundle": str(args.out),
                    "cuts": len(bundle.manifest.cuts),
                    "verification": v,
                    "signed": key is not None,
                    "device_copy": str(device_copy) if device_copy else None,
                }
            )
        )
    else:
        print(
            f"{bundle.name}: {len(bundle.manifest.cuts)} cuts → {args.out} "
            f"(verified: max |Δ| {v['max_abs_diff']:.2g}, {v['seconds']} s)"
            + (f"; encrypted device copy → {device_copy}" if device_copy else "")
        )
    return 0


def check_photos(source: str) -> None:
    """Fail on a bad `--calibrate` source now, not after minutes of partitioning and verifying."""
    if source == "builtin":
        if importlib.util.find_spec("skimage") is None:
            raise DependencyError(
                "--calibrate builtin uses scikit-image's sample photos, which is not installed",
                hint='pip install "edgecut[partition]", or --calibrate DIR with your own photos',
            )
        return
    from edgecut.images import list_images, load_image

    for path in list_images(Path(source)):
        load_image(path)  # one unreadable photo is named now
