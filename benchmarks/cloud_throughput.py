"""Tail-service throughput and latency vs concurrent edge streams, batching off and on.

The server runs as a real `edgecut cloud serve` subprocess; the edge streams are grpc.aio streams
in this process, each keeping one request in flight (closed loop), sealing a fresh frame per
request exactly as an edge does (int8-channel-z3 frontier, HPKE). The reference is the same tail run
batched in-process with no gRPC, codec or sealing: the ratio says what the service costs.

    python benchmarks/cloud_throughput.py            # ~2 min on 2 cores
    python benchmarks/cloud_throughput.py --quick    # smoke preset for CI

Writes benchmarks/results/cloud_throughput.json and .png and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgecut import codec, framing
from edgecut.bundle import Bundle, load_bundle
from edgecut.cloud.executor import OrtExecutor
from edgecut.cloud.spawn import tail_service
from edgecut.images import prepare, sample_photos
from edgecut.keys import ServicePublicKey, generate_keys, load_service_public
from edgecut.runtime import OrtOptions, SegmentChain
from edgecut.v1 import edgecut_pb2_grpc

RESULTS = Path(__file__).parent / "results"
WIRE_CODEC = codec.CodecSpec("int8", "channel", 3)


def deepest_cut(bundle: Bundle, shape: tuple[int, ...] = (1, 192, 7, 7)) -> str:
    """The deepest cut whose frontier is one `shape` tensor: the tail is light, so the service's
    own overhead (gRPC, sealing, codec, batching) is what the figure shows."""
    ids = [c.id for c in bundle.manifest.cuts if [t.shape for t in c.frontier] == [shape]]
    return ids[-1]


def payloads(bundle: Bundle, cut: str) -> tuple[list[bytes], list[dict[str, np.ndarray]]]:
    m = bundle.manifest
    chain = SegmentChain.from_files([bundle.path(s.file) for s in m.head(cut)], OrtOptions(threads=1))
    feeds = [chain.run({m.inputs[0].name: prepare(img, m.preprocess)}) for _, img in sample_photos()]
    frontier = m.cut(cut).frontier
    return [codec.encode(f, frontier, WIRE_CODEC) for f in feeds], feeds


def server_knobs(batching: bool, threads: int) -> list[str]:
    """`cloud serve` flags beyond what `edgecut.cloud.spawn.tail_service` passes."""
    batch = ["--max-batch", "8", "--max-queue-delay-ms", "2"] if batching else ["--max-batch", "1"]
    batch += [] if batching else ["--max-queue-delay-ms", "0"]
    return ["--threads", str(threads), "--max-queue", "1024", *batch]


async def one_stream(
    stub: Any,
    bundle: Bundle,
    cut: str,
    public: ServicePublicKey,
    bodies: list[bytes],
    stop_at: float,
    out: list[tuple[float, int]],
) -> None:
    m = bundle.manifest
    frames: asyncio.Queue[Any] = asyncio.Queue()

    async def requests() -> Any:
        while (frame := await frames.get()) is not None:
            yield frame

    call = stub.Infer(requests())
    k = 0
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        request = framing.build_request(
            public, payload=bodies[k % len(bodies)], model=m.model, version=m.version, cut=cut
        )
        for frame in request.frames:
            frames.put_nowait(frame)
        answer = await call.read()
        if answer.code != 0:
            raise RuntimeError(f"request failed: {answer.code} {answer.message}")
        out.append(((time.perf_counter() - t0) * 1e3, answer.timings.batch_size))
        k += 1
    frames.put_nowait(None)
    while await call.read() is not grpc.aio.EOF:
        pass


async def drive(
    address: str,
    streams: int,
    seconds: float,
    bundle: Bundle,
    cut: str,
    public: ServicePublicKey,
    bodies: list[bytes],
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address, options=framing.grpc_options()) as channel:
        stub = edgecut_pb2_grpc.TailServiceStub(channel)
        warm: list[tuple[float, int]] = []
        await asyncio.gather(
            *(
                one_stream(stub, bundle, cut, public, bodies, time.perf_counter() + 0.5, warm)
                for _ in range(streams)
            )
        )
        rows: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        await asyncio.gather(
            *(one_stream(stub, bundle, cut, public, bodies, t0 + seconds, rows) for _ in range(streams))
        )
        wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in rows)
    return {
        "requests": len(rows),
        "throughput_rps": len(rows) / wall,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_batch": statistics.fmean(r[1] for r in rows),
    }


def in_process(
    bundle: Bundle, cut: str, feeds: list[dict[str, np.ndarray]], threads: int, batch: int, seconds: float
) -> float:
    """Requests/s of the same tail, batched, called directly (no gRPC, codec or sealing)."""
    executor = OrtExecutor(OrtOptions(threads=threads))
    names = list(feeds[0])
    stacked = {n: np.concatenate([feeds[i % len(feeds)][n] for i in range(batch)]) for n in names}
    if not bundle.manifest.batchable:
        stacked = feeds[0]
        batch = 1
    executor.run(bundle, cut, stacked)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        executor.run(bundle, cut, stacked)
        done += batch
    return done / (time.perf_counter() - t0)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundles = work / "bundles"
    if args.bundle:
        bundles.mkdir()
        os.symlink(args.bundle.resolve(), bundles / "effl0")
    else:
        from edgecut.partition.build import partition
        from edgecut.partition.load import load_model

        partition(load_model("efficientnet-lite0"), bundles / "effl0")
    bundle = load_bundle(bundles / "effl0")
    keys = generate_keys(work / "keys")
    public = load_service_public(keys.service_pub)
    cut = args.cut or deepest_cut(bundle)
    bodies, feeds = payloads(bundle, cut)
    rows = []
    for batching in (False, True):
        with tail_service(bundles, keys.service_key, *server_knobs(batching, args.threads)) as address:
            for streams in args.streams:
                row = asyncio.run(drive(address, streams, args.seconds, bundle, cut, public, bodies))
                rows.append({"streams": streams, "batching": batching, **row})
                print_row(rows[-1])
    reference = in_process(bundle, cut, feeds, args.threads, 8, args.seconds)
    best = max(r["throughput_rps"] for r in rows if r["batching"])
    return {
        "cut": cut,
        "frontier": [list(t.shape) for t in bundle.manifest.cut(cut).frontier],
        "codec": str(WIRE_CODEC),
        "batchable": bundle.manifest.batchable,
        "tail_segments": [s.file for s in bundle.manifest.tail(cut)],
        "server_threads": args.threads,
        "seconds_per_point": args.seconds,
        "rows": rows,
        "in_process_batched_rps": reference,
        "ratio_best_to_in_process": best / reference,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        "server and clients on the same machine, loopback",
        "command": "python benchmarks/cloud_throughput.py " + " ".join(sys.argv[1:]),
    }


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['streams']:>7} {'on' if r['batching'] else 'off':>8} {r['throughput_rps']:>9.1f} "
        f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['mean_batch']:>6.2f}",
        flush=True,
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for batching in (False, True):
        rows = [r for r in result["rows"] if r["batching"] == batching]
        label = "batching on" if batching else "batching off"
        xs = [r["streams"] for r in rows]
        ax1.plot(xs, [r["throughput_rps"] for r in rows], "o-", label=label)
        ax2.plot(xs, [r["p50_ms"] for r in rows], "o-", label=f"{label} p50")
        ax2.plot(xs, [r["p99_ms"] for r in rows], "x--", label=f"{label} p99")
    ax1.axhline(result["in_process_batched_rps"], color="gray", ls=":", label="in-process, batched")
    ax1.set(
        xscale="log",
        xlabel="concurrent edge streams",
        ylabel="requests / s",
        title=f"tail after cut {result['cut']} (EfficientNet-Lite0)",
    )
    ax2.set(xscale="log", yscale="log", xlabel="concurrent edge streams", ylabel="latency, ms")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an existing EfficientNet-Lite0 bundle dir")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per point, s")
    parser.add_argument("--threads", type=int, default=1, help="server ORT intra-op threads")
    parser.add_argument("--cut", help="cut whose tail is served (default: the deepest 192x7x7)")
    parser.add_argument("--quick", action="store_true", help="smoke preset: 1 and 4 streams, 1 s")
    parser.add_argument("--out", type=Path, default=RESULTS / "cloud_throughput")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.seconds = [1, 4], 1.0
    print(f"{'streams':>7} {'batching':>8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    print(
        f"in-process batched: {result['in_process_batched_rps']:.1f} req/s; best service / "
        f"in-process = {result['ratio_best_to_in_process']:.2f} (cut {result['cut']})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
