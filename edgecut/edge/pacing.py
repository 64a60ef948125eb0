"""Device replay: make this machine run a bundle as slowly as a profiled device would.

The segment really runs (so outputs are real), then the runner waits until the profiled time for
those segments has passed. A fast workstation paced with a Raspberry Pi profile then produces the
Pi's timings end to end — every figure produced this way must say it was paced.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from edgecut.bundle import Bundle
from edgecut.edge.runner import Runner, SegmentRun
from edgecut.errors import UsageError
from edgecut.profile import Profile


class PacedRunner:
    """Wraps a runner; each `run` lasts at least the profiled latency of its segments."""

    def __init__(self, inner: Runner, bundle: Bundle, profile: Profile) -> None:
        if profile.model != bundle.manifest.model:
            raise UsageError(f"profile is for model '{profile.model}', bundle is '{bundle.manifest.model}'")
        self.inner = inner
        self.profile = profile
        self.name = f"{inner.name} paced as {profile.device}"
        self._ms = [profile.segment_ms(s.name) for s in bundle.manifest.segments]

    def run(
        self, feeds: Mapping[str, np.ndarray], first: int, last: int, precision: str = "float"
    ) -> SegmentRun:
        if precision != "float":
            raise UsageError("a paced runner replays float profiles only")
        start = time.perf_counter()
        result = self.inner.run(feeds, first, last)
        target_s = sum(self._ms[first : last + 1]) / 1e3
        remaining = target_s - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        paced = tuple(max(t, p) for t, p in zip(result.timings_ms, self._ms[first : last + 1], strict=True))
        return SegmentRun(result.outputs, paced)
