"""Device replay: make this machine run a bundle as slowly as a profiled device would.

The segment really runs (so outputs are real), then the runner waits until the profiled time for
those segments has passed. A fast workstation paced with a Raspberry Pi profile then produces the
Pi's timings end to end — every figure produced this way must say it was paced.

The edge does more CPU work than its segments: the codec's encode (quantize, compress, or a JPEG
or PNG of the input) runs between head and wire. Left at this machine's speed it would be several
times faster than the device's, and the figures would flatter every option that sends. So
`pace_stage` slows such work by the slowdown the segments show (profiled ÷ measured, a running
average; the profile's scale before any segment ran). That factor is measured, not replayed, so
the encode part of a prediction is not right by construction. Sealing and decoding the answer
stay at this machine's speed (well under a millisecond here).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from edgecut.bundle import Bundle
from edgecut.edge.runner import Runner, SegmentRun
from edgecut.errors import UsageError
from edgecut.link import Ewma
from edgecut.profile import Profile

ALPHA = 0.1  # weight of one head run in the running slowdown


class PacedRunner:
    """Wraps a runner; each `run` lasts at least the profiled latency of its segments."""

    def __init__(self, inner: Runner, bundle: Bundle, profile: Profile) -> None:
        if profile.model != bundle.manifest.model:
            raise UsageError(f"profile is for model '{profile.model}', bundle is '{bundle.manifest.model}'")
        self.inner = inner
        self.profile = profile
        self.name = f"{inner.name} paced as {profile.device}"
        self._ms = [profile.segment_ms(s.name) for s in bundle.manifest.segments]
        self._slowdown = Ewma(ALPHA)
        self._slowdown.add(max(1.0, profile.scale or 1.0))

    def run(
        self, feeds: Mapping[str, np.ndarray], first: int, last: int, precision: str = "float"
    ) -> SegmentRun:
        if precision != "float":
            raise UsageError("a paced runner replays float profiles only")
        start = time.perf_counter()
        result = self.inner.run(feeds, first, last)
        target_s = sum(self._ms[first : last + 1]) / 1e3
        took_s = time.perf_counter() - start
        if took_s > 0:
            self._slowdown.add(max(1.0, target_s / took_s))
        if target_s > took_s:
            time.sleep(target_s - took_s)
        paced = tuple(max(t, p) for t, p in zip(result.timings_ms, self._ms[first : last + 1], strict=True))
        return SegmentRun(result.outputs, paced)

    @property
    def slowdown(self) -> float:
        """How many times slower than this machine the profiled device runs (running average)."""
        return self._slowdown.value or 1.0

    def pace_stage(self, measured_ms: float) -> float:
        """Wait out the rest of an edge stage that took `measured_ms` here; returns its paced ms."""
        target_ms = measured_ms * self.slowdown
        if target_ms > measured_ms:
            time.sleep((target_ms - measured_ms) / 1e3)
        return target_ms
