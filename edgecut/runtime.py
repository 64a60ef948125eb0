"""Run a chain of ONNX segments under ONNX Runtime.

Segments pass tensors by name: each reads its inputs from the tensors computed so far and adds its
outputs. Running segments 1..k on the edge and k+1..N on the tail is this same chain split in two,
which is why composition can be bit-identical to the unsplit model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecut.errors import BundleError, OnnxRuntimeMissing, UsageError

try:  # the `ort` extra, or NVIDIA's onnxruntime-gpu on a Jetson: both install the `onnxruntime` module
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
except ModuleNotFoundError as exc:
    raise OnnxRuntimeMissing(
        "ONNX Runtime is not installed (neither onnxruntime nor onnxruntime-gpu)",
        hint='pip install "edgecut[edge]" — on a Jetson install NVIDIA\'s onnxruntime-gpu wheel for '
        "your JetPack instead (docs/devices.md)",
    ) from exc

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


@dataclass(frozen=True)
class OrtOptions:
    """How segments are executed."""

    providers: tuple[str, ...] = ("cpu",)  # keys of PROVIDERS, tried in order
    threads: int = 0  # intra-op threads; 0 = ONNX Runtime's default (all cores)
    # (provider key, option, value) for ORT's provider_options, e.g. ("tensorrt",
    # "trt_engine_cache_enable", "True"); options of a provider this build lacks are dropped with it
    provider_options: tuple[tuple[str, str, str], ...] = ()


def tensorrt_options(cache_dir: str | None, fp16: bool) -> tuple[tuple[str, str, str], ...]:
    """TensorRT EP options: an engine cache (a Jetson builds each segment's engine once, not at
    every start) and FP16 kernels."""
    opts: list[tuple[str, str, str]] = []
    if cache_dir:
        opts += [
            ("tensorrt", "trt_engine_cache_enable", "True"),
            ("tensorrt", "trt_engine_cache_path", cache_dir),
        ]
    if fp16:
        opts.append(("tensorrt", "trt_fp16_enable", "True"))
    return tuple(opts)


def resolve_providers(names: Sequence[str]) -> list[str]:
    """Map short names to ORT provider names, keeping only those this build has."""
    available = set(ort.get_available_providers())
    chosen = []
    for name in names:
        if name not in PROVIDERS:
            raise UsageError(f"unknown execution provider '{name}' (use {', '.join(PROVIDERS)})")
        if PROVIDERS[name] in available:
            chosen.append(PROVIDERS[name])
    if not chosen:
        raise UsageError(
            f"none of the execution providers {list(names)} is available in this onnxruntime "
            f"build (available: {sorted(available)})"
        )
    return chosen


def make_session(
    model: Path | bytes, options: OrtOptions = OrtOptions(), label: str = "segment"
) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    try:
        providers = resolve_providers(options.providers)
        return ort.InferenceSession(
            source, so, providers=providers, provider_options=_provider_options(options, providers)
        )
    except (
        ort_errors.Fail,
        ort_errors.InvalidGraph,
        ort_errors.NoSuchFile,
        ort_errors.InvalidProtobuf,
        ort_errors.NotImplemented,
        ort_errors.RuntimeException,
    ) as exc:
        name = os.path.basename(str(model)) if isinstance(model, Path) else label
        raise BundleError(f"{name}: ONNX Runtime cannot load it: {exc}") from exc


def _provider_options(options: OrtOptions, providers: Sequence[str]) -> list[dict[str, str]]:
    """One dict per resolved provider, in order (ORT pairs them by position)."""
    by_name: dict[str, dict[str, str]] = {}
    for key, option, value in options.provider_options:
        by_name.setdefault(PROVIDERS.get(key, key), {})[option] = value
    return [by_name.get(p, {}) for p in providers]


class SegmentChain:
    """Sessions for consecutive segments; `run` feeds the first and returns the last's outputs."""

    def __init__(self, sessions: Sequence[ort.InferenceSession], names: Sequence[str]) -> None:
        self.sessions = list(sessions)
        self.names = list(names)
        self.last_timings_ms: list[float] = []

    @classmethod
    def from_files(cls, files: Sequence[Path], options: OrtOptions = OrtOptions()) -> SegmentChain:
        return cls([make_session(f, options) for f in files], [f.name for f in files])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(feeds)
        out: dict[str, np.ndarray] = dict(feeds)
        timings = []
        for sess in self.sessions:
            t0 = time.perf_counter()
            names = [o.name for o in sess.get_outputs()]
            values = sess.run(names, {i.name: env[i.name] for i in sess.get_inputs()})
            timings.append((time.perf_counter() - t0) * 1e3)
            out = dict(zip(names, values, strict=True))
            env.update(out)
        self.last_timings_ms = timings
        return out
