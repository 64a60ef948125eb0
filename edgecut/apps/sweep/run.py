"""Measure: for every link setting, every grid cell, the planner's choice and the shipped auto.

The pipeline is the product's own: the edge agent (head runner, codec, HPKE seal, the gRPC
session) in this process, a `LinkEmulator` proxy in front of a real tail service, one request in
flight at a time so no request waits behind another. Two runs per link stand for the optimizer:
- "auto" is the shipped agent on `--cut auto` (`AutoCut`: the bundle's fidelity budget, its own
  background link probes, running estimates and hysteresis, on a session of its own), exactly
  what `edgecut edge run --cut auto` runs; its first `auto_warmup` + `warmup` requests are
  not timed;
- "planner" is the planner fed the *set* link, run as a fixed cut: what auto would do with a
  perfect link estimate. Its (cut, codec) is added to the grid when the grid lacks it, so the
  oracle (best measured grid cell) always had the chance to be it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edgecut.apps.sweep import cloud, config
from edgecut.apps.sweep.records import Cell, Link, Measurement, RunInfo
from edgecut.bundle import Bundle, load_bundle
from edgecut.costs import cut_costs
from edgecut.edge.agent import Agent, AgentOptions, Result, image_input
from edgecut.edge.cutchoice import AutoCut, CutChoice, FixedCut
from edgecut.edge.pacing import PacedRunner
from edgecut.edge.runner import OrtRunner, Runner
from edgecut.edge.session import SessionConfig, TailSession
from edgecut.images import prepare
from edgecut.keys import load_service_public
from edgecut.netem import PACED_BURST_S, LinkConfig, ThreadedLinkEmulator, paced_burst_bytes, parse_address
from edgecut.planner import DEFAULT_MAX_ACCURACY_DROP, Constraints, CutCost, LinkEstimate, Plan, plan
from edgecut.profile import Profile
from edgecut.provenance import code_revision, package_versions
from edgecut.runtime import OrtOptions

log = logging.getLogger(__name__)

PACKAGES = ("edgecut", "onnxruntime", "numpy", "grpcio", "protobuf", "zstandard", "cryptography")  # recorded
DEADLINE_MS = 120_000  # per request: a 0.5 Mbit/s link takes seconds for a shallow frontier


@dataclass(frozen=True)
class LinkPlan:
    """What one link setting runs: its grid cells, then the optimizer's choice."""

    link: Link
    plan: Plan
    cells: tuple[Cell, ...]  # grid cells, then the planner's cell, then the shipped auto

    def predicted_ms(self, cell: Cell) -> tuple[float, float]:
        """(whole prediction, its edge-head part) for a cell; NaN for the shipped auto's."""
        row = self.plan.row(cell.cut, cell.codec)
        return (row.predicted_ms, row.stages_ms["edge"]) if row is not None else (math.nan, math.nan)


Tick = Callable[[str], None]  # called once per request with a description of the run


@dataclass
class _Edge:
    """The edge side, built once: bundle, runners, inputs and the unsplit model's answers."""

    bundle: Bundle
    head: Runner
    tail: Runner
    photos: list[tuple[str, np.ndarray]]
    reference: list[int]  # top-1 of the unsplit model per photo
    mode: str
    machine: str


def run_sweep(
    cfg: config.SweepConfig,
    start: Callable[[int], None],
    tick: Tick,
) -> tuple[RunInfo, list[Measurement]]:
    """Validate, spawn or reach the tail, measure everything; `start(total)` once, then `tick`."""
    started, t0 = _now(), time.perf_counter()
    links = cfg.links()
    config.check_codecs(cfg.codecs)
    bundle = load_bundle(cfg.bundle)
    m = bundle.manifest
    profile, profile_path = config.resolve_profile(bundle, cfg.edge_profile)
    base = config.grid(m, config.inner_cuts(m, cfg.cuts), cfg.codecs)
    edge = _edge(bundle, cfg, profile)
    with cloud.endpoint(bundle, cfg.cloud, cfg.server_key, cfg.cloud_threads) as ep:
        info = cloud.tail_info(ep.address, m.model, m.version, cfg.credentials())
        costs = cut_costs(bundle, profile, info.times, cfg.codecs, suite=info.key_suite)
        limits = Constraints(min_depth=m.depth_of(cfg.min_cut), max_accuracy_drop=DEFAULT_MAX_ACCURACY_DROP)
        plans = [_plan_link(link, costs, info.queue_delay_ms, base, limits) for link in links]
        start(sum(len(p.cells) * (cfg.warmup + cfg.requests) + cfg.auto_warmup for p in plans))
        load = [os.getloadavg()[0]]
        rows = _measure_all(plans, edge, ep, cfg, tick, load, profile_path)
    run = RunInfo(
        command=cfg.command(),
        revision=code_revision(),
        packages=package_versions(PACKAGES),
        started_at=started,
        wall_s=round(time.perf_counter() - t0, 1),
        machine=edge.machine,
        mode=edge.mode,
        bundle=str(cfg.bundle),
        model=f"{m.model}:{m.version}",
        manifest_sha256=bundle.manifest_sha256,
        edge_profile={
            "path": str(profile_path),
            "device": profile.device,
            "mode": profile.mode,
            "scale": profile.scale,
            "source": profile.source,
            "threads": profile.threads,
        },
        edge_runtime=edge.head.name,
        cloud={
            "address": ep.address,
            "spawned": ep.spawned,
            "device": info.device,
            "threads": ep.threads,
            "max_queue_delay_ms": 0 if ep.spawned else None,
        },
        link_emulator="edgecut.netem user-space TCP proxy on 127.0.0.1, symmetric token bucket "
        f"(depth {PACED_BURST_S * 1e3:g} ms of the rate, >= 1500 B), "
        "RTT/2 added each way",
        warmup=cfg.warmup,
        auto_warmup=cfg.auto_warmup,
        requests=cfg.requests,
        load_1min=tuple(round(x, 2) for x in [*load, os.getloadavg()[0]]),
        pacing=_pacing(edge.head),
    )
    return run, rows


def _edge(bundle: Bundle, cfg: config.SweepConfig, profile: Profile) -> _Edge:
    ort = OrtRunner(bundle, OrtOptions(threads=cfg.edge_threads))
    n = len(bundle.manifest.segments)
    photos = config.load_inputs(cfg.images)
    reference = []
    for _, image in photos:
        feeds = {bundle.manifest.inputs[0].name: prepare(image, bundle.manifest.preprocess)}
        logits = ort.run(feeds, 0, n - 1).outputs[bundle.manifest.outputs[0].name]
        reference.append(int(np.argmax(logits)))
    head: Runner = PacedRunner(ort, bundle, profile) if cfg.pace else ort  # its encode paced too
    mode = f"paced:{profile.device}" if cfg.pace else "live"
    return _Edge(bundle, head, ort, photos, reference, mode, machine())


def _pacing(head: Runner) -> str:
    if not isinstance(head, PacedRunner):
        return "none: edge compute and codec at this machine's speed"
    return (
        f"head segments replayed from the profile; codec encode slowed by the measured head "
        f"slowdown (x{head.slowdown:.2f} at the end); sealing and answer decode not paced"
    )


def _plan_link(
    link: Link, costs: Sequence[CutCost], queue_ms: float, base: Sequence[Cell], limits: Constraints
) -> LinkPlan:
    """The planner fed the true link, under the shipped auto's limits (accuracy budget, --min-cut)."""
    estimate = LinkEstimate(link.bandwidth_bps, link.bandwidth_bps, link.rtt_ms, queue_ms)
    chosen = plan(costs, estimate, limits)
    c = chosen.chosen.cost
    planner = Cell(c.cut, "none" if c.edge_only else c.codec, "planner")
    cells = list(base)
    if Cell(planner.cut, planner.codec) not in cells:
        cells.insert(-1, Cell(planner.cut, planner.codec))
    log.info(
        "%s: planner (true link) chooses %s (%.1f ms predicted)",
        link.label,
        planner.label,
        chosen.chosen.predicted_ms,
    )
    return LinkPlan(link, chosen, (*cells, planner, Cell("auto", "auto", "auto")))


def _measure_all(
    plans: Sequence[LinkPlan],
    edge: _Edge,
    ep: cloud.Endpoint,
    cfg: config.SweepConfig,
    tick: Tick,
    load: list[float],
    profile_path: Path,
) -> list[Measurement]:
    """One emulator for the whole sweep, re-tuned per link; one fresh session per link.

    `load` gets the 1-minute load average at each link's start: on a shared machine it says how
    much other work competed for the CPUs while these figures were taken.
    """
    rows: list[Measurement] = []
    emulator = ThreadedLinkEmulator(parse_address(ep.address), _link_config(plans[0].link))
    creds = cfg.credentials()
    with emulator as (host, port):
        for lp in plans:
            load.append(os.getloadavg()[0])
            emulator.set_config(_link_config(lp.link))
            session_config = SessionConfig(
                f"{host}:{port}",
                load_service_public(ep.server_pub),
                edge.bundle.manifest.model,
                edge.bundle.manifest.version,
                deadline_ms=DEADLINE_MS,
                connect_timeout_ms=DEADLINE_MS,
                token=creds.token,
                tls_ca=creds.tls_ca,
                tls_cert=creds.tls_cert,
                tls_key=creds.tls_key,
                tls_server_name=parse_address(ep.address)[0],  # the emulator relays to it
            )
            session = TailSession(session_config)
            session.connect()
            shipped = TailSession(session_config)  # the shipped auto keeps its own, as on a device
            shipped.connect()
            try:
                rows += _measure_link(lp, edge, (session, shipped), cfg, tick, profile_path)
            finally:
                session.close()
                shipped.close()
    return rows


def _link_config(link: Link) -> LinkConfig:
    """Bucket depth of one paced chunk: bursts stay small, so bytes/bandwidth holds for frames."""
    burst = paced_burst_bytes(link.bandwidth_bps)
    return LinkConfig(link.bandwidth_bps, link.bandwidth_bps, link.rtt_ms, burst_bytes=burst)


def _measure_link(
    lp: LinkPlan,
    edge: _Edge,
    sessions: tuple[TailSession, TailSession],
    cfg: config.SweepConfig,
    tick: Tick,
    profile_path: Path,
) -> list[Measurement]:
    """warm-up + timed rounds; each round sends the same photo once through every run.

    Interleaving rounds, in an order shuffled afresh every round (seeded by the link, so a rerun
    repeats it), spreads any slow spell of a shared machine over all runs of the link alike and
    gives no run a fixed neighbour: a fixed order let one run always follow the same other one,
    and the pairing showed up as a difference. Each run keeps its own agent, so auto is still
    measured on its own requests.
    """
    grid, shipped = sessions
    runs = []
    for cell in lp.cells:
        choice: CutChoice = (
            AutoCut(
                edge.bundle,
                edge.head,
                shipped,
                ",".join(cfg.codecs),
                edge_profile=profile_path,
                min_depth=edge.bundle.manifest.depth_of(cfg.min_cut),
            )
            if cell.role == "auto"
            else FixedCut(edge.bundle, cell.cut, cell.codec, max_accuracy_drop=None)  # the grid measures all
        )
        runs.append(_CellRun(lp, cell, edge, shipped if cell.role == "auto" else grid, choice, cfg.warmup))
    n = len(edge.photos)
    try:
        auto = runs[-1]  # settles first, on inputs of its own, before any run is timed
        for i in range(cfg.auto_warmup):
            name, image = edge.photos[i % n]
            auto.agent.run([image_input(-1, name, image)], lambda _: None)
            tick(auto.what)
        for i in range(cfg.warmup + cfg.requests):
            name, image = edge.photos[i % n]
            order = list(runs)
            random.Random(f"{lp.link.label}/{i}").shuffle(order)
            for run in order:
                run.agent.run([image_input(i, name, image)], run.emit)
                tick(run.what)
    finally:
        for run in runs:
            run.choice.close()
    return [row for run in runs for row in sorted(run.rows, key=lambda r: r.request)]


class _CellRun:
    """One run: an agent for the cell (a fixed cut, or the shipped auto) and its timed rows."""

    def __init__(
        self, lp: LinkPlan, cell: Cell, edge: _Edge, session: TailSession, choice: CutChoice, warmup: int
    ) -> None:
        self.lp, self.cell, self.edge, self.warmup, self.choice = lp, cell, edge, warmup, choice
        self.agent = Agent(
            edge.bundle, edge.head, edge.tail, session, choice, AgentOptions(in_flight=1, fallback="fail")
        )
        self.what = f"{lp.link.label} {cell.label}" + (f" ({cell.role})" if cell.role != "grid" else "")
        self.predicted = lp.predicted_ms(cell)
        self.rows: list[Measurement] = []

    def emit(self, result: Result) -> None:
        if result.position >= self.warmup:
            ref = self.edge.reference[result.position % len(self.edge.photos)]
            index = result.position - self.warmup
            row = _row(self.lp.link, self.cell, result, index, ref, *self.predicted, self.edge)
            if self.cell.role == "auto":
                row = dataclasses.replace(row, chosen=f"{result.cut}/{result.codec}")
            self.rows.append(row)


def _row(
    link: Link,
    cell: Cell,
    r: Result,
    index: int,
    reference: int,
    predicted: float,
    predicted_edge: float,
    edge: _Edge,
) -> Measurement:
    t = r.timings_ms
    nan = math.nan
    total = t.get("total_ms", nan)
    return Measurement(
        bandwidth=link.bandwidth,
        bandwidth_bps=link.bandwidth_bps,
        rtt_ms=link.rtt_ms,
        role=cell.role,
        cut=cell.cut,
        codec=cell.codec,
        request=index,
        input=r.input,
        where=r.where,
        mode=edge.mode,
        machine=edge.machine,
        at=_now(),
        edge_ms=t.get("edge_ms", nan),
        encode_ms=t.get("encode_ms", 0.0),
        wire_ms=t.get("wire_ms", 0.0),
        server_queue_ms=t.get("server_queue_ms", 0.0),
        server_decode_ms=t.get("server_decode_ms", 0.0),
        server_compute_ms=t.get("server_compute_ms", 0.0),
        server_encode_ms=t.get("server_encode_ms", 0.0),
        decode_ms=total - t["answer_ms"] if "answer_ms" in t else 0.0,
        total_ms=total,
        bytes_up=r.bytes_up,
        bytes_down=r.bytes_down,
        top1=r.top5[0][0] if r.top5 else -1,
        top1_reference=reference,
        predicted_ms=predicted,
        error=r.error or "",
        predicted_edge_ms=predicted_edge,
    )


def machine() -> str:
    """This machine in one line: host, CPU model, cores, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
