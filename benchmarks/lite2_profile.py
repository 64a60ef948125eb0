"""Derive the Pi-class EfficientNet-Lite2 profile from a Lite2 profile measured on this machine.

The Lite0 Pi-class profile (`pi4-scaled-5x.json`) is one idle core here × 5. Lite2 is scaled to
that same device: its total is the Lite0 Pi-class total × 26 / 12 (Lite2 vs Lite0 FP32 on a
Pixel 4 CPU, 4 threads: TF EfficientNet-Lite README), its split over segments (and its codec times,
by the same factor) is what `edgecut profile` measured here. Only proportions of the measurement are
used, so a measurement taken while the shared machine was busy (all times inflated alike) still
gives the same profile. Writes a profile labelled `scaled` with the factor and this source.

    python benchmarks/lite2_profile.py MEASURED.json --out benchmarks/profiles/effl2-pi4-scaled.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecut.profile import load_profile, save_profile

PIXEL4_LITE0_MS, PIXEL4_LITE2_MS = 12.0, 26.0  # FP32, 4 threads (TF EfficientNet-Lite README)
LITE0_PI = Path(__file__).parent / "profiles" / "pi4-scaled-5x.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path, help="edgecut profile of efficientnet-lite2 on this machine")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    measured = load_profile(args.measured)
    lite0_pi_ms = sum(t.latency_ms for t in load_profile(LITE0_PI).segments)
    target_ms = lite0_pi_ms * PIXEL4_LITE2_MS / PIXEL4_LITE0_MS
    measured_ms = sum(t.latency_ms for t in measured.segments)
    factor = target_ms / measured_ms
    source = (
        f"{args.measured.name} x {factor:.4f}: whole model = the Lite0 Pi-class profile "
        f"(pi4-scaled-5x.json, {lite0_pi_ms:.1f} ms) x {PIXEL4_LITE2_MS:g}/{PIXEL4_LITE0_MS:g} "
        "(Lite2 vs Lite0 FP32 on a Pixel 4 CPU, 4 threads, TF EfficientNet-Lite README) = "
        f"{target_ms:.1f} ms; split over segments and codec times as measured here "
        f"({measured_ms:.1f} ms whole model, ORT 1 thread)"
    )
    save_profile(measured.scaled(factor, "pi4-scaled", source), args.out)
    print(f"{args.out}: {target_ms:.1f} ms whole model (factor {factor:.4f})")


if __name__ == "__main__":
    main()
