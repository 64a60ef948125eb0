"""Run a chain of ONNX segments under ONNX Runtime.

Segments pass tensors by name: each reads its inputs from the tensors computed so far and adds its
outputs. Running segments 1..k on the edge and k+1..N on the tail is this same chain split in two,
which is why composition can be bit-identical to the unsplit model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def run_chain(
    feeds: Mapping[str, np.ndarray], steps: Sequence[Step]
) -> tuple[dict[str, np.ndarray], tuple[float, ...]]:
    """Feed each step the tensors computed so far; the last step's outputs and each step's ms.

    The one way segments are chained, whatever runs them (ORT sessions here, the edge's ORT
    or LiteRT runners), so a frontier that skips a segment (a skip connection) is found alike.
    """
    env = dict(feeds)
    out: dict[str, np.ndarray] = dict(feeds)
    timings = []
    for step in steps:
        t0 = time.perf_counter()
        out = step(env)
        timings.append((time.perf_counter() - t0) * 1e3)
        env.update(out)
    return out, tuple(timings)


def session_step(sess: ort.InferenceSession) -> Step:
    """A chain step running one ORT session on the tensors it names."""
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]

    def step(env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, sess.run(outputs, {name: env[name] for name in inputs}), strict=True))

    return step


def invoke_positional(
    it: Any, inputs: Sequence[str], outputs: Sequence[str], env: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run a LiteRT interpreter with tensors matched by position to the manifest's names.

    The converter renames tensors, so position is the only link to the ONNX segment; the
    partitioner checks each conversion exactly as the edge runner will run it.
    """
    in_details, out_details = it.get_input_details(), it.get_output_details()
    if len(in_details) != len(inputs) or len(out_details) != len(outputs):
        raise ValueError(
            f"{len(in_details)} inputs / {len(out_details)} outputs, the manifest has "
            f"{len(inputs)} / {len(outputs)}"
        )
    for detail, name in zip(in_details, inputs, strict=True):
        it.set_tensor(detail["index"], np.ascontiguousarray(env[name], detail["dtype"]))
    it.invoke()
    return {name: np.array(it.get_tensor(d["index"])) for d, name in zip(out_details, outputs, strict=True)}


class SegmentChain:
    """Sessions for consecutive segments; `run` feeds the first and returns the last's outputs."""

    def __init__(self, sessions: Sequence[ort.InferenceSession]) -> None:
        self.sessions = list(sessions)

    @classmethod
    def from_files(cls, files: Sequence[Path], options: OrtOptions = OrtOptions()) -> SegmentChain:
        return cls([make_session(f, options) for f in files])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_chain(feeds, [session_step(s) for s in self.sessions])[0]
