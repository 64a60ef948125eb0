"""Per-cut latency breakdown and bytes of the demo model through loopback, and framework overhead.

The edge agent (this process) sends the real scikit-image photos to a tail service (a separate
process, as in production) at every cut, one request at a time (`in_flight=1`, so no request
waits behind another) with the service's batching wait set to 0 (a lone request would otherwise
wait `max_queue_delay_ms` for batch-mates that never come). Per request it records edge, encode
(+seal), wire, server queue/decode/compute/encode and total time, and the sealed bytes each way.

    framework overhead = measured total / (edge + encode + server compute + bytes/bandwidth + RTT)

(`edgecut.apps.sweep.report.framework_overhead`, the sweep's formula too)
with RTT (median of small Probes) and loopback bandwidth (a 4 MiB Probe) measured at start; the
ratio is the median over requests ("vs stages" divides by the sum of every measured stage
instead, server decode and wire included: the agent's own bookkeeping). Everything not in the
denominator — gRPC, framing, sealing the
answer, decoding on the server, Python between the steps — is overhead. Target: <= 1.05.

    python benchmarks/edge_loopback.py            # writes benchmarks/results/edge_loopback.{json,png}
    python benchmarks/edge_loopback.py --quick    # smoke test: three cuts, one pass
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from edgecut.apps.demo import cache_dir, cached_bundle
from edgecut.apps.sweep.report import framework_overhead
from edgecut.cloud.spawn import tail_service
from edgecut.edge.agent import Result, image_input
from edgecut.edge.session import SessionConfig, TailSession
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import generate_keys, load_service_public

RESULTS = Path(__file__).parent / "results"
WARMUP = 3  # requests per cut excluded from the statistics
BANDWIDTH_PROBE_BYTES = 4 << 20


def measure_link(address: str, pub: Path, model: str, version: str) -> dict[str, float]:
    """RTT (median of 30 empty Probes) and uplink bandwidth (median of 5 x 4 MiB Probes)."""
    session = TailSession(SessionConfig(address, load_service_public(pub), model, version))
    session.connect()
    try:
        for _ in range(5):
            session.probe()
        rtt = statistics.median(session.probe() for _ in range(30))
        big = statistics.median(session.probe(BANDWIDTH_PROBE_BYTES) for _ in range(5))
    finally:
        session.close()
    return {"rtt_ms": rtt, "up_bps": BANDWIDTH_PROBE_BYTES * 8 / max(big - rtt, 1e-3) * 1e3}


def run_cut(config: EdgeConfig, passes: int) -> list[Result]:
    photos = sample_photos()
    items = [
        image_input(i, f"{name}#{p}", im)
        for i, (p, (name, im)) in enumerate((p, x) for p in range(passes) for x in photos)
    ]
    results: list[Result] = []
    with start_agent(config) as agent:
        agent.run(items, results.append)
    return results[WARMUP:]


def summarize(cut: str, codec: str, results: list[Result], link: dict[str, float]) -> dict[str, Any]:
    cloud = [r for r in results if r.where == "cloud"]
    local = [r for r in results if r.where == "local" and not r.error]
    row: dict[str, Any] = {
        "cut": cut,
        "codec": codec,
        "requests": len(results),
        "failed": sum(r.where == "failed" for r in results),
    }
    keys = (
        "edge_ms",
        "encode_ms",
        "wire_ms",
        "server_queue_ms",
        "server_decode_ms",
        "server_compute_ms",
        "server_encode_ms",
        "total_ms",
    )
    for key in keys:
        row[key] = statistics.median(r.timings_ms.get(key, 0.0) for r in cloud or local)
    row["bytes_up"] = statistics.median(r.bytes_up for r in cloud) if cloud else 0
    row["bytes_down"] = statistics.median(r.bytes_down for r in cloud) if cloud else 0
    row["overhead"] = statistics.median(_overhead(r, link) for r in cloud) if cloud else 1.0
    row["unaccounted"] = statistics.median(_unaccounted(r) for r in cloud) if cloud else 1.0
    return row


def _unaccounted(r: Result) -> float:
    """Total over the sum of every measured stage: what the agent's own bookkeeping costs."""
    t = r.timings_ms
    return t["total_ms"] / (t["edge_ms"] + t["encode_ms"] + t["wire_ms"] + t["server_ms"])


def _overhead(r: Result, link: dict[str, float]) -> float:
    t = r.timings_ms
    return framework_overhead(
        t["total_ms"],
        t["edge_ms"],
        t["encode_ms"],
        t["server_compute_ms"],
        r.bytes_up,
        r.bytes_down,
        link["up_bps"],
        link["rtt_ms"],
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [
        ("edge_ms", "edge"),
        ("encode_ms", "encode+seal"),
        ("wire_ms", "wire"),
        ("server_queue_ms", "server queue"),
        ("server_decode_ms", "server decode"),
        ("server_compute_ms", "server compute"),
        ("server_encode_ms", "server encode"),
    ]
    labels = [f"{r['cut']}\n{r['codec']}" for r in rows]
    fig, ax = plt.subplots(figsize=(12, 5))
    bottom = [0.0] * len(rows)
    for key, name in parts:
        values = [r[key] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.plot(labels, [r["total_ms"] for r in rows], "k.", label="measured total")
    ax.set_ylabel("median latency, ms")
    ax2 = ax.twinx()
    ax2.plot(labels, [r["bytes_up"] / 1e3 for r in rows], "r--o", label="kB up (sealed)")
    ax2.set_ylabel("kB up", color="r")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("EfficientNet-Lite0 split over loopback: latency by stage and bytes per cut")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three cuts, one pass (smoke test)")
    parser.add_argument("--passes", type=int, default=4, help="passes over the 7 photos per cut")
    args = parser.parse_args()
    bundle = cached_bundle(cache_dir())
    m = bundle.manifest
    cuts = [("input", "jpeg90")] + [(c.id, "int8") for c in m.cuts[:-1]] + [("output", "none")]
    if args.quick:
        cuts = [cuts[0], cuts[len(cuts) // 2], cuts[-2]]
    passes = 1 if args.quick else args.passes
    with tempfile.TemporaryDirectory() as tmp:
        keys = generate_keys(Path(tmp) / "keys")
        with tail_service(
            bundle.root.parent, keys.service_key, "--max-queue-delay-ms", "0", "--threads", "1"
        ) as address:
            link = measure_link(address, keys.service_pub, m.model, m.version)
            rows = []
            for cut, codec in cuts:
                config = EdgeConfig(
                    bundle=bundle.root,
                    server=address,
                    server_key=keys.service_pub,
                    cut=cut,
                    codec=codec,
                    in_flight=1,
                    threads=1,
                    fallback="fail",
                )
                rows.append(summarize(cut, codec, run_cut(config, passes), link))
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "model": bundle.name,
        "setup": "edge agent in-process, tail service subprocess, 127.0.0.1, in_flight=1, "
        "server max_queue_delay_ms=0, 1 ORT thread each side",
        "link": link,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("edge_loopback_quick.json" if args.quick else "edge_loopback.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print_table(rows, link)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def print_table(rows: list[dict[str, Any]], link: dict[str, float]) -> None:
    print(f"loopback: RTT {link['rtt_ms']:.2f} ms, up {link['up_bps'] / 1e9:.2f} Gbit/s")
    head = (
        "cut",
        "codec",
        "bytes up",
        "edge",
        "enc",
        "wire",
        "queue",
        "sdec",
        "compute",
        "senc",
        "total",
        "overhead",
        "vs stages",
    )
    print(("{:<7}{:<8}" + "{:>10}" * (len(head) - 2)).format(*head))
    for r in rows:
        print(
            ("{:<7}{:<8}{:>10}" + "{:>10.2f}" * 8 + "{:>10.3f}" * 2).format(
                r["cut"],
                r["codec"],
                int(r["bytes_up"]),
                r["edge_ms"],
                r["encode_ms"],
                r["wire_ms"],
                r["server_queue_ms"],
                r["server_decode_ms"],
                r["server_compute_ms"],
                r["server_encode_ms"],
                r["total_ms"],
                r["overhead"],
                r["unaccounted"],
            )
        )


if __name__ == "__main__":
    main()
