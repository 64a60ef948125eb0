"""Cut a graph into standalone segment models and prove they compose to the original.

Segment i holds the compute nodes between two kept positions plus every constant node and
initializer they need (replicated, never sent), so each file is a valid ONNX model on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from edgecut.bundle import TensorSpec
from edgecut.errors import VerificationError
from edgecut.partition.graph import Analysis, Position, node_inputs
from edgecut.runtime import SegmentChain, make_session

TOLERANCE = 1e-4  # max |split - unsplit| relative to the output's max magnitude


def build_segment(
    model: onnx.ModelProto, analysis: Analysis, start: Position, end: Position, name: str
) -> onnx.ModelProto:
    nodes = list(analysis.compute[start.index + 1 : end.index + 1])
    available = {t.name for t in start.frontier} | {o for n in nodes for o in n.output}
    needed = {i for n in nodes for i in node_inputs(n)} - available
    constants = _constant_closure(analysis.constant, needed)
    const_inputs = {i for n in constants for i in node_inputs(n)}
    frontier = {t.name for t in (*start.frontier, *end.frontier)}
    initializers = [t for t in model.graph.initializer if t.name in needed | const_inputs]
    graph = helper.make_graph(
        [*constants, *nodes],
        name,
        [_value_info(t) for t in start.frontier],
        [_value_info(t) for t in end.frontier],
        initializer=initializers,
        value_info=[v for v in model.graph.value_info if v.name in available - frontier],
    )
    seg = helper.make_model(
        graph, opset_imports=list(model.opset_import), ir_version=model.ir_version, producer_name="edgecut"
    )
    seg.functions.extend(model.functions)
    return seg


def _constant_closure(
    constant_nodes: Sequence[onnx.NodeProto],
    needed: set[str],
) -> list[onnx.NodeProto]:
    """Constant nodes producing `needed`, with the constant nodes they depend on, in order."""
    wanted = set(needed)
    keep = []
    for node in reversed(constant_nodes):
        if any(o in wanted for o in node.output):
            keep.append(node)
            wanted.update(node_inputs(node))
    return keep[::-1]


def _value_info(t: TensorSpec) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    return helper.make_tensor_value_info(t.name, elem, list(t.shape))


@dataclass(frozen=True)
class Verification:
    samples: int
    max_abs_diff: float
    relative_diff: float
    tolerance: float = TOLERANCE

    def to_json(self) -> dict[str, float | int]:
        return {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "relative_diff": self.relative_diff,
            "tolerance": self.tolerance,
        }


def verify(
    model: onnx.ModelProto, segments: Sequence[onnx.ModelProto], samples: Sequence[Mapping[str, np.ndarray]]
) -> Verification:
    """Run the unsplit model and the chained segments under ORT on the same inputs."""
    full = make_session(model.SerializeToString(), label="the unsplit model")
    chain = SegmentChain([make_session(s.SerializeToString()) for s in segments])
    names = [o.name for o in full.get_outputs()]
    worst_abs, scale = 0.0, 0.0
    for feeds in samples:
        ref = dict(zip(names, full.run(names, dict(feeds)), strict=True))
        got = chain.run(feeds)
        for name in names:
            worst_abs = max(worst_abs, float(np.max(np.abs(got[name] - ref[name]), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(ref[name]), initial=0.0)))
    result = Verification(len(samples), worst_abs, worst_abs / max(scale, 1e-12))
    if result.relative_diff > TOLERANCE:
        raise VerificationError(
            f"chained segments differ from the unsplit model by {result.max_abs_diff:.3g} "
            f"({result.relative_diff:.3g} of the output scale, tolerance {TOLERANCE:g})"
        )
    return result
