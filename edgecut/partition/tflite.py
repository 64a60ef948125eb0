"""LiteRT (`.tflite`) conversions of a bundle's edge-side segments (`edgecut partition --tflite`).

The route is generic, for any bundle: ONNX segment → `onnx2torch` (an fx GraphModule) →
`litert_torch.convert` with batch-1 sample tensors → `segments/seg_XXX.tflite` beside the `.onnx`.
Each conversion is then run with LiteRT on real inputs (the frontier the ONNX segments compute from
sample photos) and its outputs compared, by position, with ONNX Runtime's: that is the contract the
edge's `LiteRtRunner` relies on. A conversion that fails, or drifts beyond `tolerance` × the output
scale, is reported in `manifest.verification["tflite"]` and not shipped: cuts whose head needs it
stay ONNX-only. The converters are heavy (see CONVERTER_HINT: ~1.4 GB with jax and transformers)
and are imported only when a conversion runs.

Conversions are batch 1 (the edge runs one frame at a time) and float32 (no quantization).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecut.bundle import Bundle, Segment, load_bundle, sha256_file, write_manifest
from edgecut.errors import DependencyError, UsageError
from edgecut.runtime import invoke_positional

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-3  # max |LiteRT - ORT| allowed, relative to max(1, max |ORT output|)
CONVERTER_HINT = (
    "pip install litert-torch && pip install --no-deps onnx2torch (heavy: ~1.4 GB "
    "with jax and transformers; install a CPU torch first)"
)
# ONNX opset-18 reductions take `axes` as an input; onnx2torch 1.5 only knows the attribute form.
# (ReduceMax/ReduceMin 20 only add bool.)
_REDUCE_18 = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
)
# Newer op versions that only add element types (bfloat16, float8, int4, string) over a version
# onnx2torch 1.5 converts: (op, new version, version with the same semantics for our dtypes).
_TYPE_ONLY_BUMPS = (
    ("Cast", 19, 13),
    ("Cast", 21, 13),
    ("Constant", 19, 13),
    ("Constant", 21, 13),
    ("ConstantOfShape", 20, 9),
    ("ConstantOfShape", 21, 9),
    ("Conv", 22, 11),
    ("ConvTranspose", 22, 11),
    ("Dropout", 22, 13),
    ("Elu", 22, 6),
    ("Equal", 19, 13),
    ("Flatten", 21, 13),
    ("GlobalAveragePool", 22, 1),
    ("HardSigmoid", 22, 6),
    ("HardSwish", 22, 14),
    ("Identity", 19, 16),
    ("Identity", 21, 16),
    ("InstanceNormalization", 22, 6),
    ("IsInf", 20, 10),
    ("IsNaN", 20, 13),
    ("MaxPool", 22, 12),
    ("Round", 22, 11),
    ("Selu", 22, 6),
    ("Shape", 19, 15),
    ("Shape", 21, 15),
    ("Softplus", 22, 1),
    ("Softsign", 22, 1),
    ("Transpose", 21, 13),
    ("Unsqueeze", 21, 13),
)


@dataclasses.dataclass(frozen=True)
class Conversion:
    """The outcome for one segment, as stored under `manifest.verification["tflite"]`."""

    segment: str  # segment file stem, e.g. "seg_003"
    status: str  # "ok" | "failed" | "drift"
    max_abs_diff: float | None  # over the sample inputs and every output; None when not measured
    scale: float | None  # max |ORT output| over the same samples
    error: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["segment"]
        return d


def tflite_file(segment: Segment) -> str:
    """Bundle-relative path of a segment's LiteRT conversion (the runner looks exactly here)."""
    return str(Path(segment.file).with_suffix(".tflite"))


def onnx_fingerprint(path: Path) -> str:
    """sha256 of a segment's computation: the ONNX bytes without doc strings and metadata.

    The dynamo exporter stores Python stack traces (absolute install paths) in node metadata, so
    the file's own sha256 changes with the venv's location while the graph and weights do not.
    """
    import onnx

    model = onnx.load(str(path))
    _strip(model)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _strip(message: Any) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    if "metadata_props" in fields:
        del message.metadata_props[:]
    if "doc_string" in fields:
        message.doc_string = ""
    for field, value in message.ListFields():
        if field.message_type is None or field.name == "metadata_props":
            continue
        for sub in value if _is_repeated(field) else [value]:
            _strip(sub)


def _is_repeated(field: Any) -> bool:
    label = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is deprecated there
    return bool(label) if label is not None else field.label == field.LABEL_REPEATED


def edge_segments(bundle: Bundle) -> list[int]:
    """Indices of segments that run on the edge side of some cut: all but the last."""
    return list(range(len(bundle.manifest.segments) - 1))


def convert_bundle(
    bundle: Bundle,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    segments: Sequence[int] | None = None,
    signing_key: Any = None,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> Bundle:
    """Convert segments (0-based indices; default: the edge-side ones) and record the outcome.

    Writes `segments/seg_XXX.tflite` for every conversion within tolerance, lists them with their
    sha256, records every outcome in `verification["tflite"]`, rewrites (and re-signs) the
    manifest, and returns the bundle reloaded. `samples` are model-input feeds (default: the
    scikit-image photos for image models, seeded random tensors otherwise).
    """
    m = bundle.manifest
    chosen = edge_segments(bundle) if segments is None else sorted(set(segments))
    for i in chosen:
        if not 0 <= i < len(m.segments):
            raise UsageError(f"segment index {i} is outside 0..{len(m.segments) - 1}")
    tools = _converter()
    feeds = list(samples) if samples is not None else _default_samples(bundle)
    per_segment = _segment_inputs(bundle, feeds, max(chosen, default=-1))
    results: list[Conversion] = []
    made: dict[int, Path] = {}
    with tempfile.TemporaryDirectory(prefix="edgecut-tflite-") as tmp:
        for i in chosen:
            seg = m.segments[i]
            out = Path(tmp) / Path(tflite_file(seg)).name
            result = _convert_one(tools, bundle, seg, per_segment[i], out, tolerance)
            log.info(
                "%s → tflite: %s (max |Δ| %s)%s",
                seg.file,
                result.status,
                f"{result.max_abs_diff:.3g}" if result.max_abs_diff is not None else "-",
                f": {result.error}" if result.error else "",
            )
            results.append(result)
            if result.status == "ok":
                made[i] = out
        return install_tflite(bundle, made, results, signing_key=signing_key)


def install_tflite(
    bundle: Bundle, files: Mapping[int, Path], results: Sequence[Conversion] = (), *, signing_key: Any = None
) -> Bundle:
    """Copy `.tflite` files (segment index → path) into the bundle and list them in its manifest.

    Segments that have a result other than "ok" lose any earlier conversion, so a stale `.tflite`
    never outlives the ONNX segment it was checked against. Returns the bundle reloaded.
    """
    m = bundle.manifest
    file_map = dict(m.files)
    for r in results:
        if r.status != "ok":
            seg = next(s for s in m.segments if s.name == r.segment)
            file_map.pop(tflite_file(seg), None)
            bundle.path(tflite_file(seg)).unlink(missing_ok=True)
    for i, src in files.items():
        rel = tflite_file(m.segments[i])
        shutil.copyfile(src, bundle.path(rel))
        file_map[rel] = sha256_file(bundle.path(rel))
    report = dict(m.verification.get("tflite", {}))
    report.update({r.segment: r.to_json() for r in results})
    verification = {**m.verification, "tflite": dict(sorted(report.items()))}
    write_manifest(
        bundle.root, dataclasses.replace(m, files=file_map, verification=verification), signing_key
    )
    return load_bundle(bundle.root)


def _converter() -> dict[str, Any]:
    try:
        import litert_torch
        import torch
        from ai_edge_litert.interpreter import Interpreter

        onnx2torch = _import_onnx2torch()
    except ModuleNotFoundError as exc:
        raise DependencyError(
            f"converting segments to LiteRT needs {exc.name}, which is not installed", hint=CONVERTER_HINT
        ) from exc
    _register_newer_opsets()
    return {
        "torch": torch,
        "litert_torch": litert_torch,
        "onnx2torch": onnx2torch,
        "Interpreter": Interpreter,
    }


def _import_onnx2torch() -> Any:
    """onnx2torch imports torchvision (for NMS/RoIAlign only) at import time.

    PyPI has no CPU-only torchvision: installing onnx2torch with its dependencies replaces a CPU
    torch by the multi-GB CUDA build. So onnx2torch is installed with --no-deps and, when
    torchvision is absent or unusable, a stub stands in while onnx2torch loads; a model that really
    uses NMS or RoIAlign then fails to convert with a clear message.
    """
    import importlib
    import sys
    import types

    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA torchvision over a CPU torch raises RuntimeError

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("this operator needs torchvision, which is not installed")

        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        for fn in ("nms", "box_convert", "roi_align", "batched_nms"):
            setattr(ops, fn, missing)
        stub.ops = ops  # type: ignore[attr-defined]
        saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
        sys.modules.update({"torchvision": stub, "torchvision.ops": ops})
        try:
            return importlib.import_module("onnx2torch")
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    return importlib.import_module("onnx2torch")


def _register_newer_opsets() -> None:
    """Teach onnx2torch the op versions of recent opsets it lacks (the dynamo exporter emits 18+).

    Only adds what is missing, so a newer onnx2torch's own converters win.
    """
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.node_converters.registry import (
        _CONVERTER_REGISTRY,
        OperationDescription,
        add_converter,
    )
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    def convert(node: Any, graph: Any) -> Any:
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            axes = [int(a) for a in get_const_value(node.input_values[1], graph).tolist()]
        if not axes and node.attributes.get("noop_with_empty_axes", 0):
            raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes")
        return OperationConverterResult(
            torch_module=OnnxReduceStaticAxes(node.operation_type, axes, node.attributes.get("keepdims", 1)),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    def known(op: str, version: int) -> Any:
        return _CONVERTER_REGISTRY.get(OperationDescription(domain="", operation_type=op, version=version))

    for op, version in [(op, 18) for op in _REDUCE_18] + [("ReduceMax", 20), ("ReduceMin", 20)]:
        if known(op, version) is None:
            add_converter(operation_type=op, version=version)(convert)
    for op, version, same_as in _TYPE_ONLY_BUMPS:
        if known(op, version) is None and known(op, same_as) is not None:
            add_converter(operation_type=op, version=version)(known(op, same_as))
    _register_reshape(known, OperationDescription, _CONVERTER_REGISTRY)


def _register_reshape(known: Any, description: Any, registry: Any) -> None:
    """Reshape to a constant shape (what exporters emit), with `allowzero` (the dynamo exporter
    sets it) and opsets 19/21; any other Reshape goes to onnx2torch's own converter."""
    import torch
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    original = known("Reshape", 14)
    if getattr(original, "edgecut_reshape", False):
        return

    class StaticReshape(torch.nn.Module):
        def __init__(self, shape: list[int], allowzero: bool) -> None:
            super().__init__()
            self.shape, self.allowzero = shape, allowzero

        def forward(self, x: Any) -> Any:
            shape = [x.shape[i] if d == 0 and not self.allowzero else d for i, d in enumerate(self.shape)]
            return torch.reshape(x, shape)

    def convert(node: Any, graph: Any) -> Any:
        try:
            shape = [int(d) for d in get_const_value(node.input_values[1], graph).tolist()]
        except KeyError:  # not a constant: onnx2torch's dynamic Reshape (no allowzero)
            return original(node, graph)
        return OperationConverterResult(
            torch_module=StaticReshape(shape, bool(node.attributes.get("allowzero", 0))),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    convert.edgecut_reshape = True  # type: ignore[attr-defined]
    for version in (14, 19, 21):
        registry[description(domain="", operation_type="Reshape", version=version)] = convert


def _default_samples(bundle: Bundle, count: int = 3) -> list[dict[str, np.ndarray]]:
    m = bundle.manifest
    from edgecut.images import photo_feeds, random_feeds

    if m.preprocess.kind == "image" and len(m.inputs) == 1:
        return photo_feeds(m.inputs[0].name, m.preprocess, count)
    rng = np.random.default_rng(0)
    return [random_feeds(m.inputs, rng) for _ in range(count)]


def _segment_inputs(
    bundle: Bundle,
    samples: Sequence[Mapping[str, np.ndarray]],
    last: int,
) -> list[list[dict[str, np.ndarray]]]:
    """For segments 0..last, the feeds each one sees when the model runs on each sample (ORT)."""
    from edgecut.runtime import OrtOptions, make_session

    sessions = [make_session(bundle.path(s.file), OrtOptions()) for s in bundle.manifest.segments[: last + 1]]
    envs = [dict(s) for s in samples]
    per_segment = []
    for seg, sess in zip(bundle.manifest.segments, sessions, strict=False):
        per_segment.append([{k: env[k] for k in seg.inputs} for env in envs])
        names = [o.name for o in sess.get_outputs()]
        for env in envs:
            env.update(zip(names, sess.run(names, {k: env[k] for k in seg.inputs}), strict=True))
    return per_segment


def _convert_one(
    tools: Mapping[str, Any],
    bundle: Bundle,
    seg: Segment,
    feeds: Sequence[Mapping[str, np.ndarray]],
    out: Path,
    tolerance: float,
) -> Conversion:
    from edgecut.runtime import OrtOptions, make_session

    name, t0 = seg.name, time.perf_counter()
    torch = tools["torch"]
    try:
        import onnx

        graph_inputs = [i.name for i in onnx.load(str(bundle.path(seg.file))).graph.input]
        if sorted(graph_inputs) != sorted(seg.inputs):
            raise ValueError(f"graph inputs {graph_inputs} are not the manifest's {seg.inputs}")
        module = tools["onnx2torch"].convert(str(bundle.path(seg.file))).eval()
        args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[0][k][:1])) for k in graph_inputs)
        chatter = io.StringIO()  # the converter prints progress and warnings: to the debug log
        try:
            with (
                torch.no_grad(),
                contextlib.redirect_stdout(chatter),
                contextlib.redirect_stderr(chatter),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                tools["litert_torch"].convert(module, args).export(str(out))
        finally:
            log.debug("converter output for %s:\n%s", seg.file, chatter.getvalue())
    except Exception as exc:  # the converters raise many unrelated types
        return Conversion(name, "failed", None, None, _first_line(exc), round(time.perf_counter() - t0, 2))
    if graph_inputs != list(seg.inputs):  # the tflite takes the graph's order; the runner, ours
        return Conversion(
            name,
            "failed",
            None,
            None,
            f"ONNX input order {graph_inputs} differs from the manifest's",
            round(time.perf_counter() - t0, 2),
        )
    sess = make_session(bundle.path(seg.file), OrtOptions())
    try:
        it = tools["Interpreter"](model_path=str(out))
        it.allocate_tensors()
        diff, scale = 0.0, 0.0
        for feed in feeds:
            want = sess.run(list(seg.outputs), {k: v[:1] for k, v in feed.items()})
            one = {k: v[:1] for k, v in feed.items()}
            got = list(invoke_positional(it, seg.inputs, seg.outputs, one).values())
            for w, g in zip(want, got, strict=True):
                if w.shape != g.shape:
                    raise ValueError(f"output shape {g.shape} differs from ONNX {w.shape}")
                diff = max(diff, float(np.max(np.abs(w.astype(np.float64) - g))))
                scale = max(scale, float(np.max(np.abs(w))))
    except Exception as exc:  # LiteRT raises RuntimeError and ValueError alike
        return Conversion(
            name, "failed", None, None, f"LiteRT run: {_first_line(exc)}", round(time.perf_counter() - t0, 2)
        )
    seconds = round(time.perf_counter() - t0, 2)
    if not math.isfinite(diff) or diff > tolerance * max(1.0, scale):
        return Conversion(
            name, "drift", diff, scale, f"max |Δ| {diff:.3g} > {tolerance:g} × {max(1.0, scale):.3g}", seconds
        )
    return Conversion(name, "ok", diff, scale, "", seconds)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")
