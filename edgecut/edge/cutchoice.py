"""Which cut and codec the agent uses for the next input: fixed by the user, or planned.

`AutoCut` plans with the same cost model as `edgecut plan` (`edgecut.costs`): this device's
timings (`EdgeTimes`: the profile given, or one pass on the first input, refined from every run),
the server's own tail profile from ServerInfo (re-read on every (re)connect), and bytes and
accuracy from the bundle's fidelity table; the accuracy budget (default 1 % top-1 disagreement)
excludes every option over it, and every option the table does not cover. The link estimate
follows the real transfers (less the time a request waited behind others in flight) and, when
nothing is sent, background probes (`LinkProber`), which also reconnect to a service that was
down. `Replanner` moves the cut when the prediction moves by more than its hysteresis margin and
logs every switch with the reason. Both classes also own the frontier encoding, so the
calibration and image normalisation of a cut are looked up in one place.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgecut import codec
from edgecut.answers import AnswerSpec
from edgecut.bundle import Bundle
from edgecut.costs import CloudTimes, cut_costs, option_agreement
from edgecut.edge.edgetimes import EdgeTimes, one_pass_profile
from edgecut.edge.linkprobe import LinkProber
from edgecut.edge.runner import Runner
from edgecut.edge.served import ServedTimes
from edgecut.edge.session import Reply, TailSession
from edgecut.errors import EdgecutError
from edgecut.link import LinkEstimate
from edgecut.planner import DEFAULT_MAX_ACCURACY_DROP, Constraints, LinkEstimator, PlanRow, Replanner
from edgecut.profile import load_profile

log = logging.getLogger(__name__)

REBUILD_EVERY = 8  # observations (edge runs, encodes, answers) between cost-table rebuilds
RESTART_FACTOR = 4.0  # a probe this far from the uplink estimate (either way) counts as a move


class CutChoice(Protocol):
    mode: str  # "fixed" | "auto"
    ready: bool  # False until `calibrate` has seen a first input
    precision: str  # edge head precision of the option `current` last returned

    def calibrate(self, feeds: Mapping[str, np.ndarray]) -> None: ...
    def current(self) -> tuple[str, str]: ...
    def encode(self, cut: str, codec_name: str, frontier: Mapping[str, np.ndarray]) -> bytes: ...
    def observe(self, reply: Reply, wire_ms: float, cut: str, codec_name: str) -> None: ...
    def observe_edge(self, first: int, timings_ms: Sequence[float]) -> None: ...
    def observe_encode(self, cut: str, codec_name: str, encode_ms: float, payload_bytes: int) -> None: ...
    def refused(self, cut: str, codec_name: str, why: str) -> None: ...
    def close(self) -> None: ...


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

    def __init__(
        self,
        bundle: Bundle,
        cut: str,
        codec_name: str,
        precision: str = "float",
        max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
    ) -> None:
        super().__init__(bundle)
        self.precision = precision
        bundle.manifest.cut(cut)  # unknown cut → BundleError listing the cuts
        codec.CodecSpec.parse(codec_name)
        self._choice = (cut, "none" if cut == "output" else codec_name)
        agree = option_agreement(bundle.manifest, *self._choice)
        if max_accuracy_drop is not None and (agree is None or 1 - agree > max_accuracy_drop):
            known = "unknown (no fidelity row)" if agree is None else f"{agree:.1%}"
            log.warning(
                "cut %s/%s is over the accuracy budget (agreement %s, budget %.2f%% disagreement); "
                "using it because it was asked for",
                *self._choice,
                known,
                max_accuracy_drop * 100,
            )

    def calibrate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Nothing to measure."""

    def current(self) -> tuple[str, str]:
        return self._choice

    def observe(self, reply: Reply, wire_ms: float, cut: str, codec_name: str) -> None:
        """A fixed cut ignores the link."""

    def observe_edge(self, first: int, timings_ms: Sequence[float]) -> None:
        """A fixed cut ignores timings."""

    def observe_encode(self, cut: str, codec_name: str, encode_ms: float, payload_bytes: int) -> None:
        """A fixed cut ignores timings."""

    def refused(self, cut: str, codec_name: str, why: str) -> None:
        """A fixed cut is what the user asked for: the errors say why it fails."""

    def close(self) -> None:
        """Nothing runs in the background."""


class AutoCut(Encoder):
    """`--cut auto`: plan over every (cut, codec) from measurements, re-plan as things move."""

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
        precisions: tuple[str, ...] = ("float",),
        max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
        answer: AnswerSpec | None = None,
    ) -> None:
        super().__init__(bundle)
        self.precisions, self.precision = precisions, precisions[0]
        self.bundle, self.runner, self.session = bundle, runner, session
        self.codecs = [c.strip() for c in codec_name.split(",") if c.strip()]
        self.constraints = Constraints(min_depth=min_depth, max_accuracy_drop=max_accuracy_drop)
        self.answer = answer  # what the agent asks the tail for: its bytes are the downlink cost
        self.edge_profile = edge_profile
        self.link = LinkEstimator()
        self.replanner: Replanner | None = None
        self.ready = False
        self.edge: EdgeTimes | None = None
        self.served = ServedTimes()  # the tail's times as this agent's answers report them
        self._lock = threading.RLock()  # the prober thread and the input path share the plan
        self._generation = -1  # session generation the cost table was built for
        self._built_at = (0, 0)  # (observations, new figures) when the cost table was built
        self._last_transfer = 0.0  # perf_counter of the last real transfer observed
        self._prober: LinkProber | None = None
        self._refused: set[tuple[str, str]] = set()  # options the server refused outright
        self._moved = 0  # probe rounds in a row that found the uplink far from its estimate

    def calibrate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """First plan: the profile given (or one pass on `feeds`), the server's tail profile if
        connected, the prior link; then the background prober refines the link."""
        if self.edge_profile is not None:
            base = load_profile(self.edge_profile)
            log.info("edge timings from profile %s (%s, %s)", self.edge_profile, base.device, base.mode)
        else:
            base = one_pass_profile(self.bundle, self.runner, feeds)
        self.edge = EdgeTimes(self.bundle, base, learn=self.edge_profile is None)
        with self._lock:
            self._rebuild()
        row = self._row()
        log.info(
            "cut chosen by the planner (auto): %s/%s, %.1f ms predicted",
            row.cost.cut,
            row.cost.codec,
            row.predicted_ms,
        )
        self.ready = True
        if self.session is not None:
            self._prober = LinkProber(self.session, self)
            self._prober.start()

    def _rebuild(self) -> None:
        """A new cost table from the current edge figures and the server's last ServerInfo."""
        assert self.edge is not None
        info = self.session.info if self.session else None
        self._generation = self.session.generation if self.session else 0
        self._built_at = self._seen()
        cloud = info.times if info else CloudTimes({})
        suite = self.session.config.server_key.suite if self.session else "x25519"
        costs = cut_costs(
            self.bundle, self.edge.profile(), cloud, self.codecs, self.precisions, suite, self.answer
        )
        costs = [c for c in self.served.apply(costs) if (c.cut, c.codec) not in self._refused]
        if info is not None:
            self.link.observe_queue(info.queue_delay_ms)
        if self.replanner is None:
            self.replanner = Replanner(costs, self.constraints)
        else:
            self.replanner.update_costs(costs)
        self.replanner.update(self.link.estimate())

    def _seen(self) -> tuple[int, int]:
        assert self.edge is not None
        return (
            self.edge.observations + self.served.observations,
            self.edge.new_figures + self.served.new_figures,
        )

    def refresh(self, force: bool = False) -> None:
        """Rebuild the costs after a (re)connect (new ServerInfo), enough new timings, or a first
        figure for an option (it was planned on a guess until now); `force`: now."""
        with self._lock:
            if self.edge is None:
                return
            (runs, news), (built_runs, built_news) = self._seen(), self._built_at
            stale = force or runs - built_runs >= REBUILD_EVERY or news != built_news
            if stale or (self.session is not None and self.session.generation != self._generation):
                self._rebuild()

    def _row(self) -> PlanRow:
        if self.replanner is None or self.replanner.current is None:
            raise EdgecutError("auto cut used before calibration")
        return self.replanner.current

    def current(self) -> tuple[str, str]:
        self.refresh()
        with self._lock:
            row = self._row()
        if not row.cost.edge_only and self.session is not None and not self.session.connected:
            self.precision = "float"  # every bundle has the float segments
            return self.bundle.manifest.cuts[-1].id, "none"  # nothing to send to: run it all here
        self.precision = row.cost.precision
        return row.cost.cut, row.cost.codec

    def observe(self, reply: Reply, wire_ms: float, cut: str, codec_name: str) -> None:
        """A real transfer; the time it waited behind requests ahead of it is not the link's. The
        server's decode and compute times for it go to `served`."""
        self.served.observe(cut, codec_name, reply.timings)
        with self._lock:
            rtt_s = self.link.estimate().rtt_ms / 1e3
            start = reply.wire_start
            if reply.ahead_done is not None:
                start = max(start, reply.ahead_done - rtt_s)
            link_ms = (reply.received - start) * 1e3 - reply.timings.total_ms
            self.link.observe_transfer(reply.bytes_up, reply.bytes_down, link_ms)
            self.link.observe_queue(reply.queue_delay_ms)
            self._last_transfer = time.perf_counter()
            if self.replanner is not None:
                self.replanner.update(self.link.estimate())

    def refused(self, cut: str, codec_name: str, why: str) -> None:
        """The server refused (cut, codec) as such (not for load or the network): never plan it
        again in this run, rather than hide it behind the local fallback on every request."""
        with self._lock:
            if (cut, codec_name) in self._refused:
                return
            log.warning("the server refuses %s/%s (%s); planning without it", cut, codec_name, why)
            self._refused.add((cut, codec_name))
            if self.edge is not None:
                self._rebuild()

    def observe_edge(self, first: int, timings_ms: Sequence[float]) -> None:
        if self.edge is not None:
            self.edge.observe_segments(first, timings_ms)

    def observe_encode(self, cut: str, codec_name: str, encode_ms: float, payload_bytes: int) -> None:
        if self.edge is not None:
            self.edge.observe_encode(cut, codec_name, encode_ms, payload_bytes)

    # ProbeSink, for the background prober
    def link_estimate(self) -> LinkEstimate:
        with self._lock:
            return self.link.estimate()

    def seconds_since_transfer(self) -> float:
        return time.perf_counter() - self._last_transfer

    def probed(self, rtt_ms: float | None, bytes_up: int, wire_ms: float) -> None:
        """A probe round: `bytes_up` took `wire_ms` there and back, `rtt_ms` for an empty one.

        The upload's transfer time is its round trip less this round's empty one (not the
        averaged RTT, which may still carry an old link's queueing). A link that moved far
        (`RESTART_FACTOR`) in two rounds in a row restarts the uplink average: probes are small
        next to the transfers that built it, and would take a minute to pull it back.
        """
        with self._lock:
            before = self.link.estimate()
            if rtt_ms is not None:
                self.link.observe_rtt(rtt_ms)
                wire_ms += self.link.estimate().rtt_ms - rtt_ms  # the estimator subtracts its RTT
            transfer_ms = wire_ms - self.link.estimate().rtt_ms
            rate_bps = bytes_up * 8 / transfer_ms * 1e3 if transfer_ms > 0 else math.inf
            moved = max(rate_bps / before.up_bps, before.up_bps / rate_bps) > RESTART_FACTOR
            self._moved = self._moved + 1 if moved else 0
            if self._moved >= 2:
                log.info(
                    "link probes: uplink far from %.2f Mbit/s twice; restarting its estimate",
                    before.up_bps / 1e6,
                )
                self.link.restart_uplink()
                self._moved = 0
            self.link.observe_transfer(bytes_up, 0, wire_ms)
            if self.replanner is not None:
                self.replanner.update(self.link.estimate())

    def close(self) -> None:
        if self._prober is not None:
            self._prober.close()
