"""Which cut and codec the agent uses for the next input: fixed by the user, or planned.

`AutoCut` builds the planner's cost table from this device and this server, on the first input:
edge time per segment (measured here in a few runs, or read from `--edge-profile`), tail time per
cut (the server's own profile from ServerInfo), and bytes and encode time per (cut, codec) from
encoding that first input at every cut. The link starts from a few Probes and then follows the real
transfers; `Replanner` moves the cut when the prediction moves by more than its hysteresis margin
and logs every switch with the reason. Both classes also own the frontier encoding, so the
calibration and image normalisation of a cut are looked up in one place.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from edgecut import codec
from edgecut.bundle import Bundle
from edgecut.edge.runner import Runner
from edgecut.edge.session import Reply, TailSession
from edgecut.errors import EdgecutError
from edgecut.planner import Constraints, CutCost, LinkEstimator, Replanner
from edgecut.profile import load_profile
from edgecut.sealing import Binding, seal_request

log = logging.getLogger(__name__)

PROBE_EVERY_S = 2.0  # while edge-only, how often a Probe refreshes the link estimate
PROBE_TIMEOUT_MS = 500.0  # per periodic Probe: a dropping link must not stall inputs for long
BANDWIDTH_PROBE_BYTES = 256 << 10
ANSWER_CODEC = codec.CodecSpec("none", zstd_level=1)
_SEAL_OVERHEAD_DOWN = 28  # nonce + tag of a sealed answer


class CutChoice(Protocol):
    mode: str  # "fixed" | "auto"
    ready: bool  # False until `calibrate` has seen a first input

    def calibrate(self, feeds: Mapping[str, np.ndarray]) -> None: ...
    def current(self) -> tuple[str, str]: ...
    def encode(self, cut: str, codec_name: str, frontier: Mapping[str, np.ndarray]) -> bytes: ...
    def observe(self, reply: Reply, wire_ms: float) -> None: ...


class Encoder:
    """Frontier → codec frame for any cut, with that cut's calibration and image normalisation."""

    def __init__(self, bundle: Bundle) -> None:
        self.manifest = bundle.manifest
        self._calibrations: dict[str, codec.Calibration | None] = {}

    def encode(self, cut: str, codec_name: str, frontier: Mapping[str, np.ndarray]) -> bytes:
        spec = codec.CodecSpec.parse(codec_name)
        pre = self.manifest.preprocess
        norm = (pre.mean, pre.std) if spec.scheme == "jpeg" else None
        return codec.encode(frontier, self.manifest.cut(cut).frontier, spec,
                            self._calibration(cut), image_norm=norm)

    def _calibration(self, cut: str) -> codec.Calibration | None:
        if cut not in self._calibrations:
            raw = self.manifest.calibration.get(cut)
            self._calibrations[cut] = codec.Calibration.from_json(raw) if raw else None
        return self._calibrations[cut]


class FixedCut(Encoder):
    """`--cut ID`: the same cut and codec for every input."""

    mode = "fixed"
    ready = True

    def __init__(self, bundle: Bundle, cut: str, codec_name: str) -> None:
        super().__init__(bundle)
        bundle.manifest.cut(cut)  # unknown cut → BundleError listing the cuts
        codec.CodecSpec.parse(codec_name)
        self._choice = (cut, "none" if cut == "output" else codec_name)

    def calibrate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Nothing to measure."""

    def current(self) -> tuple[str, str]:
        return self._choice

    def observe(self, reply: Reply, wire_ms: float) -> None:
        """A fixed cut ignores the link."""


class AutoCut(Encoder):
    """`--cut auto`: plan over every (cut, codec) from measurements, re-plan as the link moves."""

    mode = "auto"

    def __init__(self, bundle: Bundle, runner: Runner, session: TailSession | None, codec_name: str,
                 *, min_depth: int = 0, edge_profile: Path | None = None) -> None:
        super().__init__(bundle)
        self.bundle, self.runner, self.session = bundle, runner, session
        self.codec_name = codec_name
        self.constraints = Constraints(min_depth=min_depth)
        self.edge_profile = edge_profile
        self.link = LinkEstimator()
        self.replanner: Replanner | None = None
        self.ready = False
        self._last_probe = 0.0

    def calibrate(self, feeds: Mapping[str, np.ndarray]) -> None:
        frontiers, edge_ms = self._measure(feeds)
        self._probe_link()
        costs = [c for cut in self.manifest.cuts for c in self._costs(cut.id, frontiers, edge_ms)]
        self.replanner = Replanner(costs, self.constraints)
        row, _ = self.replanner.update(self.link.estimate())
        log.info("cut chosen by the planner (auto): %s/%s, %.1f ms predicted", row.cost.cut,
                 row.cost.codec, row.predicted_ms)
        self.ready = True

    def current(self) -> tuple[str, str]:
        if self.replanner is None or self.replanner.current is None:
            raise EdgecutError("auto cut used before calibration")
        row = self.replanner.current
        if row.cost.edge_only and time.perf_counter() - self._last_probe > PROBE_EVERY_S:
            self._probe_link(PROBE_TIMEOUT_MS)
            row, _ = self.replanner.update(self.link.estimate())
        return row.cost.cut, row.cost.codec

    def observe(self, reply: Reply, wire_ms: float) -> None:
        self.link.observe_transfer(reply.bytes_up, reply.bytes_down, wire_ms)
        self.link.observe_queue(reply.queue_delay_ms)
        if self.replanner is not None:
            self.replanner.update(self.link.estimate())

    def _measure(self, feeds: Mapping[str, np.ndarray],
                 runs: int = 3) -> tuple[list[dict[str, np.ndarray]], list[float]]:
        """Frontier at every cut, and edge latency per segment (median of `runs` after a warm-up)."""
        segments = self.manifest.segments
        frontiers = [dict(feeds)]
        samples: list[list[float]] = [[] for _ in segments]
        for run in range(runs + 1):
            env = dict(feeds)
            for i in range(len(segments)):
                out = self.runner.run(env, i, i)
                env = out.outputs
                if run == 0:
                    frontiers.append(env)
                else:
                    samples[i].append(out.timings_ms[0])
        if self.edge_profile is None:
            return frontiers, [statistics.median(s) for s in samples]
        profile = load_profile(self.edge_profile)
        log.info("edge timings from profile %s (%s, %s)", self.edge_profile, profile.device,
                 profile.mode)
        return frontiers, [profile.segment_ms(Path(s.file).stem) for s in segments]

    def _probe_link(self, timeout_ms: float | None = None) -> None:
        """Refresh the link estimate; the first failed Probe ends the round (`timeout_ms` each)."""
        if self.session is None:
            return
        probe, size = self.session.probe, BANDWIDTH_PROBE_BYTES
        try:
            self.link.observe_rtt(min(probe(timeout_ms=timeout_ms) for _ in range(3)))
            self.link.observe_transfer(size, 0, probe(size, timeout_ms=timeout_ms))
            self.link.observe_transfer(0, size, probe(reply_bytes=size, timeout_ms=timeout_ms))
        except EdgecutError as exc:
            log.info("link probe failed (%s); planning with the current estimate", exc)
        finally:
            # After, not before: a slow round must not make the next input probe again at once.
            self._last_probe = time.perf_counter()

    def _costs(self, cut: str, frontiers: list[dict[str, np.ndarray]],
               edge_ms: list[float]) -> list[CutCost]:
        depth = self.manifest.cut(cut).depth
        edge = sum(edge_ms[:depth])
        if depth == len(self.manifest.segments):
            return [CutCost(cut, depth, "none", edge, 0.0, 0.0, 0, 0, 0.0)]
        options = [self.codec_name if not self.codec_name.startswith("jpeg") else "int8"]
        if depth == 0 and self.manifest.preprocess.kind == "image":
            options = list(dict.fromkeys([*options, "jpeg90"]))
        if depth == 0 and self.codec_name.startswith("jpeg"):
            options = [self.codec_name]
        cloud = self._cloud_ms(cut, edge_ms[depth:])
        down = len(codec.encode(frontiers[-1], self.manifest.outputs, ANSWER_CODEC))
        return [self._cost(cut, depth, name, frontiers[depth], edge, cloud,
                           down + _SEAL_OVERHEAD_DOWN) for name in options]

    def _cost(self, cut: str, depth: int, name: str, frontier: Mapping[str, np.ndarray],
              edge: float, cloud: float, bytes_down: int) -> CutCost:
        t0 = time.perf_counter()
        payload = self.encode(cut, name, frontier)
        up = len(payload)
        if self.session is not None:
            binding = Binding(self.manifest.model, self.manifest.version, cut, "plan")
            up = len(seal_request(self.session.config.server_key, binding, payload)[0])
        t1 = time.perf_counter()
        codec.decode(payload, self.manifest.cut(cut).frontier,
                     image_norm=(self.manifest.preprocess.mean, self.manifest.preprocess.std))
        t2 = time.perf_counter()
        return CutCost(cut, depth, name, edge, (t1 - t0) * 1e3, (t2 - t1) * 1e3, up, bytes_down,
                       cloud)

    def _cloud_ms(self, cut: str, local_tail_ms: list[float]) -> float:
        info = self.session.info if self.session is not None else None
        profiled = info.tail_ms.get(cut) if info is not None else None
        if profiled is not None:
            return profiled
        log.debug("no server profile for cut %s: assuming this device's tail time", cut)
        return sum(local_tail_ms)
