"""The three sweep figures as PNGs (matplotlib, Agg: no display needed).

1. `breakdown.png`: stacked median latency by stage per grid cell, one panel per link setting,
   with the planner's prediction beside each bar.
2. `bytes.png`: sealed bytes up per cut for each codec, with the JPEG-q90 upload as a line.
3. `latency_vs_bandwidth.png`: end-to-end latency of edge-only, cloud-only, auto and oracle
   against bandwidth, one panel per RTT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgecut.apps.sweep.report import PARTS, CellStats, LinkSummary

STAGE_NAMES = {
    "edge_ms": "edge",
    "encode_ms": "encode+seal",
    "wire_ms": "wire",
    "server_queue_ms": "server queue",
    "server_decode_ms": "server decode",
    "server_compute_ms": "server compute",
    "server_encode_ms": "server encode",
    "decode_ms": "answer decode",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_all(
    cells: Sequence[CellStats], links: Sequence[LinkSummary], out: Path, subtitle: str
) -> list[Path]:
    """Write the three figures into `out`; returns their paths."""
    paths = [out / "breakdown.png", out / "bytes.png", out / "latency_vs_bandwidth.png"]
    breakdown(cells, paths[0], subtitle)
    bytes_per_cut(cells, paths[1], subtitle)
    latency_vs_bandwidth(links, paths[2], subtitle)
    return paths


def breakdown(cells: Sequence[CellStats], path: Path, subtitle: str) -> None:
    plt = _pyplot()
    grid = [c for c in cells if c.cell.role == "grid" and c.ok]
    rtts = sorted({c.link.rtt_ms for c in grid})
    bandwidths = sorted({c.link.bandwidth_bps for c in grid})
    fig, axes = plt.subplots(
        len(rtts), len(bandwidths), squeeze=False, figsize=(3.6 * len(bandwidths) + 1, 3.6 * len(rtts) + 1)
    )
    for row, rtt in enumerate(rtts):
        for col, bps in enumerate(bandwidths):
            ax = axes[row][col]
            mine = [c for c in grid if c.link.rtt_ms == rtt and c.link.bandwidth_bps == bps]
            _stack(ax, mine, legend=row == 0 and col == 0)
            if mine:
                ax.set_title(mine[0].link.label, fontsize=9)
            if col == 0:
                ax.set_ylabel("median latency, ms")
    fig.suptitle(f"Latency by stage per cut — {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stack(ax: Any, cells: Sequence[CellStats], legend: bool) -> None:
    x = range(len(cells))
    bottom = [0.0] * len(cells)
    for part in PARTS:
        values = [max(c.parts_ms[part], 0.0) if math.isfinite(c.parts_ms[part]) else 0.0 for c in cells]
        ax.bar(x, values, bottom=bottom, label=STAGE_NAMES[part], width=0.75)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.plot(x, [c.total_ms for c in cells], "k_", markersize=12, label="measured total")
    ax.plot(x, [c.predicted_ms for c in cells], "rx", label="predicted")
    ax.set_xticks(list(x), [c.cell.label.replace("/", "\n") for c in cells], fontsize=6, rotation=90)
    if legend:
        ax.legend(fontsize=6, loc="upper right")


def bytes_per_cut(cells: Sequence[CellStats], path: Path, subtitle: str) -> None:
    plt = _pyplot()
    sent = [c for c in cells if c.ok and c.bytes_up > 0 and c.cell.role == "grid"]
    cuts = list(dict.fromkeys(c.cell.cut for c in sent))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for codec in dict.fromkeys(c.cell.codec for c in sent if c.cell.cut != cuts[0]):
        points = {c.cell.cut: c.bytes_up for c in sent if c.cell.codec == codec}
        xs = [i for i, cut in enumerate(cuts) if cut in points]
        ax.plot(xs, [points[cuts[i]] / 1e3 for i in xs], "o-", label=codec)
    jpeg = [c.bytes_up for c in sent if c.cell.cut == cuts[0]]
    if jpeg:
        ax.axhline(
            max(jpeg) / 1e3,
            color="k",
            linestyle="--",
            label=f"cloud-only upload ({sent[0].cell.codec}, input)",
        )
    ax.set_xticks(range(len(cuts)), cuts)
    ax.set_yscale("log")
    ax.set_xlabel("cut (shallow → deep)")
    ax.set_ylabel("sealed bytes up per request, kB (log)")
    ax.set_title(f"Bytes per cut and codec — {subtitle}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_vs_bandwidth(links: Sequence[LinkSummary], path: Path, subtitle: str) -> None:
    plt = _pyplot()
    rtts = sorted({s.link.rtt_ms for s in links})
    fig, axes = plt.subplots(1, len(rtts), squeeze=False, sharey=True, figsize=(5.5 * len(rtts), 4.5))
    series = (
        ("edge-only", "edge_only", "s-"),
        ("cloud-only (JPEG)", "cloud_only", "o-"),
        ("auto (shipped agent)", "auto", "D-"),
        ("planner (true link)", "planner", "v--"),
        ("oracle (best measured)", "oracle", "k:"),
    )
    for ax, rtt in zip(axes[0], rtts, strict=True):
        mine = sorted((s for s in links if s.link.rtt_ms == rtt), key=lambda s: s.link.bandwidth_bps)
        mbit = [s.link.bandwidth_bps / 1e6 for s in mine]
        for label, attr, style in series:
            ax.plot(mbit, [getattr(s, attr).total_ms for s in mine], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bandwidth each way, Mbit/s (log)")
        ax.set_title(f"RTT {rtt:g} ms", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median end-to-end latency, ms (log)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"End-to-end latency vs bandwidth — {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
