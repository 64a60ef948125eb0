"""Tail-service throughput with 1, 2 and 3 local replicas on the same machine's cores.

Each replica is a real `edgecut cloud serve` subprocess with ONE ORT thread (batching on: up to 8
requests, 2 ms wait); the clients are grpc.aio streams in this process, closed loop (one request in
flight per stream), sealing a fresh int8 frame per request as an edge does. Streams are spread
evenly over the replicas (stream i → replica i mod N), which is where gRPC `round_robin` ends up
once every replica is READY. A baseline of one replica with as many ORT threads as the machine has
cores says whether replicas beat threads on the same cores. Run order is shuffled per repetition;
the 1-minute load average before each point is recorded (this machine is shared).

    python benchmarks/replicas.py --bundle BUNDLE_DIR          # ~2 min on 2 cores
    python benchmarks/replicas.py --bundle BUNDLE_DIR --quick  # smoke preset

Writes benchmarks/results/replicas.json and .png. What a ratio includes: requests answered per
second of wall time, end to end (seal, gRPC over loopback, open, decode, batch, tail, seal answer),
clients and replicas competing for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from cloud_throughput import one_stream, payloads

from edgecut import framing
from edgecut.bundle import Bundle, load_bundle
from edgecut.cloud.spawn import tail_service
from edgecut.keys import ServicePublicKey, generate_keys, load_service_public
from edgecut.provenance import code_revision, package_versions
from edgecut.v1 import edgecut_pb2_grpc

RESULTS = Path(__file__).parent / "results"
PACKAGES = ("edgecut", "onnxruntime", "grpcio", "protobuf", "numpy", "cryptography", "zstandard")


def middle_cut(bundle: Bundle) -> str:
    """A cut halfway down: the tail does real work, so replicas have compute to share."""
    ids = [c.id for c in bundle.manifest.cuts]
    return ids[len(ids) // 2]


async def drive(
    addresses: list[str],
    streams: int,
    seconds: float,
    bundle: Bundle,
    cut: str,
    public: ServicePublicKey,
    bodies: list[bytes],
) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(a, options=framing.grpc_options()) for a in addresses]
    stubs = [edgecut_pb2_grpc.TailServiceStub(c) for c in channels]
    try:
        warm: list[tuple[float, int]] = []
        end = time.perf_counter() + 1.0
        await asyncio.gather(
            *(
                one_stream(stubs[i % len(stubs)], bundle, cut, public, bodies, end, warm)
                for i in range(streams)
            )
        )
        rows: list[tuple[float, int]] = []
        cpu0, t0 = replicas_cpu_s(), time.perf_counter()
        await asyncio.gather(
            *(
                one_stream(stubs[i % len(stubs)], bundle, cut, public, bodies, t0 + seconds, rows)
                for i in range(streams)
            )
        )
        wall, cpu_s = time.perf_counter() - t0, replicas_cpu_s() - cpu0
    finally:
        for channel in channels:
            await channel.close()
    latencies = sorted(r[0] for r in rows)
    return {
        "requests": len(rows),
        "throughput_rps": len(rows) / wall,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "mean_batch": statistics.fmean(r[1] for r in rows),
        "replicas_cpu_s": cpu_s,
        "requests_per_replica_cpu_s": len(rows) / cpu_s,
    }


def replicas_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's children: the replicas.

    On a shared machine throughput also measures how much CPU the replicas won from other work;
    requests per replica CPU-second does not.
    """
    total = 0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (after pid, comm)
    return total / os.sysconf("SC_CLK_TCK")


def point(
    args: argparse.Namespace, bundles: Path, keys: Any, replicas: int, threads: int, ctx: dict[str, Any]
) -> dict[str, Any]:
    knobs = [
        "--threads",
        str(threads),
        "--max-batch",
        "8",
        "--max-queue-delay-ms",
        "2",
        "--max-queue",
        "1024",
    ]
    with contextlib.ExitStack() as stack:
        addresses = [
            stack.enter_context(tail_service(bundles, keys.service_key, *knobs)) for _ in range(replicas)
        ]
        load = os.getloadavg()[0]
        row = asyncio.run(
            drive(
                addresses, args.streams, args.seconds, ctx["bundle"], ctx["cut"], ctx["public"], ctx["bodies"]
            )
        )
    return {
        "replicas": replicas,
        "ort_threads_each": threads,
        "streams": args.streams,
        "load_1min": load,
        **row,
    }


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundles = work / "bundles"
    bundles.mkdir()
    os.symlink(args.bundle.resolve(), bundles / "effl0")
    bundle = load_bundle(bundles / "effl0")
    keys = generate_keys(work / "keys")
    cut = args.cut or middle_cut(bundle)
    bodies, _ = payloads(bundle, cut)
    ctx = {"bundle": bundle, "cut": cut, "public": load_service_public(keys.service_pub), "bodies": bodies}
    cores = os.cpu_count() or 1
    configs = [(n, 1) for n in args.replicas] + ([(1, cores)] if cores > 1 else [])
    rng = random.Random(args.seed)
    rows = []
    for rep in range(args.repeat):
        order = configs[:]
        rng.shuffle(order)
        for replicas, threads in order:
            row = {"repetition": rep, **point(args, bundles, keys, replicas, threads, ctx)}
            rows.append(row)
            print_row(row)
    return {
        "cut": cut,
        "tail_segments": [s.file for s in bundle.manifest.tail(cut)],
        "codec": "int8-channel-z3",
        "streams": args.streams,
        "seconds_per_point": args.seconds,
        "rows": rows,
        "summary": summarize(rows),
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores shared with other work; "
        "replicas and clients on the same machine, loopback; no GPU",
        "revision": code_revision(),
        "packages": package_versions(PACKAGES),
        "command": "python benchmarks/replicas.py " + " ".join(sys.argv[1:]),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({(r["replicas"], r["ort_threads_each"]) for r in rows})
    out = []
    for replicas, threads in keys:
        mine = [r for r in rows if (r["replicas"], r["ort_threads_each"]) == (replicas, threads)]
        out.append(
            {
                "replicas": replicas,
                "ort_threads_each": threads,
                "median_rps": statistics.median(r["throughput_rps"] for r in mine),
                "median_p50_ms": statistics.median(r["p50_ms"] for r in mine),
                "median_p99_ms": statistics.median(r["p99_ms"] for r in mine),
                "median_requests_per_replica_cpu_s": statistics.median(
                    r["requests_per_replica_cpu_s"] for r in mine
                ),
            }
        )
    return out


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['replicas']:>8} {r['ort_threads_each']:>7} {r['throughput_rps']:>9.1f} {r['p50_ms']:>8.2f} "
        f"{r['p99_ms']:>8.2f} {r['mean_batch']:>6.2f} {r['load_1min']:>6.1f} "
        f"{r['requests_per_replica_cpu_s']:>8.1f}",
        flush=True,
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    one_thread = [r for r in result["rows"] if r["ort_threads_each"] == 1]
    ax1.plot(
        [r["replicas"] for r in one_thread],
        [r["throughput_rps"] for r in one_thread],
        "o",
        alpha=0.5,
        label="each run",
    )
    med = [s for s in result["summary"] if s["ort_threads_each"] == 1]
    ax1.plot(
        [s["replicas"] for s in med], [s["median_rps"] for s in med], "o-", label="median (1 ORT thread each)"
    )
    for s in result["summary"]:
        if s["ort_threads_each"] > 1:
            ax1.axhline(
                s["median_rps"], color="gray", ls=":", label=f"1 replica, {s['ort_threads_each']} ORT threads"
            )
    ax1.set(
        xlabel="replicas",
        ylabel="requests / s",
        title=f"tail after cut {result['cut']}, {result['streams']} streams",
        xticks=[s["replicas"] for s in med],
    )
    ax3.plot(
        [s["replicas"] for s in med],
        [s["median_requests_per_replica_cpu_s"] for s in med],
        "o-",
        label="median (1 ORT thread each)",
    )
    ax3.set(xlabel="replicas", ylabel="requests / replica CPU-second", xticks=[s["replicas"] for s in med])
    ax2.plot([s["replicas"] for s in med], [s["median_p50_ms"] for s in med], "o-", label="p50")
    ax2.plot([s["replicas"] for s in med], [s["median_p99_ms"] for s in med], "x--", label="p99")
    ax2.set(xlabel="replicas", ylabel="latency, ms", xticks=[s["replicas"] for s in med])
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax3.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="an EfficientNet-Lite0 bundle directory")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--streams", type=int, default=12, help="concurrent closed-loop streams")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per point, s")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions, each in a shuffled order")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--cut", help="cut whose tail is served (default: the middle cut)")
    parser.add_argument("--quick", action="store_true", help="smoke preset: 1 and 2 replicas, 1 s, once")
    parser.add_argument("--out", type=Path, default=RESULTS / "replicas")
    args = parser.parse_args()
    if args.quick:
        args.replicas, args.seconds, args.repeat = [1, 2], 1.0, 1
    print(
        f"{'replicas':>8} {'threads':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'load':>6} "
        f"{'req/cpu-s':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
