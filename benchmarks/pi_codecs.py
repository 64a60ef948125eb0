"""Give the Pi-class Lite0 profile codec times measured the same way as its segments.

`pi4-scaled-5x.json` is one core of this machine × 5, measured on 2026-11-25 with int8, int4 and
JPEG at a synthetic image only. The shipped `--cut auto` and the planner also weigh PCA, PNG and
WebP; without a figure they are planned as free to encode, and PNG of a real photo is not (tens
of ms here). This replaces the profile's codec times with those of a fresh measurement on this
machine (`edgecut profile … --image PHOTO`), × the Pi-class / this-machine ratio of the whole
model in that same measurement: only proportions are used, as for the Lite2 profile, so a VM
that runs slower today than on the day of the segments still gives consistent figures. The
segment times are kept as they are: they define the emulated device.

    python benchmarks/pi_codecs.py benchmarks/profiles/this-machine-1t.json \
        --profile benchmarks/profiles/pi4-scaled-5x.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from edgecut.profile import load_profile, save_profile

MARK = "; codec times:"  # the part of `source` this script writes (replaced on a re-run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path, help="edgecut profile of the same bundle on this machine")
    parser.add_argument("--profile", type=Path, required=True, help="the scaled profile to update in place")
    args = parser.parse_args()
    measured, target = load_profile(args.measured), load_profile(args.profile)
    if measured.model != target.model:
        raise SystemExit(f"error: {args.measured} is {measured.model}, {args.profile} is {target.model}")
    device_ms = sum(t.latency_ms for t in target.segments if "/" not in t.segment)
    here_ms = sum(t.latency_ms for t in measured.segments if "/" not in t.segment)
    factor = device_ms / here_ms
    codecs = tuple(
        dataclasses.replace(c, encode_ms=c.encode_ms * factor, decode_ms=c.decode_ms * factor)
        for c in measured.codecs
    )
    source = (
        f"{target.source.split(MARK)[0]}{MARK} {args.measured.name} ({measured.created_at}, "
        f"{measured.source.removeprefix('edgecut profile on ')}) x {factor:.4f} = this profile's "
        f"whole model ({device_ms:.1f} ms) / the measured one ({here_ms:.1f} ms)"
    )
    save_profile(dataclasses.replace(target, codecs=codecs, source=source), args.profile)
    print(f"{args.profile}: {len(codecs)} codec times, x {factor:.4f}")


if __name__ == "__main__":
    main()
