"""Open Inference Protocol tensors ↔ numpy, and what a bundle input accepts besides its own dtype.

A request tensor arrives as raw little-endian bytes (`raw_input_contents`) or typed contents; both
are checked against their declared datatype and shape before any array is made. Then it must fit
the served input (`to_bundle`): its own dtype always; for a float input also FP16 (widened
exactly); for the whole model's image input UINT8 pixels (in the model's layout and channel order,
normalized here with the bundle's mean/std, as the edge's JPEG path does); and for a float frontier
INT8/UINT8 with a `scale` (and optional `zero_point`) tensor parameter: x = scale·(q − zero_point).
Anything else is INVALID_ARGUMENT naming what the input takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgecut.bundle import Preprocess, TensorSpec
from edgecut.errors import CodecError

DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(t).newbyteorder("<")
    for name, t in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
# Which typed-contents field carries each datatype (FP16 has none: raw only, per the protocol).
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The protocol's name for a numpy dtype (`float32` → `FP32`)."""
    want = np.dtype(dtype).newbyteorder("<")
    for name, t in DATATYPES.items():
        if t == want:
            return name
    raise CodecError(f"dtype {dtype} has no Open Inference Protocol datatype")


def read_tensor(tensor: Any, raw: bytes | None, max_bytes: int) -> np.ndarray:
    """One `InferInputTensor` (with its raw bytes, if the request used raw contents) as an array."""
    name, datatype = tensor.name, tensor.datatype
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        known = ", ".join(DATATYPES)
        raise CodecError(f"input {name!r}: datatype {datatype!r} is not supported (use {known})")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count * dtype.itemsize > max_bytes:
        raise CodecError(f"input {name!r}: shape {list(shape)} is larger than this server accepts")
    if raw is not None:
        if tensor.HasField("contents"):
            raise CodecError(f"input {name!r}: both raw_input_contents and typed contents")
        if len(raw) != count * dtype.itemsize:
            raise CodecError(
                f"input {name!r}: {len(raw)} raw bytes where {datatype} {list(shape)} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    field = _TYPED_FIELD.get(datatype)
    if field is None:
        raise CodecError(f"input {name!r}: {datatype} has no typed contents; send raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        got = f"{len(values)} {field}"
        raise CodecError(f"input {name!r}: {got} where {datatype} {list(shape)} needs {count}")
    wide = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise CodecError(f"input {name!r}: {field} out of range for {datatype}")
    return wide.astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def read_inputs(request: Any, max_bytes: int) -> dict[str, np.ndarray]:
    """Every input of a `ModelInferRequest`, by name."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise CodecError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise CodecError(f"input {tensor.name!r} given twice")
        out[tensor.name] = read_tensor(tensor, raw[k] if raw else None, max_bytes)
    return out


def accepted(spec: TensorSpec, image_input: bool) -> list[str]:
    """The datatypes a served input takes, its own first."""
    own = datatype_of(spec.dtype)
    if np.dtype(spec.dtype).kind != "f":
        return [own]
    return [own, "FP16", "UINT8"] if image_input else [own, "FP16", "INT8 (scale)", "UINT8 (scale)"]


def to_bundle(
    x: np.ndarray,
    spec: TensorSpec,
    params: Mapping[str, Any],
    preprocess: Preprocess | None,
) -> np.ndarray:
    """`x` as the dtype the bundle takes; `preprocess` is given for the whole model's image input."""
    want = np.dtype(spec.dtype)
    if x.dtype == want:
        return x
    if want.kind == "f" and x.dtype == np.float16:
        return x.astype(want)
    if want.kind == "f" and x.dtype == np.uint8 and preprocess is not None:
        return _normalize(x, preprocess).astype(want)
    if want.kind == "f" and x.dtype in (np.int8, np.uint8) and preprocess is None and "scale" in params:
        scale, zero = float(params["scale"]), float(params.get("zero_point", 0.0))
        if not (math.isfinite(scale) and math.isfinite(zero)):
            raise CodecError(f"input {spec.name!r}: scale and zero_point must be finite")
        return (scale * (x.astype(np.float32) - zero)).astype(want)
    takes = ", ".join(accepted(spec, preprocess is not None))
    raise CodecError(f"input {spec.name!r}: datatype {datatype_of(x.dtype)} where it takes {takes}")


def _normalize(x: np.ndarray, pre: Preprocess) -> np.ndarray:
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW" and x.ndim == 4:
        mean, std = mean[:, None, None], std[:, None, None]
    return (x.astype(np.float32) - mean) / std


def param_value(p: Any) -> Any:
    """An `InferParameter`'s value, whichever of its oneof fields is set."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def write_outputs(
    response: Any, outputs: Mapping[str, np.ndarray], names: Sequence[str], tensor_type: Any
) -> None:
    """Fill a `ModelInferResponse` with `names` of `outputs`, as raw little-endian bytes."""
    for name in names:
        y = np.ascontiguousarray(outputs[name])
        dtype = y.dtype.newbyteorder("<")
        response.outputs.append(tensor_type(name=name, datatype=datatype_of(dtype), shape=list(y.shape)))
        response.raw_output_contents.append(y.astype(dtype, copy=False).tobytes())
