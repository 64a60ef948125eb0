"""Regenerate the committed LiteRT conversions used by tests/integration/test_litert.py.

The test suite's environment has no converter (litert-torch is ~1.4 GB), so the head segments of
the EfficientNet-Lite0 bundle are converted once, here, and committed with `sources.json`, which
pins each `.tflite` to the ONNX segment it came from (by `onnx_fingerprint`: the segment's bytes
without exporter metadata, which holds absolute install paths). Run it again when the test says
the bundle's segments changed (new torch / exporter / cut selection). Needs a converter venv:

    python3 -m venv /work/venv-litert && . /work/venv-litert/bin/activate
    pip install torch==2.13.0 && pip install litert-torch && pip install --no-deps onnx2torch
    pip install -e ".[partition]"          # then, from the repository root:
    python tests/data/effl0_tflite/regenerate.py [--bundle DIR] [--segments 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SEGMENTS = 5  # seg_001..seg_005: heads for cuts c01..c05, ~0.37 MB in all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, help="an EfficientNet-Lite0 bundle (default: partition one in a temp dir)"
    )
    parser.add_argument(
        "--segments",
        type=int,
        default=DEFAULT_SEGMENTS,
        help=f"convert the first N segments (default {DEFAULT_SEGMENTS})",
    )
    args = parser.parse_args(argv)

    from edgecut.bundle import load_bundle, sha256_file
    from edgecut.partition.tflite import convert_bundle, onnx_fingerprint, tflite_file

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "effl0"
        if args.bundle is None:
            from edgecut.partition.build import partition
            from edgecut.partition.load import load_model

            partition(load_model("efficientnet-lite0"), work)
        else:
            shutil.copytree(args.bundle, work)
        bundle = convert_bundle(load_bundle(work), segments=range(args.segments))
        report = bundle.manifest.verification["tflite"]
        for old in HERE.glob("seg_*.tflite"):
            old.unlink()
        sources = {}
        for seg in bundle.manifest.segments[: args.segments]:
            name = Path(seg.file).stem
            if report[name]["status"] != "ok":
                print(f"{name}: {report[name]['status']}: {report[name]['error']}", file=sys.stderr)
                return 1
            shutil.copyfile(bundle.path(tflite_file(seg)), HERE / f"{name}.tflite")
            sources[name] = {
                "onnx_fingerprint": onnx_fingerprint(bundle.path(seg.file)),
                "tflite_sha256": sha256_file(HERE / f"{name}.tflite"),
                "inputs": list(seg.inputs),
                "outputs": list(seg.outputs),
                "max_abs_diff": report[name]["max_abs_diff"],
                "scale": report[name]["scale"],
            }
        versions = {
            d: metadata.version(d) for d in ("torch", "litert-torch", "onnx2torch", "ai-edge-litert", "onnx")
        }
        (HERE / "sources.json").write_text(
            json.dumps({"model": bundle.manifest.model, "converter": versions, "segments": sources}, indent=1)
            + "\n"
        )
    for name, s in sources.items():
        size = (HERE / f"{name}.tflite").stat().st_size
        print(f"{name}: {size / 1e3:.0f} kB, max |Δ| {s['max_abs_diff']:.3g} (scale {s['scale']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
