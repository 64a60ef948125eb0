"""Which cut and codec the agent uses for the next input: fixed by the user, or planned.

`AutoCut` builds the planner's cost table on the first input with the same cost model as `edgecut
plan` (`edgecut.costs`): this device's profile (measured now with the profiler, or read from
`--edge-profile`), the server's own tail profile from ServerInfo, and bytes from the bundle's
fidelity report or from encoding that first input at every cut. The link starts from a few
Probes and then follows the real transfers; `Replanner` moves the cut when the prediction moves
by more than its hysteresis margin and logs every switch with the reason. Both classes also own
the frontier encoding, so the calibration and image normalisation of a cut are looked up in one
place.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from edgecut import codec
from edgecut.bundle import Bundle
from edgecut.costs import CloudTimes, cut_costs
from edgecut.edge.profiler import profile_bundle, profile_codecs
from edgecut.edge.runner import Runner
from edgecut.edge.session import Reply, TailSession
from edgecut.errors import EdgecutError
from edgecut.planner import Constraints, LinkEstimator, Replanner
from edgecut.profile import Profile, load_profile

log = logging.getLogger(__name__)

PROBE_EVERY_S = 2.0  # while edge-only, how often a Probe refreshes the link estimate
PROBE_TIMEOUT_MS = 500.0  # per periodic Probe: a dropping link must not stall inputs for long
BANDWIDTH_PROBE_BYTES = 256 << 10


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
        self.manifest, self._bundle = bundle.manifest, bundle

    def encode(self, cut: str, codec_name: str, frontier: Mapping[str, np.ndarray]) -> bytes:
        spec = codec.CodecSpec.parse(codec_name)
        pre = self.manifest.preprocess
        norm = (pre.mean, pre.std) if spec.is_image else None
        calibration = codec.calibration_for(self._bundle, cut)
        return codec.encode(frontier, self.manifest.cut(cut).frontier, spec, calibration, image_norm=norm)


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

    def __init__(
        self,
        bundle: Bundle,
        runner: Runner,
        session: TailSession | None,
        codec_name: str,
        *,
        min_depth: int = 0,
        edge_profile: Path | None = None,
    ) -> None:
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
        """Plan from this device's profile (measured now on `feeds`, or `--edge-profile`), the
        server's own tail profile and the probed link — the same cost model as `edgecut plan`."""
        cloud = self.session.info.times if self.session and self.session.info else CloudTimes({})
        self._probe_link()
        costs = cut_costs(self.bundle, self._edge(feeds), cloud, [self.codec_name])
        self.replanner = Replanner(costs, self.constraints)
        row, _ = self.replanner.update(self.link.estimate())
        log.info(
            "cut chosen by the planner (auto): %s/%s, %.1f ms predicted",
            row.cost.cut,
            row.cost.codec,
            row.predicted_ms,
        )
        self.ready = True

    def _edge(self, feeds: Mapping[str, np.ndarray]) -> Profile:
        """This device's timings; codec costs are always measured on the real first input, and
        kept from a loaded profile only where it has its own figure for that (cut, codec)."""
        codecs = (self.codec_name, "jpeg90")
        if self.edge_profile is None:
            return profile_bundle(
                self.bundle,
                self.runner,
                runtime=self.runner.name,
                threads=0,
                codecs=codecs,
                runs=3,
                feeds=feeds,
            )
        loaded = load_profile(self.edge_profile)
        log.info("edge timings from profile %s (%s, %s)", self.edge_profile, loaded.device, loaded.mode)
        have = {(c.cut, c.codec) for c in loaded.codecs}
        measured = profile_codecs(self.bundle, self.runner, feeds, codecs, runs=3)
        extra = tuple(c for c in measured if (c.cut, c.codec) not in have)
        return dataclasses.replace(loaded, codecs=loaded.codecs + extra)

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
