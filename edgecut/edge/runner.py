"""Runtimes for the edge: run any consecutive range of a bundle's segments on this device.

The edge runs segments 1..k (the head) for every request and, when the cloud cannot answer,
segments k+1..N (the local fallback tail). Loading every segment once and running an arbitrary
range is what lets the agent move its cut at run time without reloading anything.

Two runtimes sit behind one interface: ONNX Runtime over the `.onnx` segments (execution providers
configurable: XNNPACK/CPU on ARM boards, CUDA/TensorRT on a Jetson) and LiteRT (`ai-edge-litert`)
over `.tflite` conversions of the same segments, where the bundle ships them.

Model bytes come from `edgecut.protect.ModelFiles` (read once, hash-checked, decrypted in memory
for an encrypted bundle) and are handed to the runtime as bytes: no plaintext model file is ever
written. An ORT runner may also hold a precision variant (int8 head, `edgecut.variants`) of every
segment; `run(..., precision="int8")` uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgecut.bundle import Bundle, Segment
from edgecut.errors import BundleError, DependencyError, UsageError
from edgecut.protect import ModelFiles
from edgecut.runtime import OrtOptions, Step, invoke_positional, make_session, run_chain
from edgecut.variants import FLOAT, head_variants

log = logging.getLogger(__name__)

RUNTIMES = ("ort", "litert")


@dataclass(frozen=True)
class SegmentRun:
    """What running a range of segments produced."""

    outputs: dict[str, np.ndarray]  # the last segment's outputs, i.e. the frontier at its end cut
    timings_ms: tuple[float, ...]  # wall time of each segment run, in order


class Runner(Protocol):
    """Runs segments `first..last` (0-based indices into `manifest.segments`, inclusive)."""

    name: str  # e.g. "ort[cpu]x4", for logs and profiles

    def run(
        self, feeds: Mapping[str, np.ndarray], first: int, last: int, precision: str = FLOAT
    ) -> SegmentRun: ...


def _chain(feeds: Mapping[str, np.ndarray], steps: Sequence[Step]) -> SegmentRun:
    return SegmentRun(*run_chain(feeds, steps))


def _check_range(n: int, first: int, last: int) -> None:
    if not 0 <= first <= last + 1 <= n:
        raise UsageError(f"segment range {first}..{last} is outside 0..{n - 1}")


class OrtRunner:
    """ONNX Runtime sessions for every segment of a bundle (thread-safe: ORT sessions are).

    `precisions` names the variants to load beside the float segments (e.g. ("int8",)).
    """

    def __init__(
        self,
        bundle: Bundle,
        options: OrtOptions | None = None,
        files: ModelFiles | None = None,
        precisions: tuple[str, ...] = (),
    ) -> None:
        options = options or OrtOptions()
        files = files or ModelFiles(bundle)
        self.name = f"ort[{','.join(options.providers)}]x{options.threads or 'auto'}"
        segments = [s.file for s in bundle.manifest.segments]
        variants = head_variants(bundle.manifest)
        self._sessions: dict[str, list[Any]] = {FLOAT: [_session(files, f, options) for f in segments]}
        for p in precisions:
            if p not in variants:
                raise UsageError(f"bundle '{bundle.name}' has no {p} head (edgecut bundle quantize)")
            self._sessions[p] = [_session(files, variants[p].files[f], options) for f in segments]
        first = self._sessions[FLOAT]
        self._outputs = [[o.name for o in sess.get_outputs()] for sess in first]
        self._inputs = [[i.name for i in sess.get_inputs()] for sess in first]

    def run(
        self, feeds: Mapping[str, np.ndarray], first: int, last: int, precision: str = FLOAT
    ) -> SegmentRun:
        _check_range(len(self._outputs), first, last)
        if precision not in self._sessions:
            raise UsageError(f"this runner has no {precision} segments loaded")
        sessions = self._sessions[precision]
        return _chain(feeds, [self._step(sessions[i], i) for i in range(first, last + 1)])

    def _step(self, sess: Any, i: int) -> Any:
        inputs, outputs = self._inputs[i], self._outputs[i]

        def step(env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            values = sess.run(outputs, {name: env[name] for name in inputs})
            return dict(zip(outputs, values, strict=True))

        return step


def _session(files: ModelFiles, rel: str, options: OrtOptions) -> Any:
    return make_session(files.read(rel), options, label=rel)


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ModuleNotFoundError as exc:
        raise DependencyError(
            "the LiteRT runtime (ai-edge-litert) is not installed", hint='pip install "edgecut[litert]"'
        ) from exc
    return Interpreter


def tflite_path(bundle: Bundle, segment: Segment) -> str:
    """The `.tflite` beside a segment (logical bundle path); it must be listed in the manifest."""
    rel = str(Path(segment.file).with_suffix(".tflite"))
    if bundle.stored(rel) not in bundle.manifest.files:
        raise BundleError(
            f"bundle '{bundle.name}' has no LiteRT conversion of {segment.file} ({rel} not in the manifest)",
            hint="convert with `edgecut partition --tflite`, or use --runtime ort",
        )
    return rel


class LiteRtRunner:
    """LiteRT interpreters over `.tflite` segments; tensors are matched by position.

    Converters rename tensors, so the manifest's segment input/output order is the contract.
    Interpreters are not thread-safe; the agent runs the head from one thread only.
    """

    def __init__(self, bundle: Bundle, threads: int = 0, files: ModelFiles | None = None) -> None:
        interpreter = _interpreter_class()
        files = files or ModelFiles(bundle)
        self.name = f"litert x{threads or 'auto'}"
        self._segments = bundle.manifest.segments
        self._interpreters: dict[int, Any] = {}
        for i, seg in enumerate(self._segments):
            if bundle.stored(str(Path(seg.file).with_suffix(".tflite"))) in bundle.manifest.files:
                rel = tflite_path(bundle, seg)
                it = interpreter(model_content=files.read(rel), num_threads=threads or None)
                it.allocate_tensors()
                self._interpreters[i] = it
        if not self._interpreters:
            tflite_path(bundle, self._segments[0])  # raises the explanatory BundleError

    def covers(self, first: int, last: int) -> bool:
        """Whether every segment in first..last has a LiteRT conversion."""
        return all(i in self._interpreters for i in range(first, last + 1))

    def run(
        self, feeds: Mapping[str, np.ndarray], first: int, last: int, precision: str = FLOAT
    ) -> SegmentRun:
        _check_range(len(self._segments), first, last)
        if precision != FLOAT:
            raise UsageError(f"LiteRT runs float segments only; --precision {precision} needs --runtime ort")
        if not self.covers(first, last):
            raise BundleError(
                f"segments {first + 1}..{last + 1} are not all converted to LiteRT; "
                "choose a cut whose head is converted, or use --runtime ort"
            )
        return _chain(feeds, [self._step(i) for i in range(first, last + 1)])

    def _step(self, i: int) -> Any:
        it, seg = self._interpreters[i], self._segments[i]

        def step(env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return invoke_positional(it, seg.inputs, seg.outputs, env)

        return step


def make_runner(
    bundle: Bundle,
    runtime: str,
    options: OrtOptions,
    files: ModelFiles | None = None,
    precisions: tuple[str, ...] = (),
) -> Runner:
    """The head runtime by name; the local fallback tail always uses ORT (tails are not converted)."""
    if runtime == "ort":
        return OrtRunner(bundle, options, files, precisions)
    if runtime == "litert":
        return LiteRtRunner(bundle, options.threads, files)
    raise UsageError(f"unknown runtime '{runtime}' (use {', '.join(RUNTIMES)})")
