"""Run the tail segments k+1..N of a bundle: one small interface, ONNX Runtime behind it.

Sessions are cached per segment file, not per cut: every cut's tail is a suffix of the same segment
list, so the cut-7 and cut-8 tails share all but one session. The cache is a bounded LRU because a
server holding many bundle versions must not hold every session of every one forever.

ONNX Runtime covers CPU, CUDA and TensorRT through its execution providers, which is why there is
no separate PyTorch executor: a torch tail would need the original module (bundles carry ONNX only)
and would add a 2 GB dependency for the same kernels the CUDA EP runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnxruntime as ort

from edgecut.bundle import Bundle, Segment
from edgecut.images import synthetic_feeds
from edgecut.profile import SegmentTiming
from edgecut.runtime import OrtOptions, make_session, resolve_providers

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the batcher needs: run a cut's tail, measure a bundle, forget a bundle."""

    device: str  # what ServerInfo reports, e.g. "cpu" or "cuda (CUDAExecutionProvider)"

    def run(self, bundle: Bundle, cut: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs (manifest.outputs) of the tail behind `cut`, fed with that cut's frontier."""
        ...

    def warm_up(self, bundle: Bundle, runs: int) -> dict[str, SegmentTiming]:
        """Create every session of `bundle`, run each once, then time `runs` runs per segment."""
        ...

    def evict(self, bundle: Bundle) -> None:
        """Drop the sessions of a retired bundle."""
        ...


_Key = tuple[str, str, str]  # (bundle name, manifest sha256, segment file)


class OrtExecutor:
    """ONNX Runtime sessions; thread-safe (ORT's `run` is, and the cache takes a lock)."""

    def __init__(self, options: OrtOptions, cache_size: int = 128) -> None:
        self.options = options
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._sessions: OrderedDict[_Key, ort.InferenceSession] = OrderedDict()
        self.device = _describe(options)

    def run(self, bundle: Bundle, cut: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(feeds)
        for segment in bundle.manifest.tail(cut):
            session = self._session(bundle, segment)
            names = list(segment.outputs)
            values = session.run(names, {name: env[name] for name in segment.inputs})
            env.update(zip(names, values, strict=True))
        return {spec.name: env[spec.name] for spec in bundle.manifest.outputs}

    def warm_up(self, bundle: Bundle, runs: int) -> dict[str, SegmentTiming]:
        """Each segment timed on the activations a realistic input gives it (not zeros, which some
        kernels skip through faster): the chain runs on `synthetic_feeds`."""
        timings = {}
        manifest = bundle.manifest
        env = synthetic_feeds(manifest)
        for segment in manifest.segments:
            session = self._session(bundle, segment)
            feeds = {name: env[name] for name in segment.inputs}
            timings[segment.name] = _time(session, segment, feeds, runs)
            env.update(zip(segment.outputs, session.run(list(segment.outputs), feeds), strict=True))
        return timings

    def evict(self, bundle: Bundle) -> None:
        with self._lock:
            for key in [k for k in self._sessions if k[:2] == _bundle_key(bundle)]:
                del self._sessions[key]

    def _session(self, bundle: Bundle, segment: Segment) -> ort.InferenceSession:
        key = (*_bundle_key(bundle), segment.file)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
                return session
        # Created outside the lock: loading takes tens of ms and must not stall other lanes.
        # Two threads may both create one; the second simply replaces the first.
        # The bytes hashed are the bytes ORT loads: a file swapped after the bundle was verified
        # (or since this session was last evicted) is refused, never run.
        session = make_session(bundle.read_verified(segment.file), self.options, label=segment.file)
        with self._lock:
            self._sessions[key] = session
            while len(self._sessions) > self.cache_size:
                evicted, _ = self._sessions.popitem(last=False)
                log.debug("session cache full: dropped %s %s", evicted[0], evicted[2])
        return session


def _bundle_key(bundle: Bundle) -> tuple[str, str]:
    return bundle.name, bundle.manifest_sha256


def _time(
    session: ort.InferenceSession, segment: Segment, feeds: dict[str, np.ndarray], runs: int
) -> SegmentTiming:
    names = list(segment.outputs)
    session.run(names, feeds)  # first run allocates and picks kernels: excluded
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(names, feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
    return SegmentTiming.measured(segment.name, samples)


def _describe(options: OrtOptions) -> str:
    chosen = resolve_providers(options.providers)
    if chosen[0] == "CPUExecutionProvider":
        return f"cpu (onnxruntime {ort.__version__}, {options.threads or 'default'} threads)"
    return f"{chosen[0].removesuffix('ExecutionProvider').lower()} (onnxruntime {ort.__version__})"
