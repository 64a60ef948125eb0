"""Make segments accept any batch size, so the tail service can batch requests from many devices.

Exporters bake batch 1 into the graph: input dims and Reshape targets like [1, 1280]. We relax
dim 0 of every segment input/output to a symbol and rewrite constant Reshape targets that start
with the batch size to 0 ("copy this dim from the input"). That is a heuristic, so it is proven,
not trusted: a batch of samples must give what the samples give one at a time, else the bundle
keeps its static segments and is marked not batchable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from edgecut.runtime import SegmentChain, make_session

log = logging.getLogger(__name__)
BATCH = "N"


def relax_batch(segment: onnx.ModelProto) -> onnx.ModelProto:
    seg = onnx.ModelProto()
    seg.CopyFrom(segment)
    g = seg.graph
    shapes = _static_shapes(g)
    for vi in [*g.input, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = BATCH
    del g.value_info[:]  # intermediate shapes were inferred for batch 1
    consts = _constant_values(g)
    for node in g.node:
        if node.op_type == "Reshape" and node.input[1] in consts:
            target = consts[node.input[1]]
            out_shape = shapes.get(node.output[0])
            if target.ndim == 1 and target.size and target[0] == 1 and out_shape:
                # [-1, rest...] with rest taken from the batch-1 inferred shape: valid under
                # allowzero=1 and when the original target used -1 elsewhere.
                name = f"{node.input[1]}__batched_{node.output[0]}"
                g.initializer.append(numpy_helper.from_array(np.array([-1, *out_shape[1:]], np.int64), name))
                node.input[1] = name
    return seg


def _static_shapes(g: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for vi in [*g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _constant_values(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def batched_if_safe(
    segments: Sequence[onnx.ModelProto], samples: Sequence[Mapping[str, np.ndarray]]
) -> tuple[list[onnx.ModelProto], bool]:
    """Relaxed segments when a batch of samples matches the samples run one at a time."""
    if len(samples) < 2:
        return list(segments), False
    relaxed = [relax_batch(s) for s in segments]
    try:
        single = SegmentChain([make_session(s.SerializeToString()) for s in segments])
        batch = SegmentChain([make_session(s.SerializeToString()) for s in relaxed])
        stacked = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
        got = batch.run(stacked)
        want = [single.run(s) for s in samples]
        ok = all(np.allclose(got[k], np.concatenate([w[k] for w in want]), rtol=1e-4, atol=1e-5) for k in got)
    except Exception as exc:  # any failure means "not batchable", never a failed partition
        log.debug("segments are not batchable: %s", exc)
        return list(segments), False
    return (relaxed, True) if ok else (list(segments), False)
