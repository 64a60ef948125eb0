"""From measurements to the figures issue 7 asks for, with their targets.

Per link setting: **regret** = auto / oracle (oracle = best measured grid cell, target ≤ 1.05);
**auto / min(edge-only, cloud-only)** (target ≤ 1.00) and the speedup of auto over cloud-only;
**framework overhead** = measured total / (edge + encode + tail compute + bytes beyond the
emulator's burst / bandwidth + RTT) (`framework_overhead`, shared with the loopback bench), per
cloud request (target ≤ 1.05): what is left is server queue/decode/answer sealing, gRPC, framing,
the proxy and Python between the steps; and the
planner's **prediction error** per cell, whole and without the edge head: a paced sweep replays
the head from the very profile the planner predicts with, so that part is right by construction
and only the rest (encode, link, server) says how good the cost model is. Every figure is a
median over the timed requests of one run; nothing here is tuned, and auto is only ever compared
with runs other than its own.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from edgecut.apps.sweep.records import Cell, Link, Measurement
from edgecut.netem import paced_burst_bytes

REGRET_TARGET = 1.05
BASELINE_TARGET = 1.00
OVERHEAD_TARGET = 1.05
PARTS = (
    "edge_ms",
    "encode_ms",
    "wire_ms",
    "server_queue_ms",
    "server_decode_ms",
    "server_compute_ms",
    "server_encode_ms",
    "decode_ms",
)


@dataclass(frozen=True)
class CellStats:
    """One run (a grid cell or the auto run at one link), reduced to medians."""

    link: Link
    cell: Cell
    ok: int  # requests answered
    failed: int
    total_ms: float  # median end-to-end latency; nan when nothing was answered
    parts_ms: dict[str, float]  # median of each of PARTS
    bytes_up: float  # median sealed request bytes
    bytes_down: float
    agreement: float  # fraction of answers whose top-1 equals the unsplit model's
    predicted_ms: float  # the planner's prediction for this option at this link
    overhead: float  # median framework overhead ratio (nan for edge-only)
    predicted_edge_ms: float = math.nan  # the head's part of the prediction

    @property
    def error_pct(self) -> float:
        """(predicted − measured) / measured, in %: negative = the planner was optimistic."""
        return (self.predicted_ms - self.total_ms) / self.total_ms * 100

    @property
    def error_without_head_pct(self) -> float:
        """The same without the edge head (what a paced sweep replays): everything after the
        head, predicted against measured; NaN for edge-only, which has nothing after it."""
        measured = self.total_ms - self.parts_ms["edge_ms"]
        predicted = self.predicted_ms - self.predicted_edge_ms
        if self.bytes_up <= 0 or not measured > 0:
            return math.nan
        return (predicted - measured) / measured * 100


@dataclass(frozen=True)
class LinkSummary:
    """The decision figures at one link setting."""

    link: Link
    auto: CellStats  # the shipped agent on --cut auto
    oracle: CellStats
    edge_only: CellStats
    cloud_only: CellStats
    overhead: float  # median over every cloud request at this link
    planner: CellStats  # the planner fed the true link, run as a fixed cut
    auto_choice: str = ""  # the cut/codec the shipped agent chose most often at this link

    @property
    def regret(self) -> float:
        return self.auto.total_ms / self.oracle.total_ms

    @property
    def vs_baselines(self) -> float:
        return self.auto.total_ms / min(self.edge_only.total_ms, self.cloud_only.total_ms)

    @property
    def same_choice(self) -> bool:
        """Auto chose the (cut, codec) that measured best: any regret left is run-to-run noise."""
        return self.auto_choice == self.oracle.cell.label

    @property
    def speedup_vs_cloud(self) -> float:
        return self.cloud_only.total_ms / self.auto.total_ms


def framework_overhead(
    total_ms: float,
    edge_ms: float,
    encode_ms: float,
    server_compute_ms: float,
    bytes_up: int,
    bytes_down: int,
    bandwidth_bps: float,
    rtt_ms: float,
    burst_bytes: int = 0,
) -> float:
    """Measured total over the ideal: edge compute + encode + tail compute + the bytes on the
    link + its RTT. Everything else (sealing's open, decode, queueing, framing, Python between
    the steps) is the framework's overhead. The one formula for the sweep and
    `benchmarks/edge_loopback.py`. Bytes a token bucket lets through at once after a pause
    (`burst_bytes`) cross free, so they are not counted as link time: a frame that fits in the
    burst must not make the framework look faster than free."""
    link_ms = (max(0, bytes_up - burst_bytes) + max(0, bytes_down - burst_bytes)) * 8 / bandwidth_bps * 1e3
    return total_ms / (edge_ms + encode_ms + server_compute_ms + link_ms + rtt_ms)


def overhead(m: Measurement) -> float:
    """`framework_overhead` of one measured request on the sweep's emulated link."""
    return framework_overhead(
        m.total_ms,
        m.edge_ms,
        m.encode_ms,
        m.server_compute_ms,
        m.bytes_up,
        m.bytes_down,
        m.bandwidth_bps,
        m.rtt_ms,
        paced_burst_bytes(m.bandwidth_bps),
    )


def cell_stats(rows: Sequence[Measurement]) -> list[CellStats]:
    """One CellStats per (link, cell), in the order the runs were made."""
    groups: dict[tuple[Link, Cell], list[Measurement]] = {}
    for row in rows:
        groups.setdefault((row.link, row.cell), []).append(row)
    return [_stats(link, cell, group) for (link, cell), group in groups.items()]


def _stats(link: Link, cell: Cell, group: list[Measurement]) -> CellStats:
    ok = [m for m in group if m.ok]
    cloud = [m for m in ok if m.where == "cloud"]
    return CellStats(
        link,
        cell,
        len(ok),
        len(group) - len(ok),
        _median(m.total_ms for m in ok),
        {p: _median(getattr(m, p) for m in ok) for p in PARTS},
        _median(m.bytes_up for m in ok),
        _median(m.bytes_down for m in ok),
        sum(m.agrees for m in ok) / len(ok) if ok else math.nan,
        group[0].predicted_ms,
        _median(overhead(m) for m in cloud),
        group[0].predicted_edge_ms,
    )


def link_summaries(rows: Sequence[Measurement], cells: Sequence[CellStats]) -> list[LinkSummary]:
    """Regret, baselines and overhead per link; the first and last cut are the baselines."""
    out = []
    for link in dict.fromkeys(c.link for c in cells):
        mine = [c for c in cells if c.link == link]
        grid = [c for c in mine if c.cell.role == "grid" and c.ok]
        auto = next(c for c in mine if c.cell.role == "auto")
        # results from before the shipped auto had a row of its own: their "auto" was the planner
        planner = next((c for c in mine if c.cell.role == "planner"), auto)
        chosen = Counter(m.chosen for m in rows if m.link == link and m.role == "auto" and m.chosen)
        if not grid:
            continue
        cuts = [c.cell.cut for c in mine if c.cell.role == "grid"]
        edge_only = next(c for c in grid if c.cell.cut == cuts[-1])
        cloud_only = min((c for c in grid if c.cell.cut == cuts[0]), key=lambda c: c.total_ms)
        oracle = min(grid, key=lambda c: c.total_ms)
        over = _median(overhead(m) for m in rows if m.link == link and m.where == "cloud")
        choice = chosen.most_common(1)[0][0] if chosen else auto.cell.label
        out.append(LinkSummary(link, auto, oracle, edge_only, cloud_only, over, planner, choice))
    return out


def totals(cells: Sequence[CellStats], links: Sequence[LinkSummary]) -> dict[str, Any]:
    """The sweep in a few numbers, each beside its target."""
    speedups = [s.speedup_vs_cloud for s in links]
    errors = [abs(c.error_pct) for c in cells if c.ok and c.cell.role == "grid"]
    rest = [abs(c.error_without_head_pct) for c in cells if c.ok and c.cell.role == "grid"]
    overheads = [s.overhead for s in links if math.isfinite(s.overhead)]
    return {
        "links": len(links),
        "regret_max": max((s.regret for s in links), default=math.nan),
        "regret_within_target": sum(s.regret <= REGRET_TARGET for s in links),
        "regret_target": REGRET_TARGET,
        "auto_chose_oracle_cut": sum(s.same_choice for s in links),
        "vs_baselines_max": max((s.vs_baselines for s in links), default=math.nan),
        "vs_baselines_within_target": sum(s.vs_baselines <= BASELINE_TARGET for s in links),
        "vs_baselines_target": BASELINE_TARGET,
        "speedup_vs_cloud_only_mean": statistics.fmean(speedups) if speedups else math.nan,
        "speedup_vs_cloud_only_geomean": statistics.geometric_mean(speedups) if speedups else math.nan,
        "overhead_median": _median(overheads),
        "overhead_max": max(overheads, default=math.nan),
        "overhead_target": OVERHEAD_TARGET,
        "prediction_error_abs_median_pct": _median(errors),
        "prediction_error_abs_max_pct": max(errors, default=math.nan),
        "prediction_error_without_head_abs_median_pct": _median(rest),
        "prediction_error_without_head_abs_max_pct": max(
            (e for e in rest if math.isfinite(e)), default=math.nan
        ),
        "failed_requests": sum(c.failed for c in cells),
    }


def summary_json(cells: Sequence[CellStats], links: Sequence[LinkSummary]) -> dict[str, Any]:
    """Everything the table shows, plus every cell, for results.json and `--json`."""

    def cell(c: CellStats) -> dict[str, Any]:
        return {
            "bandwidth": c.link.bandwidth,
            "rtt_ms": c.link.rtt_ms,
            "cut": c.cell.cut,
            "codec": c.cell.codec,
            "role": c.cell.role,
            "ok": c.ok,
            "failed": c.failed,
            "total_ms": _r(c.total_ms),
            "predicted_ms": _r(c.predicted_ms),
            "prediction_error_pct": _r(c.error_pct),
            "predicted_edge_ms": _r(c.predicted_edge_ms),
            "prediction_error_without_head_pct": _r(c.error_without_head_pct),
            "parts_ms": {k: _r(v) for k, v in c.parts_ms.items()},
            "bytes_up": _r(c.bytes_up),
            "bytes_down": _r(c.bytes_down),
            "top1_agreement": _r(c.agreement),
            "overhead": _r(c.overhead),
        }

    def link(s: LinkSummary) -> dict[str, Any]:
        return {
            "bandwidth": s.link.bandwidth,
            "rtt_ms": s.link.rtt_ms,
            "auto": s.auto_choice,
            "auto_is": "the shipped agent on --cut auto (its own probes and estimates)",
            "auto_ms": _r(s.auto.total_ms),
            "planner": s.planner.cell.label,
            "planner_ms": _r(s.planner.total_ms),
            "planner_predicted_ms": _r(s.planner.predicted_ms),
            "oracle": s.oracle.cell.label,
            "oracle_ms": _r(s.oracle.total_ms),
            "regret": _r(s.regret),
            "auto_chose_oracle_cut": s.same_choice,
            "edge_only_ms": _r(s.edge_only.total_ms),
            "cloud_only_ms": _r(s.cloud_only.total_ms),
            "auto_vs_best_baseline": _r(s.vs_baselines),
            "speedup_vs_cloud_only": _r(s.speedup_vs_cloud),
            "overhead": _r(s.overhead),
        }

    return {
        "totals": {k: _r(v) for k, v in totals(cells, links).items()},
        "links": [link(s) for s in links],
        "cells": [cell(c) for c in cells],
    }


def table(links: Sequence[LinkSummary], title: str) -> Table:
    """The summary table printed at the end of every sweep; misses of a target in red."""
    t = Table(
        title=title,
        caption="ms = median end-to-end latency; auto = the shipped agent on --cut auto (its most "
        "frequent choice); planner = the planner fed the true link, as a fixed cut; auto ÷ base = "
        "auto / min(edge-only, cloud-only); × cloud = cloud-only / auto",
    )
    for name in (
        "link",
        "auto",
        "ms",
        "planner",
        "ms  ",
        "predicted",
        "oracle",
        "ms ",
        "regret",
        "edge-only",
        "cloud-only",
        "auto ÷ base",
        "× cloud",
        "overhead",
    ):
        t.add_column(
            name, justify="left" if name in ("link", "auto", "planner", "oracle") else "right", no_wrap=True
        )
    for s in links:
        t.add_row(
            s.link.label,
            s.auto_choice,
            _ms(s.auto.total_ms),
            s.planner.cell.label,
            _ms(s.planner.total_ms),
            _ms(s.planner.predicted_ms),
            s.oracle.cell.label,
            _ms(s.oracle.total_ms),
            _flag(s.regret, REGRET_TARGET),
            _ms(s.edge_only.total_ms),
            _ms(s.cloud_only.total_ms),
            _flag(s.vs_baselines, BASELINE_TARGET),
            f"{s.speedup_vs_cloud:.2f}",
            _flag(s.overhead, OVERHEAD_TARGET),
        )
    return t


def footer(total: dict[str, Any]) -> list[str]:
    """The lines under the table: each figure against its target, plainly."""
    total = {k: math.nan if v is None else v for k, v in total.items()}  # JSON null: not measured
    n = total["links"]
    return [
        f"regret (shipped auto / oracle, the best-measured grid cell): max "
        f"{total['regret_max']:.3f}; ≤ {REGRET_TARGET} in "
        f"{total['regret_within_target']} of {n} link settings; auto chose the best-measured "
        f"option in {total['auto_chose_oracle_cut']} of {n}",
        f"auto / min(edge-only, cloud-only): max {total['vs_baselines_max']:.3f}; ≤ "
        f"{BASELINE_TARGET:.2f} in {total['vs_baselines_within_target']} of {n}",
        f"speedup of auto over cloud-only: mean {total['speedup_vs_cloud_only_mean']:.2f}×, "
        f"geometric mean {total['speedup_vs_cloud_only_geomean']:.2f}×",
        f"framework overhead (measured / parts + bytes/bw + RTT): median "
        f"{total['overhead_median']:.3f}, worst link {total['overhead_max']:.3f} "
        f"(target ≤ {OVERHEAD_TARGET})",
        f"planner prediction error |predicted − measured| / measured over grid cells: median "
        f"{total['prediction_error_abs_median_pct']:.1f} %, max "
        f"{total['prediction_error_abs_max_pct']:.1f} %; without the edge head (replayed when "
        f"paced), on cells that send: median "
        f"{total['prediction_error_without_head_abs_median_pct']:.1f} %, max "
        f"{total['prediction_error_without_head_abs_max_pct']:.1f} %",
        f"failed requests: {total['failed_requests']}",
    ]


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _r(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def _ms(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "—"


def _flag(value: float, target: float, fmt: Callable[[float], str] = "{:.3f}".format) -> str:
    if not math.isfinite(value):
        return "—"
    return fmt(value) if value <= target else f"[red]{fmt(value)}[/red]"
