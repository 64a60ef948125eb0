"""int8 edge heads of EfficientNet-Lite0 per cut: head latency float vs int8 (1 and 2 threads),
head bytes, and top-1 agreement of int8 head + float tail with the unsplit float model.

Partitions the built-in model into a temporary bundle, calibrates its codecs and quantizes every
segment (`edgecut.partition.int8`: static QDQ, per-channel int8 weights, uint8 activations,
MinMax ranges from augmented calibration photos run through the preceding float segments), then
re-profiles every (segment, precision, threads) on one calibration sample — warm-up excluded, runs
interleaved in a shuffled order, worker threads not spinning — and sums segments into heads.
Agreement is measured on held-out augmentations of the held-out photos (`photo_sets`); with the
built-in source those are scikit-image's 7 photos under other augmentations. A head's latency is
its segments' ORT run time only (no preprocessing, no codec). x86-64 VNNI/AVX2 kernels here:
Arm int8 kernels differ, so re-take the profile on the device (`edgecut profile`).

    python benchmarks/int8_heads.py --bundle bundles/effl0   # a calibrated bundle (reproduce.sh's first line)
    python benchmarks/int8_heads.py            # partitions + calibrates its own (needs more memory)
    python benchmarks/int8_heads.py --quick    # smoke test: few samples, few runs
Writes benchmarks/results/int8_heads.{json,png}; the given bundle is copied, never changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgecut.bundle import load_bundle
from edgecut.partition.build import partition
from edgecut.partition.calibrate import (
    CALIBRATION_AUGMENT,
    augmented_inputs,
    calibrate_bundle,
    run_frontiers,
    segment_chains,
)
from edgecut.partition.int8 import THREADS, heldout_split, profile_heads, quantize_bundle
from edgecut.partition.load import load_model
from edgecut.provenance import code_revision, package_versions
from edgecut.variants import DEFAULT_BUDGET

RESULTS = Path(__file__).parent / "results"
PACKAGES = ("edgecut", "onnxruntime", "onnx", "numpy", "torch")


def measure(tmp: Path, source: Path | None, calib: int, heldout: int, runs: int) -> dict[str, Any]:
    if source is not None:
        shutil.copytree(source, tmp / "effl0")
        bundle = load_bundle(tmp / "effl0")
    else:
        bundle = partition(load_model("efficientnet-lite0"), tmp / "effl0")
        bundle = calibrate_bundle(bundle, "builtin", codecs=("int8-channel",), heldout_count=heldout)
    bundle = quantize_bundle(bundle, "builtin", calib_count=calib, heldout_count=heldout)
    m = bundle.manifest
    variant = m.variants[-1]
    calib_photos, heldout_photos = heldout_split("builtin", m)
    sample = augmented_inputs(calib_photos, m.preprocess, 1, CALIBRATION_AUGMENT, 0)
    frontiers = run_frontiers(m, segment_chains(bundle), sample)
    latency = profile_heads(bundle, list(variant["files"].values()), frontiers, runs=runs)
    cuts = []
    for row in variant["cuts"]:
        depth = m.cut(row["cut"]).depth
        ms = {
            p: {str(t): round(sum(latency[(p, t, i)] for i in range(depth)), 3) for t in THREADS}
            for p in ("float", "int8")
        }
        cuts.append(row | {"edge_ms": ms, "speedup_1t": round(ms["float"]["1"] / ms["int8"]["1"], 2)})
    return {
        "model": bundle.name,
        "method": variant["method"],
        "budget": DEFAULT_BUDGET,
        "calibration_samples": calib,
        "heldout_samples": heldout,
        "heldout_photos": len(heldout_photos),
        "profile_runs": runs,
        "cuts": cuts,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = [c["cut"] for c in result["cuts"]]
    x = range(len(cuts))
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for p, style in (("float", "-"), ("int8", "--")):
        for t in THREADS:
            ax1.plot(
                x, [c["edge_ms"][p][str(t)] for c in result["cuts"]], style, marker="o", label=f"{p} {t}t"
            )
    ax1.set_ylabel("head latency, ms (this CPU)")
    ax1.legend()
    for p in ("float", "int8"):
        ax2.plot(x, [c["model_bytes"][p] / 1e6 for c in result["cuts"]], marker="o", label=p)
    ax2.set_ylabel("head bytes, MB")
    ax2.legend()
    ax3.plot(x, [100 * c["agreement"] for c in result["cuts"]], marker="o", label="int8 head + float tail")
    ax3.axhline(100 * (1 - result["budget"]), color="red", lw=0.8, label=f"budget {result['budget']:.0%}")
    ax3.set_ylabel("top-1 agreement, %")
    ax3.set_xticks(list(x), cuts)
    ax3.legend()
    fig.suptitle(
        f"{result['model']} int8 heads — {result['heldout_samples']} held-out samples of "
        f"{result['heldout_photos']} photos; {result['revision']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 samples, 3 runs")
    parser.add_argument("--bundle", type=Path, help="a calibrated EfficientNet-Lite0 bundle to copy")
    args = parser.parse_args()
    calib, heldout, runs = (8, 8, 3) if args.quick else (32, 64, 40)
    rev = code_revision()  # at the start: the code that runs, whatever is edited meanwhile
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(Path(tmp), args.bundle, calib, heldout, runs)
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "revision": rev,
        "versions": package_versions(PACKAGES),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": "python benchmarks/int8_heads.py"
        + (f" --bundle {args.bundle}" if args.bundle else "")
        + (" --quick" if args.quick else ""),
        "note": "x86-64 CPU shared with other jobs; Arm int8 kernels differ: re-profile on the device",
        "seconds": round(time.perf_counter() - t0, 1),
    } | measured
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("int8_heads_quick.json" if args.quick else "int8_heads.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    for c in result["cuts"]:
        ms = c["edge_ms"]
        print(
            f"{c['cut']:>7} float {ms['float']['1']:7.2f}/{ms['float']['2']:7.2f} ms  int8 "
            f"{ms['int8']['1']:7.2f}/{ms['int8']['2']:7.2f} ms (1t/2t)  "
            f"{c['model_bytes']['int8'] / 1e6:5.2f} MB  "
            f"agreement {100 * c['agreement']:5.1f} %  {'offered' if c['offered'] else 'not offered'}"
        )
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']} s")


if __name__ == "__main__":
    main()
