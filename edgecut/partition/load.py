"""Turn whatever the user has — an .onnx file, a built-in name, a torch factory — into one static,
shape-inferred ONNX graph. Every later step can then assume known shapes and no dynamic dims."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from edgecut.bundle import Preprocess, TensorSpec
from edgecut.errors import ModelLoadError, UsageError
from edgecut.partition.builtin import EFFICIENTNET_LITE, TorchModel, load_builtin
from edgecut.partition.graph import fold_static_shapes
from edgecut.partition.preprocessing import Declared, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: onnx.ModelProto  # static shapes everywhere, shape-inferred, shape arithmetic folded
    name: str
    version: str
    preprocess: Preprocess
    labels: list[str] | None


def parse_shape(text: str) -> tuple[int, ...]:
    """ "1x3x224x224" → (1, 3, 224, 224)."""
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"--input-shape '{text}' is not like 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape '{text}': every dimension must be a positive integer")
    return dims


def load_model(
    source: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    name: str | None = None,
    version: str = "1",
    preprocess: Declared | None = None,
) -> LoadedModel:
    """Load `source`; `preprocess` (from `--preprocess`) replaces the model's own, checked against
    its input (a built-in brings its own; an .onnx file or factory has none without it)."""
    loaded = _load(source, input_shape, name, version)
    if preprocess is None:
        return loaded
    return replace(loaded, preprocess=resolve(preprocess, _only_input(loaded), loaded.name))


def _load(source: str, input_shape: tuple[int, ...] | None, name: str | None, version: str) -> LoadedModel:
    if source in EFFICIENTNET_LITE:
        if input_shape is not None:
            raise UsageError(f"--input-shape is for .onnx files; built-in '{source}' has a fixed input")
        return _from_torch(replace(load_builtin(source), name=name or source, version=version))
    if source.endswith(".onnx") or Path(source).is_file():
        model = _read_onnx(Path(source))
        label = name or Path(source).stem
        return LoadedModel(_static(model, input_shape, label), label, version, Preprocess("none"), None)
    if ":" in source:
        return _from_torch(_factory(source, name, version))
    raise UsageError(
        f"'{source}' is not an .onnx file, a built-in model ({', '.join(EFFICIENTNET_LITE)}) "
        "or a torch factory 'package.module:function'"
    )


def _only_input(loaded: LoadedModel) -> TensorSpec:
    """The model's one graph input; image preprocessing feeds exactly one."""
    inputs = list(loaded.model.graph.input)
    if len(inputs) != 1:
        raise UsageError(f"--preprocess needs a model with one input; '{loaded.name}' has {len(inputs)}")
    vi = inputs[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
    shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
    return TensorSpec(vi.name, shape, dtype)


def _read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise UsageError(f"model file '{path}' does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"'{path}' is not a valid ONNX model (truncated or another format): {_first_line(exc)}"
        ) from exc
    external = sorted({ExternalDataInfo(t).location for t in _tensors(model.graph) if uses_external_data(t)})
    missing = [name for name in external if not (path.parent / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"'{path}' keeps its weights in {', '.join(missing)}, which is not beside it",
            hint="copy the .onnx and its external data file(s) together, into one directory",
        )
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"'{path}': cannot read its external data: {_first_line(exc)}") from exc
    return model


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and constant tensors, subgraphs included: wherever external data can hide."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else [])
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _tensors(sub)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _static(
    model: onnx.ModelProto,
    input_shape: tuple[int, ...] | None,
    label: str,
) -> onnx.ModelProto:
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    # Old exporters list initializers among graph inputs; they are weights, not inputs.
    real = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(real)
    if model.ir_version < 4:
        model.ir_version = 4
    for vi in graph.input:
        _fix_dims(vi, input_shape, label, len(real))
    for _ in range(2):
        model = _infer(model, label)
        model = fold_static_shapes(model)
    return _infer(model, label)


def _fix_dims(vi: onnx.ValueInfoProto, shape: tuple[int, ...] | None, label: str, n: int) -> None:
    dims = vi.type.tensor_type.shape.dim
    dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
    if not dynamic and shape is None:
        return
    if shape is None:
        raise UsageError(
            f"model '{label}' input '{vi.name}' has dynamic dimensions; "
            "pass --input-shape, e.g. --input-shape 1x3x224x224"
        )
    if n != 1:
        raise UsageError(f"model '{label}' has {n} inputs; --input-shape supports one input")
    if len(shape) != len(dims):
        raise UsageError(f"--input-shape has {len(shape)} dims, input '{vi.name}' has {len(dims)}")
    for d, value in zip(dims, shape, strict=True):
        d.Clear()
        d.dim_value = value


def _infer(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model '{label}': shape inference failed: {first}") from exc


def _factory(spec: str, name: str | None, version: str) -> TorchModel:
    mod_name, _, fn_name = spec.partition(":")
    # `python -m` puts the working directory on the path but the `edgecut` script does not, so a
    # factory module beside the user would need PYTHONPATH=. without this
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(
            f"cannot import factory '{spec}': {exc}",
            hint="the module must be importable from this directory or from PYTHONPATH",
        ) from exc
    made = fn()
    module, example = made if isinstance(made, tuple) else (made, None)
    if example is None:
        raise UsageError(f"factory '{spec}' must return (torch.nn.Module, example_input)")
    module.eval()
    example = example if isinstance(example, tuple) else (example,)
    return TorchModel(module, example, name or fn_name, version, Preprocess("none"), None)


def _from_torch(tm: TorchModel) -> LoadedModel:
    model = export_torch(tm.module, tm.example, tm.name)
    return LoadedModel(_static(model, None, tm.name), tm.name, tm.version, tm.preprocess, tm.labels)


def export_torch(module: Any, example: tuple[Any, ...], label: str) -> onnx.ModelProto:
    """Export with the dynamo exporter (clean graphs); its chatter goes to the debug log."""
    import torch

    chatter = io.StringIO()
    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, example, dynamo=True, verbose=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ModelLoadError(f"torch model '{label}' failed to export to ONNX: {exc}") from exc
    finally:
        torch_log.setLevel(level)
        log.debug("exporter output for %s:\n%s", label, chatter.getvalue())
    if program is None:
        raise ModelLoadError(f"torch model '{label}' exported to nothing")
    return _reproducible(program.model_proto)


def _reproducible(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop exporter stack traces: they hold absolute paths, so hashes would differ per venv."""
    for node in model.graph.node:
        node.doc_string = ""
        keep = [p for p in node.metadata_props if "stack_trace" not in p.key]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return model
