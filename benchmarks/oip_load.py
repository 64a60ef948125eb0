"""Open Inference Protocol load: throughput and latency at concurrency 1, 4, 16, batching off and on.

What `perf_analyzer --concurrency-range` measures, with tritonclient in a closed loop instead:
PyPI's `perf-analyzer` (0.1.0, the only release) is an empty placeholder package with no binary,
and the real one ships in NVIDIA's Triton SDK container, which this machine cannot pull. Each of
N concurrent callers (`tritonclient.grpc.aio`, one channel) keeps one ModelInfer in flight; the
server is a real `edgecut cloud serve` subprocess. Models: the whole network (`<model>`, FP32
224×224 input) and the tail behind a cut (`<model>@<cut>`, its FP32 frontier).

    python benchmarks/oip_load.py --bundle PATH     # ~2 min on 2 cores
    python benchmarks/oip_load.py --quick           # smoke preset

Writes benchmarks/results/oip_load.json, .csv and .png and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgecut.bundle import Bundle, load_bundle
from edgecut.cloud.spawn import tail_service
from edgecut.images import prepare, sample_photos
from edgecut.keys import generate_keys
from edgecut.provenance import code_revision, package_versions
from edgecut.runtime import OrtOptions, SegmentChain

sys.path.insert(0, str(Path(__file__).parent))
from cloud_throughput import PACKAGES, server_knobs

RESULTS = Path(__file__).parent / "results"


def inputs_for(bundle: Bundle, cut: str) -> dict[str, np.ndarray]:
    """The chelsea photo as the model input (whole model) or as the head's output at `cut`."""
    m = bundle.manifest
    x = {m.inputs[0].name: prepare(dict(sample_photos())["chelsea"], m.preprocess)}
    if cut == "input":
        return x
    chain = SegmentChain.from_files([bundle.path(s.file) for s in m.head(cut)], OrtOptions(threads=1))
    return chain.run(x)


async def drive(
    address: str, model: str, feeds: dict[str, np.ndarray], n: int, seconds: float
) -> dict[str, Any]:
    import tritonclient.grpc.aio as tga

    client = tga.InferenceServerClient(address)
    latencies_us: list[float] = []

    def build() -> list[Any]:
        out = []
        for name, x in feeds.items():
            t = tga.InferInput(name, list(x.shape), "FP32")
            t.set_data_from_numpy(x)
            out.append(t)
        return out

    async def caller(stop_at: float, record: bool) -> None:
        inputs = build()
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await client.infer(model, inputs)
            if record:
                latencies_us.append((time.perf_counter() - t0) * 1e6)

    try:
        await asyncio.gather(*(caller(time.perf_counter() + 0.5, False) for _ in range(n)))
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(t0 + seconds, True) for _ in range(n)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    lat = np.sort(np.asarray(latencies_us))
    return {
        "requests": len(lat),
        "throughput_infer_per_s": len(lat) / wall,
        "p50_us": float(np.percentile(lat, 50)),
        "p90_us": float(np.percentile(lat, 90)),
        "p99_us": float(np.percentile(lat, 99)),
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundles = work / "bundles"
    bundles.mkdir()
    os.symlink(args.bundle.resolve(), bundles / "effl0")
    bundle = load_bundle(bundles / "effl0")
    keys = generate_keys(work / "keys")
    model = bundle.manifest.model
    targets = {"input": model, args.cut: f"{model}@{args.cut}"}
    feeds = {cut: inputs_for(bundle, cut) for cut in targets}
    rng = random.Random(args.seed)
    rows = []
    for batching in rng.sample([False, True], 2):
        with tail_service(bundles, keys.service_key, *server_knobs(batching, args.threads)) as address:
            plan = [(cut, n) for cut in targets for n in args.concurrency]
            rng.shuffle(plan)
            for cut, n in plan:
                r = asyncio.run(drive(address, targets[cut], feeds[cut], n, args.seconds))
                rows.append({"model": targets[cut], "batching": batching, "concurrency": n, **r})
                print_row(rows[-1])
    return {
        "rows": sorted(rows, key=lambda r: (r["model"], r["batching"], r["concurrency"])),
        "client": "tritonclient.grpc.aio closed loop (perf_analyzer unavailable: PyPI perf-analyzer 0.1.0 "
        "is an empty placeholder; the binary ships only in the Triton SDK container)",
        "server_threads": args.threads,
        "seconds_per_point": args.seconds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, server and "
        "clients on the same machine, loopback; other jobs were running on it",
        "command": "python benchmarks/oip_load.py " + " ".join(sys.argv[1:]),
        "revision": code_revision(),
        "versions": package_versions(PACKAGES),
    }


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['model']:>26} {'on' if r['batching'] else 'off':>8} {r['concurrency']:>11} "
        f"{r['throughput_infer_per_s']:>9.1f} {r['p50_us']:>9.0f} {r['p90_us']:>9.0f} {r['p99_us']:>9.0f}",
        flush=True,
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in result["rows"]}):
        for batching in (False, True):
            rows = [r for r in result["rows"] if r["model"] == model and r["batching"] == batching]
            label = f"{model}, batching {'on' if batching else 'off'}"
            xs = [r["concurrency"] for r in rows]
            ax1.plot(xs, [r["throughput_infer_per_s"] for r in rows], "o-", label=label)
            ax2.plot(xs, [r["p99_us"] / 1e3 for r in rows], "o-", label=label)
    ax1.set(xscale="log", xlabel="concurrency", ylabel="infer / s", title="Open Inference Protocol, gRPC")
    ax2.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="p99 latency, ms")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"edgecut cloud serve, tritonclient closed loop ({result['revision']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="an EfficientNet-Lite0 bundle dir")
    parser.add_argument("--cut", default="c11", help="the cut whose tail is the second model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per point, s")
    parser.add_argument("--threads", type=int, default=1, help="server ORT intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="run-order shuffle seed")
    parser.add_argument("--quick", action="store_true", help="smoke preset: concurrency 1 and 4, 1 s")
    parser.add_argument("--out", type=Path, default=RESULTS / "oip_load")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.seconds = [1, 4], 1.0
    print(
        f"{'model':>26} {'batching':>8} {'concurrency':>11} {'infer/s':>9} "
        f"{'p50 us':>9} {'p90 us':>9} {'p99 us':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
