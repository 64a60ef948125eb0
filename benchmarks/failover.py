"""The cost of losing a tail replica mid-run: an edge agent over three replicas, one SIGKILLed.

Three real `edgecut cloud serve` processes on loopback (one ORT thread each, Prometheus on), the
edge agent in this process given all three addresses (gRPC round robin), a fixed cut, `--in-flight
4`, fallback `local`. After `--kill-at` results the replica that has received the most request
bytes (it carries streams right now) is SIGKILLed; the run goes on to `--inputs`. Reported:

- answers lost (inputs never answered: must be 0) and duplicated (answered twice: must be 0);
- the share answered by the cloud, and the local fallbacks (the issue asks for >= 80 % cloud);
- per-input latency (the agent's `total_ms`: head + seal + wire + tail + open, or the local tail
  after a failed try) in steady state (inputs finished before the kill, warm-up dropped) against
  the failover window (inputs in progress at any time in the `--window-s` after the kill): p50,
  p99, max. The PNG plots every input's latency against when it finished.

    python benchmarks/failover.py --bundle BUNDLE_DIR          # ~1-2 min on 2 cores

One run (the kill is a single event); the machine's 1-minute load average before and after is
recorded: this machine is shared with other work, so absolute latencies carry its noise. Writes
benchmarks/results/failover.json and .png with the command, `git describe --always --dirty` and
package versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from replicas import PACKAGES

from edgecut.cloud.spawn import tail_process
from edgecut.edge.agent import Result, image_input
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import generate_keys
from edgecut.provenance import code_revision, package_versions

RESULTS = Path(__file__).parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bytes_in(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("edgecut_bytes_in_total")
    )


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": pct(values, 50),
        "p99_ms": pct(values, 99),
        "max_ms": max(values) if values else None,
        "mean_ms": statistics.fmean(values) if values else None,
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundles = work / "bundles"
    bundles.mkdir()
    os.symlink(args.bundle.resolve(), bundles / "effl0")
    keys = generate_keys(work / "keys")
    photos = [image for _, image in sample_photos()]
    items = [image_input(i, f"photo{i}", photos[i % len(photos)]) for i in range(args.inputs)]
    rows: list[dict[str, Any]] = []
    kill: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        metrics = [_free_port() for _ in range(3)]
        replicas = [
            stack.enter_context(
                tail_process(bundles, keys.service_key, "--threads", "1", "--metrics-port", str(port))
            )
            for port in metrics
        ]
        config = EdgeConfig(
            bundles / "effl0",
            ",".join(address for _, address in replicas),
            keys.service_pub,
            cut=args.cut,
            threads=1,
            in_flight=4,
            deadline_ms=10_000,
        )
        with start_agent(config) as agent:
            t0 = time.perf_counter()

            def emit(result: Result) -> None:
                now = time.perf_counter() - t0
                total = float(result.timings_ms.get("total_ms", 0.0))
                rows.append(_row(result, now, total))
                if len(rows) == args.kill_at:
                    served = [_bytes_in(port) for port in metrics]
                    busiest = served.index(max(served))
                    replicas[busiest][0].send_signal(signal.SIGKILL)
                    kill.update(at_s=time.perf_counter() - t0, replica=busiest, bytes_in_before=served)

            agent.run(items, emit)
            wall_s = time.perf_counter() - t0
    return summarize(args, rows, kill, wall_s, load_before)


def _row(result: Result, done_s: float, total_ms: float) -> dict[str, Any]:
    return {
        "position": result.position,
        "where": result.where,
        "done_s": round(done_s, 4),
        "started_s": round(done_s - total_ms / 1e3, 4),
        "total_ms": round(total_ms, 3),
        "error": result.error,
    }


def summarize(
    args: argparse.Namespace, rows: list[dict[str, Any]], kill: dict[str, Any], wall_s: float, load: float
) -> dict[str, Any]:
    answered = Counter(r["position"] for r in rows)
    where = Counter(r["where"] for r in rows)
    t_kill = kill["at_s"]
    steady = [r["total_ms"] for r in rows[args.warmup :] if r["done_s"] < t_kill]
    window = [
        r["total_ms"] for r in rows if r["done_s"] >= t_kill and r["started_s"] <= t_kill + args.window_s
    ]
    after = [r["total_ms"] for r in rows if r["started_s"] > t_kill + args.window_s]
    return {
        "inputs": args.inputs,
        "answers_lost": sum(1 for i in range(args.inputs) if i not in answered),
        "answers_duplicated": sum(n - 1 for n in answered.values() if n > 1),
        "where": dict(where),
        "cloud_share": where["cloud"] / args.inputs,
        "kill": kill,
        "window_s": args.window_s,
        "latency": {
            "steady_state": stats(steady),
            "failover_window": stats(window),
            "after_window": stats(after),
        },
        "local_fallback_reasons": dict(Counter(r["error"] for r in rows if r["where"] != "cloud")),
        "wall_s": wall_s,
        "cut": args.cut,
        "rows": rows,
        "what_latency_includes": "agent total_ms per input: edge head, codec, seal, gRPC over loopback, "
        "queue + tail on a replica, open; a resent request includes its first, failed try",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
        "work (other sessions ran benchmarks and tests at the same time); three replicas and the edge agent "
        "on the same cores, loopback; no GPU",
        "load_1min_before": load,
        "load_1min_after": os.getloadavg()[0],
        "revision": code_revision(),
        "packages": package_versions(PACKAGES),
        "command": "python benchmarks/failover.py " + " ".join(sys.argv[1:]),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for where, marker in (("cloud", "o"), ("local", "x"), ("failed", "s")):
        mine = [r for r in result["rows"] if r["where"] == where]
        if mine:
            ax.plot([r["done_s"] for r in mine], [r["total_ms"] for r in mine], marker, ms=3, label=where)
    t_kill = result["kill"]["at_s"]
    ax.axvline(t_kill, color="red", ls="--", label=f"replica {result['kill']['replica']} SIGKILLed")
    ax.axvspan(t_kill, t_kill + result["window_s"], color="red", alpha=0.08, label="failover window")
    steady, failover = (result["latency"][k]["p99_ms"] for k in ("steady_state", "failover_window"))
    ax.set(
        xlabel="time the input finished, s",
        ylabel="per-input latency, ms",
        yscale="log",
        title=f"3 replicas, one killed: lost {result['answers_lost']}, cloud {result['cloud_share']:.0%}; "
        f"p99 steady {steady:.0f} ms vs failover {failover:.0f} ms ({result['revision']})",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="an EfficientNet-Lite0 bundle directory")
    parser.add_argument("--inputs", type=int, default=240)
    parser.add_argument("--kill-at", type=int, default=80, help="results emitted before the kill")
    parser.add_argument("--warmup", type=int, default=10, help="first results left out of steady state")
    parser.add_argument("--window-s", type=float, default=3.0, help="failover window after the kill, s")
    parser.add_argument("--cut", default="c06")
    parser.add_argument("--out", type=Path, default=RESULTS / "failover")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    lat = result["latency"]
    print(
        f"lost {result['answers_lost']}, duplicated {result['answers_duplicated']}, where {result['where']}; "
        f"p99 steady {lat['steady_state']['p99_ms']:.1f} ms, "
        f"failover {lat['failover_window']['p99_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
