"""Where a graph can be cut: topological positions and the tensors crossing each one.

After position p (the first p+1 compute nodes run on the edge) the *frontier* is every non-constant
tensor produced at or before p and consumed after p (or returned by the model). Constant tensors —
initializers, Constant nodes and anything computed only from them, including shape arithmetic
on statically shaped tensors — never cross a cut: the segments that need them recompute them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecut.bundle import DTYPES, TensorSpec
from edgecut.errors import PartitionError


@dataclass(frozen=True)
class Position:
    """One candidate cut: after compute node `index` (-1 = before any node)."""

    index: int
    frontier: tuple[TensorSpec, ...]

    @property
    def bytes_fp32(self) -> int:
        return sum(t.numel * 4 for t in self.frontier)


@dataclass(frozen=True)
class Analysis:
    """The graph split into compute nodes (in order) and constant nodes (replicated as needed)."""

    compute: tuple[onnx.NodeProto, ...]
    constant: tuple[onnx.NodeProto, ...]
    specs: dict[str, TensorSpec]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    positions: tuple[Position, ...]  # one per compute node boundary, from -1 (input) onwards


def node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Inputs of a node including names its subgraphs capture from the outer scope."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input}
            inner |= {t.name for t in g.initializer}
            for n in g.node:
                yield from (i for i in node_inputs(n) if i not in inner)


def analyse(model: onnx.ModelProto) -> Analysis:
    graph = model.graph
    specs = _tensor_specs(model)
    initializers = {t.name for t in graph.initializer}
    real_inputs = [i.name for i in graph.input if i.name not in initializers]
    constant_names = set(initializers)
    compute: list[onnx.NodeProto] = []
    constant: list[onnx.NodeProto] = []
    for node in graph.node:
        if all(i in constant_names for i in node_inputs(node)) and not _is_random(node):
            constant.append(node)
            constant_names.update(o for o in node.output if o)
        else:
            compute.append(node)
    inputs = tuple(_need(specs, n) for n in real_inputs)
    outputs = tuple(_need(specs, o.name) for o in graph.output)
    positions = _positions(compute, real_inputs, [o.name for o in graph.output], specs)
    return Analysis(tuple(compute), tuple(constant), specs, inputs, outputs, positions)


def _is_random(node: onnx.NodeProto) -> bool:
    return node.op_type.startswith("Random") or node.op_type == "Multinomial"


def _positions(
    compute: list[onnx.NodeProto], inputs: list[str], outputs: list[str], specs: dict[str, TensorSpec]
) -> tuple[Position, ...]:
    produced_at = {name: -1 for name in inputs}
    last_use: dict[str, int] = {}
    for i, node in enumerate(compute):
        for name in node_inputs(node):
            last_use[name] = i
        for name in node.output:
            if name:
                produced_at[name] = i
    for name in outputs:
        last_use[name] = len(compute)  # a model output must reach the end, wherever it is made
    live: list[str] = []
    result = []
    for p in range(-1, len(compute)):
        if p >= 0:
            live.extend(o for o in compute[p].output if o in last_use)
        live = [t for t in live if last_use.get(t, -2) > p] if p >= 0 else list(inputs)
        result.append(Position(p, tuple(_need(specs, t) for t in live)))
    return tuple(result)


def _need(specs: dict[str, TensorSpec], name: str) -> TensorSpec:
    try:
        return specs[name]
    except KeyError:
        raise PartitionError(
            f"tensor '{name}' has no static shape or type after shape inference; "
            "pass --input-shape, or the graph uses an op shape inference does not know"
        ) from None


def _tensor_specs(model: onnx.ModelProto) -> dict[str, TensorSpec]:
    specs = {}
    g = model.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        spec = _spec_of(vi)
        if spec is not None:
            specs[vi.name] = spec
    return specs


def _spec_of(vi: onnx.ValueInfoProto) -> TensorSpec | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
    if any(d <= 0 for d in dims):
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    if dtype not in DTYPES:
        return None
    return TensorSpec(vi.name, tuple(dims), dtype)


def fold_static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace Shape/Size of statically shaped tensors by constants.

    Exporters emit shape arithmetic (Shape → Gather → Concat → Reshape) even when every shape is
    known; left alone, those small int64 tensors would look like activations crossing a cut.
    """
    specs = _tensor_specs(model)
    nodes = []
    for node in model.graph.node:
        folded = _fold(node, specs)
        nodes.append(folded if folded is not None else node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _fold(node: onnx.NodeProto, specs: dict[str, TensorSpec]) -> onnx.NodeProto | None:
    if node.op_type not in ("Shape", "Size") or node.input[0] not in specs:
        return None
    shape = specs[node.input[0]].shape
    if node.op_type == "Size":
        value = np.array(int(np.prod(shape)), dtype=np.int64)
    else:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        value = np.array(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], np.int64)
    tensor = numpy_helper.from_array(value, name=node.output[0])
    return helper.make_node("Constant", [], [node.output[0]], value=tensor, name=node.name)
