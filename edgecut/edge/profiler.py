"""Measure a bundle on this device: per-segment latency and per-cut codec cost.

Timings follow the usual discipline: warm-up runs excluded, then median and p90 over the timed
runs, all segments run as a chain so each sees real activations (not zeros, which some kernels
skip through faster).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519

from edgecut.bundle import Bundle, TensorSpec
from edgecut.codec import Calibration, CodecSpec, calibration_for, decode, encode
from edgecut.edge.runner import Runner
from edgecut.images import synthetic_feeds
from edgecut.keys import ServicePrivateKey, ServicePublicKey
from edgecut.profile import CodecTiming, Profile, SegmentTiming
from edgecut.sealing import Binding, open_request, seal_request


def synthetic_input(bundle: Bundle, seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth random image for image bundles (close to photo statistics), noise otherwise."""
    return synthetic_feeds(bundle.manifest, seed)


def profile_segments(
    bundle: Bundle, runner: Runner, feeds: Mapping[str, np.ndarray], runs: int = 20, warmup: int = 3
) -> tuple[SegmentTiming, ...]:
    n = len(bundle.manifest.segments)
    for _ in range(warmup):
        runner.run(feeds, 0, n - 1)
    samples = [runner.run(feeds, 0, n - 1).timings_ms for _ in range(runs)]
    return tuple(
        SegmentTiming.measured(s.name, col)
        for s, col in zip(bundle.manifest.segments, zip(*samples, strict=True), strict=True)
    )


def profile_codecs(
    bundle: Bundle, runner: Runner, feeds: Mapping[str, np.ndarray], codecs: Sequence[str], runs: int = 10
) -> tuple[CodecTiming, ...]:
    """Encode+seal on this device (the edge's cost) and open+decode (what the tail pays)."""
    private = _throwaway_key()
    m = bundle.manifest
    norm = (m.preprocess.mean, m.preprocess.std) if m.preprocess.kind == "image" else None
    out = []
    for cut in m.cuts[:-1]:
        head = m.head(cut.id)
        tensors = runner.run(feeds, 0, len(head) - 1).outputs if head else dict(feeds)
        calib = calibration_for(bundle, cut.id)
        for name in codecs:
            spec = CodecSpec.parse(name)
            usable = spec.scheme != "pca" or (calib is not None and bool(calib.bottlenecks))
            if usable and spec.is_image == (cut.id == "input" and norm is not None):
                frame = _Frame(
                    Binding(m.model, m.version, cut.id, "profile"), cut.frontier, spec, calib, norm
                )
                out.append(frame.time(private, tensors, runs))
    return tuple(out)


@dataclass(frozen=True)
class _Frame:
    binding: Binding
    specs: tuple[TensorSpec, ...]
    codec: CodecSpec
    calibration: Calibration | None
    norm: tuple[Sequence[float], Sequence[float]] | None

    def time(self, key: ServicePrivateKey, tensors: Mapping[str, np.ndarray], runs: int) -> CodecTiming:
        def seal() -> bytes:
            payload = encode(tensors, self.specs, self.codec, self.calibration, image_norm=self.norm)
            return seal_request(key.public, self.binding, payload)[0]

        sealed = seal()

        def unseal() -> object:
            payload = open_request(key, self.binding, sealed)[0]
            return decode(payload, self.specs, image_norm=self.norm, calibration=self.calibration)

        return CodecTiming(
            self.binding.cut, str(self.codec), _median_ms(seal, runs), _median_ms(unseal, runs), len(sealed)
        )


def profile_bundle(
    bundle: Bundle,
    runner: Runner,
    *,
    runtime: str,
    threads: int,
    device: str | None = None,
    codecs: Sequence[str] = ("int8", "jpeg90"),
    runs: int = 20,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> Profile:
    """Measure on `feeds` (a real input, as the agent's `--cut auto` does) or a synthetic one."""
    feeds = feeds if feeds is not None else synthetic_input(bundle)
    return Profile(
        model=bundle.manifest.model,
        model_version=bundle.manifest.version,
        manifest_sha256=bundle.manifest_sha256,
        device=device or default_device(threads),
        runtime=runtime,
        threads=threads,
        mode="measured",
        source=f"edgecut profile on {platform.node()} ({platform.machine()})",
        segments=profile_segments(bundle, runner, feeds, runs),
        codecs=profile_codecs(bundle, runner, feeds, codecs),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _throwaway_key() -> ServicePrivateKey:
    """Sealing costs the same with any key; this one never leaves the process."""
    key = x25519.X25519PrivateKey.generate()
    public = ServicePublicKey("x25519", key.public_key(), key.public_key().public_bytes_raw())
    return ServicePrivateKey("x25519", key, public)


def default_device(threads: int) -> str:
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{threads or 'all'}t"


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
