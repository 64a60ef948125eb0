"""Tail-service throughput and latency over gRPC vs the same pipeline in process, per cut.

The server runs as a real `edgecut cloud serve` subprocess; the edge streams are grpc.aio streams
in this process, each keeping one request in flight (closed loop), sealing a fresh frame per
request exactly as an edge does (int8-channel-z3 frontier, HPKE). The reference is the same
`TailPipeline` (edgecut.cloud.pipeline) built in this process with the same settings and driven by
the same closed loop: requests are sealed, chunked and reassembled, then opened, decoded, batched,
run, encoded and sealed, with no socket. So the ratio gRPC / in-process is what the transport costs
(gRPC, HTTP/2, protobuf, the servicer's stream handling), nothing else. Note the gRPC server has its
own process (its own GIL), the in-process pipeline shares one with its clients.

    python benchmarks/cloud_throughput.py            # ~4 min on 2 cores
    python benchmarks/cloud_throughput.py --quick    # smoke preset for CI

Writes benchmarks/results/cloud_throughput.json and .png and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgecut import codec, framing, sealing
from edgecut.bundle import Bundle, load_bundle
from edgecut.cloud.admission import Caller
from edgecut.cloud.config import ServeConfig
from edgecut.cloud.context import build_context
from edgecut.cloud.pipeline import TailPipeline
from edgecut.cloud.spawn import tail_service
from edgecut.images import prepare, sample_photos
from edgecut.keys import KeyPaths, ServicePublicKey, generate_keys, load_service_public
from edgecut.provenance import code_revision, package_versions
from edgecut.runtime import OrtOptions, SegmentChain
from edgecut.v1 import edgecut_pb2_grpc

PACKAGES = ("edgecut", "grpcio", "protobuf", "onnxruntime", "numpy", "tritonclient")

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
    return summarize(rows, wall)


async def in_process_stream(
    pipeline: TailPipeline,
    bundle: Bundle,
    cut: str,
    public: ServicePublicKey,
    bodies: list[bytes],
    stop_at: float,
    out: list[tuple[float, int]],
) -> None:
    """`one_stream` without the socket: seal and chunk, reassemble, answer through the pipeline."""
    m = bundle.manifest
    caller = Caller(None, sealing.device_identity(None, None))
    reassembler = framing.Reassembler()
    k = 0
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        request = framing.build_request(
            public, payload=bodies[k % len(bodies)], model=m.model, version=m.version, cut=cut
        )
        whole = None
        for frame in request.frames:
            whole = reassembler.add(frame)
        assert whole is not None
        answer = await pipeline.answer_sealed(*whole, caller)
        if answer.code != 0:
            raise RuntimeError(f"request failed: {answer.code} {answer.message}")
        out.append(((time.perf_counter() - t0) * 1e3, answer.timings.batch_size))
        k += 1


async def drive_in_process(
    config: ServeConfig,
    streams: list[int],
    seconds: float,
    bundle: Bundle,
    cut: str,
    public: ServicePublicKey,
    bodies: list[bytes],
) -> list[dict[str, Any]]:
    ctx, pool = await build_context(config)
    pipeline = TailPipeline(ctx)
    results = []
    try:
        for n in streams:
            warm: list[tuple[float, int]] = []
            stop = time.perf_counter() + 0.5
            await asyncio.gather(
                *(in_process_stream(pipeline, bundle, cut, public, bodies, stop, warm) for _ in range(n))
            )
            rows: list[tuple[float, int]] = []
            t0 = time.perf_counter()
            await asyncio.gather(
                *(
                    in_process_stream(pipeline, bundle, cut, public, bodies, t0 + seconds, rows)
                    for _ in range(n)
                )
            )
            results.append({"streams": n, **summarize(rows, time.perf_counter() - t0)})
    finally:
        await ctx.batcher.close()
        pool.shutdown(wait=False, cancel_futures=True)
    return results


def summarize(rows: list[tuple[float, int]], wall: float) -> dict[str, Any]:
    latencies = sorted(r[0] for r in rows)
    return {
        "requests": len(rows),
        "throughput_rps": len(rows) / wall,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_batch": statistics.fmean(r[1] for r in rows),
    }


def serve_config(bundles: Path, keys: KeyPaths, batching: bool, threads: int) -> ServeConfig:
    """The in-process twin of `server_knobs` + what `tail_service` passes."""
    batch = (
        {"max_batch": 8, "max_queue_delay_ms": 2} if batching else {"max_batch": 1, "max_queue_delay_ms": 0}
    )
    return ServeConfig(
        bundles=bundles,
        key=keys.service_key,
        port=0,
        threads=threads,
        max_queue=1024,
        poll_interval_s=0,
        **batch,
    )


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
    cuts = args.cuts or [deepest_cut(bundle)]
    rng = random.Random(args.seed)
    rows = []
    plan = [
        (cut, batching, transport) for cut in cuts for batching in (False, True) for transport in TRANSPORTS
    ]
    rng.shuffle(plan)  # run order shuffled: drift (other load on the machine) spreads over all points
    payload = {cut: payloads(bundle, cut)[0] for cut in cuts}
    for cut, batching, transport in plan:
        streams = rng.sample(args.streams, len(args.streams))
        bodies = payload[cut]
        if transport == "grpc":
            with tail_service(bundles, keys.service_key, *server_knobs(batching, args.threads)) as address:
                got = [
                    {
                        "streams": n,
                        **asyncio.run(drive(address, n, args.seconds, bundle, cut, public, bodies)),
                    }
                    for n in streams
                ]
        else:
            config = serve_config(bundles, keys, batching, args.threads)
            got = asyncio.run(drive_in_process(config, streams, args.seconds, bundle, cut, public, bodies))
        for r in got:
            rows.append({"cut": cut, "transport": transport, "batching": batching, **r})
            print_row(rows[-1])
    return {
        "cuts": {c: [list(t.shape) for t in bundle.manifest.cut(c).frontier] for c in cuts},
        "codec": str(WIRE_CODEC),
        "batchable": bundle.manifest.batchable,
        "server_threads": args.threads,
        "seconds_per_point": args.seconds,
        "rows": rows,
        "ratios": ratios(rows),
        "ratio_includes": "both sides seal (HPKE), chunk, reassemble, open, decode (int8-channel-z3 + zstd), "
        "batch, run the tail (ORT), encode and seal the answer; gRPC adds the socket, HTTP/2, protobuf and "
        "the servicer; the gRPC server is a separate process, the in-process pipeline shares one "
        "with its clients",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        "server and clients on the same machine, loopback; other jobs were running on it",
        "command": "python benchmarks/cloud_throughput.py " + " ".join(sys.argv[1:]),
        "revision": code_revision(),
        "versions": package_versions(PACKAGES),
    }


TRANSPORTS = ("grpc", "in_process")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gRPC / in-process throughput per cut, batching and streams; and per cut, best vs best."""
    out = []
    key = lambda r: (r["cut"], r["batching"], r["streams"])  # noqa: E731
    grpc_rows = {key(r): r for r in rows if r["transport"] == "grpc"}
    local = {key(r): r for r in rows if r["transport"] == "in_process"}
    for k in sorted(grpc_rows.keys() & local.keys()):
        ratio = grpc_rows[k]["throughput_rps"] / local[k]["throughput_rps"]
        out.append({"cut": k[0], "batching": k[1], "streams": k[2], "ratio": ratio})
    for cut in sorted({r["cut"] for r in rows}):
        best = {
            t: max(r["throughput_rps"] for r in rows if r["cut"] == cut and r["transport"] == t)
            for t in TRANSPORTS
        }
        out.append(
            {"cut": cut, "batching": "best", "streams": "best", "ratio": best["grpc"] / best["in_process"]}
        )
    return out


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['cut']:>5} {r['transport']:>10} {r['streams']:>7} {'on' if r['batching'] else 'off':>8} "
        f"{r['throughput_rps']:>9.1f} "
        f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['mean_batch']:>6.2f}",
        flush=True,
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = list(result["cuts"])
    fig, axes = plt.subplots(1, len(cuts), figsize=(5 * len(cuts), 4), squeeze=False)
    for ax, cut in zip(axes[0], cuts, strict=True):
        for transport, style in (("grpc", "o-"), ("in_process", "x--")):
            for batching in (False, True):
                rows = sorted(
                    (
                        r
                        for r in result["rows"]
                        if (r["cut"], r["transport"], r["batching"]) == (cut, transport, batching)
                    ),
                    key=lambda r: r["streams"],
                )
                label = f"{transport}, batching {'on' if batching else 'off'}"
                ax.plot([r["streams"] for r in rows], [r["throughput_rps"] for r in rows], style, label=label)
        ax.set(
            xscale="log", xlabel="concurrent edge streams", ylabel="requests / s", title=f"tail after {cut}"
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"EfficientNet-Lite0 tail: gRPC vs the same pipeline in process ({result['revision']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an existing EfficientNet-Lite0 bundle dir")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per point, s")
    parser.add_argument("--threads", type=int, default=1, help="server ORT intra-op threads")
    parser.add_argument(
        "--cuts", "--cut", nargs="+", help="cuts whose tails are served (default: the deepest 192x7x7)"
    )
    parser.add_argument("--seed", type=int, default=0, help="run-order shuffle seed")
    parser.add_argument("--quick", action="store_true", help="smoke preset: 1 and 4 streams, 1 s")
    parser.add_argument("--out", type=Path, default=RESULTS / "cloud_throughput")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.seconds = [1, 4], 1.0
    print(
        f"{'cut':>5} {'transport':>10} {'streams':>7} {'batching':>8} {'req/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'batch':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    for r in result["ratios"]:
        print(
            f"cut {r['cut']} batching {r['batching']} streams {r['streams']}: "
            f"gRPC / in-process {r['ratio']:.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
