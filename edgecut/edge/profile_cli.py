"""`edgecut profile BUNDLE --out profiles/DEVICE.json` — run on the device you will deploy to."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgecut.flags import add_renamed, comma_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    p.add_argument("--runtime", default="ort", choices=["ort", "litert"])
    p.add_argument("--providers", default="cpu", help="ORT providers, comma separated")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = all cores)")
    add_renamed(p, "--device-name", "--device", help="name recorded in the profile (default: this machine)")
    add_renamed(
        p, "--codec", "--codecs", default="int8,int6,int4,jpeg90", help="codecs to time, comma separated"
    )
    p.add_argument("--runs", type=int, default=20, help="timed runs after 3 warm-up runs")
    p.add_argument(
        "--image",
        type=Path,
        help="a real photo to time on (image models); without it a synthetic image, which JPEG, "
        "WebP and PNG compress far faster and smaller than a photo",
    )
    p.add_argument(
        "--scale", type=float, help="write a *scaled* profile: timings × this factor (say why in --source)"
    )
    p.add_argument("--source", default="", help="where a scale factor comes from")
    p.add_argument("--device-key", type=Path, help="device.key: profile a bundle encrypted for this device")
    p.set_defaults(func=run)


class _AtPrecision:
    """A runner that always runs one precision variant, so the float profiler times it too."""

    def __init__(self, runner: Any, precision: str) -> None:
        self.runner, self.precision, self.name = runner, precision, runner.name

    def run(self, feeds: Any, first: int, last: int, precision: str = "float") -> Any:
        return self.runner.run(feeds, first, last, self.precision)


def _variant_timings(bundle: Any, runner: Any, precisions: tuple[str, ...], runs: int) -> tuple:
    """Segment timings of each variant, named "int8/seg_003": what the planner reads for int8 heads."""
    from edgecut.edge.profiler import profile_segments, synthetic_input

    out: tuple = ()
    for p in precisions:
        timings = profile_segments(bundle, _AtPrecision(runner, p), synthetic_input(bundle), runs)
        out += tuple(dataclasses.replace(t, segment=f"{p}/{t.segment}") for t in timings)
    return out


def run(args: argparse.Namespace) -> int:
    from edgecut.bundle import load_bundle
    from edgecut.edge.profiler import profile_bundle
    from edgecut.edge.runner import make_runner
    from edgecut.errors import UsageError
    from edgecut.keys import load_device_private
    from edgecut.profile import save_profile
    from edgecut.protect import ModelFiles
    from edgecut.runtime import OrtOptions
    from edgecut.variants import head_variants

    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    warn_oversubscribed(args.threads)
    bundle = load_bundle(args.bundle)
    options = OrtOptions(tuple(args.providers.split(",")), args.threads)
    files = ModelFiles(bundle, load_device_private(args.device_key) if args.device_key else None)
    variants = tuple(head_variants(bundle.manifest)) if args.runtime == "ort" else ()
    runner = make_runner(bundle, args.runtime, options, files, variants)
    feeds = _photo_feeds(bundle, args.image, comma_list(args.codec))
    prof = profile_bundle(
        bundle,
        runner,
        runtime=args.runtime,
        threads=args.threads,
        device=args.device_name,
        codecs=comma_list(args.codec),
        runs=args.runs,
        feeds=feeds,
    )
    if args.image is not None:
        prof = dataclasses.replace(prof, source=f"{prof.source}, on {args.image.name}")
    if variants:
        prof = dataclasses.replace(
            prof, segments=prof.segments + _variant_timings(bundle, runner, variants, args.runs)
        )
    if args.scale:
        if not args.source:
            raise UsageError("--scale needs --source saying where the factor comes from")
        prof = prof.scaled(args.scale, args.device_name or f"{prof.device}-scaled", args.source)
    save_profile(prof, args.out)
    total = sum(t.latency_ms for t in prof.segments if "/" not in t.segment)
    print(
        f"{prof.device} ({prof.mode}): {len(prof.segments)} segments, whole model {total:.1f} ms → {args.out}"
    )
    return 0


def _photo_feeds(bundle: Any, image: Path | None, codecs: Sequence[str]) -> Any:
    """The model input from `image` (None: the profiler's synthetic one, with a warning when image
    codecs are timed on it: their figures would make an image upload look cheap)."""
    from edgecut.codec import CodecSpec
    from edgecut.images import load_image, prepare

    m = bundle.manifest
    if image is None:
        if m.preprocess.kind == "image" and any(CodecSpec.parse(c).is_image for c in codecs):
            print(
                "warning: image codecs timed on a synthetic image (flat blocks): pass --image "
                "with a real photo, or their encode times and sizes come out far too small",
                file=sys.stderr,
            )
        return None
    if m.preprocess.kind != "image":
        from edgecut.errors import UsageError

        raise UsageError(f"--image: {m.model} takes no image input")
    return {m.inputs[0].name: prepare(load_image(image), m.preprocess)}


def warn_oversubscribed(threads: int) -> None:
    """More threads than cores time-slice one another: the profile would show a slower device
    than a deployment with that many cores, and the planner would trust it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads > cores:
        print(
            f"warning: --threads {threads} but this machine gives the process {cores} core(s): the "
            f"threads share cores and the timings come out slower than a {threads}-core device's; "
            f"profile with --threads {cores} or less",
            file=sys.stderr,
        )
