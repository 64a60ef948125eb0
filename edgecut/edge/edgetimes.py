"""This device's timings as the agent learns them: start from what is known, refine from real runs.

The first input must not wait for a whole-bundle profile (warm-ups, repeats, every codec at every
cut). So `--cut auto` starts from the profile it is given, or else from one timed pass of the whole
chain on the first input, and folds every real head run (and every local tail run, and every
encode) into running averages. A profile given with `--edge-profile` is kept as it is: it may
describe another device that this machine stands in for, and this machine's own speed would
overwrite it with the wrong figures.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from edgecut.bundle import Bundle
from edgecut.costs import SEAL_OVERHEAD_BYTES
from edgecut.edge.runner import Runner
from edgecut.link import Ewma
from edgecut.profile import CodecTiming, Profile, SegmentTiming

ALPHA = 0.2  # weight of a new run in the running averages


def one_pass_profile(bundle: Bundle, runner: Runner, feeds: Mapping[str, np.ndarray]) -> Profile:
    """Per-segment times from one run of the whole chain on `feeds` (a real input): a rough start."""
    m = bundle.manifest
    run = runner.run(feeds, 0, len(m.segments) - 1)
    segments = tuple(
        SegmentTiming(s.name, ms, ms, 1) for s, ms in zip(m.segments, run.timings_ms, strict=True)
    )
    return Profile(
        model=m.model,
        model_version=m.version,
        manifest_sha256=bundle.manifest_sha256,
        device="this device",
        runtime=runner.name,
        threads=0,
        mode="measured",
        source="one pass on the first input, refined from every run (edgecut --cut auto)",
        segments=segments,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


class EdgeTimes:
    """A `Profile` that follows real runs when `learn` is set (thread-safe)."""

    def __init__(self, bundle: Bundle, base: Profile, learn: bool) -> None:
        self.base, self.learn = base, learn
        self._names = [s.name for s in bundle.manifest.segments]
        self._lock = threading.Lock()
        self._segments = {t.segment: _ewma(t.latency_ms) for t in base.segments}
        self._codecs = {(c.cut, c.codec): c for c in base.codecs}
        self._profiled = frozenset(self._codecs)  # options the profile itself has a figure for
        self._encode: dict[tuple[str, str], Ewma] = {}
        self.observations = 0  # runs folded in so far
        self.new_figures = 0  # options that got their first figure here: the plan must see them now

    def observe_segments(self, first: int, timings_ms: Sequence[float]) -> None:
        """Segments `first`, `first + 1`, … just took `timings_ms`."""
        if not self.learn:
            return
        with self._lock:
            for name, ms in zip(self._names[first:], timings_ms, strict=False):
                self._segments.setdefault(name, Ewma(ALPHA)).add(ms)
            self.observations += 1

    def observe_encode(self, cut: str, codec: str, encode_ms: float, payload_bytes: int) -> None:
        """One real encode + seal at (cut, codec); kept where the profile has no figure of its own.

        An option the profile lacks starts at no encode cost at all; its first real figure counts
        as news (`new_figures`), so the plan is rebuilt at once rather than after several runs."""
        with self._lock:
            if (cut, codec) in self._profiled and not self.learn:
                return
            if (cut, codec) not in self._encode:
                self.new_figures += 1
            self._encode.setdefault((cut, codec), Ewma(ALPHA)).add(encode_ms)
            old = self._codecs.get((cut, codec))
            nbytes = old.bytes_ if old else payload_bytes + SEAL_OVERHEAD_BYTES
            ms = self._encode[(cut, codec)].value or encode_ms
            self._codecs[(cut, codec)] = CodecTiming(cut, codec, ms, old.decode_ms if old else 0.0, nbytes)
            self.observations += 1

    def profile(self) -> Profile:
        """The current figures as a profile for `edgecut.costs`."""
        with self._lock:
            segments = tuple(
                SegmentTiming(name, e.value or 0.0, e.value or 0.0, 1)
                for name, e in self._segments.items()
                if e.value is not None
            )
            codecs = tuple(self._codecs.values())
        if not self.learn:
            return dataclasses.replace(self.base, codecs=codecs)
        return dataclasses.replace(self.base, segments=segments, codecs=codecs)


def _ewma(value: float) -> Ewma:
    e = Ewma(ALPHA)
    e.add(value)
    return e
