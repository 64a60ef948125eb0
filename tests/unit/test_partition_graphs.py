"""The split invariant on synthetic DAGs: tail(head(x)) == full(x) at every cut.

Residual, inception and dense blocks give frontiers of several tensors when cut in the middle;
constant-producing subgraphs and initializers listed as inputs must never cross a cut.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgecut.bundle import load_bundle
from edgecut.partition.build import partition
from edgecut.partition.graph import analyse
from edgecut.partition.load import export_torch, load_model
from edgecut.runtime import SegmentChain, make_session


class Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return (x + self.b(torch.relu(self.a(x)))).mean(dim=(2, 3))


class Inception(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b1 = torch.nn.Conv2d(8, 4, 1)
        self.b3 = torch.nn.Conv2d(8, 4, 3, padding=1)
        self.b5 = torch.nn.Conv2d(8, 4, 5, padding=2)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b3(x), torch.max_pool2d(self.b5(x), 3, 1, 1)], dim=1)
        return self.head(torch.relu(y).mean(dim=(2, 3)))


class Dense(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.layers = torch.nn.ModuleList(torch.nn.Conv2d(4 * (i + 1), 4, 3, padding=1) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [torch.relu(self.stem(x))]
        for layer in self.layers:
            feats.append(torch.relu(layer(torch.cat(feats, dim=1))))
        return torch.cat(feats, dim=1).flatten(1)


def _save_torch(module: torch.nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    module.eval()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    onnx.save(export_torch(module, (torch.randn(1, 3, 16, 16),), "t"), str(path))
    return path


def _check_every_cut(model_path: Path, out: Path, **kw: object) -> None:
    """Partition keeping every position and check each split against the full model."""
    loaded = load_model(str(model_path), **kw)  # type: ignore[arg-type]
    bundle = partition(loaded, out, max_cuts=10_000, mode="all")
    m = bundle.manifest
    full = make_session(loaded.model.SerializeToString())
    rng = np.random.default_rng(1)
    feeds = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in m.inputs}
    ref = full.run(None, feeds)
    for cut in m.cuts:
        head = SegmentChain.from_files([bundle.path(s.file) for s in m.head(cut.id)])
        tail = SegmentChain.from_files([bundle.path(s.file) for s in m.tail(cut.id)])
        mid = head.run(feeds) if m.head(cut.id) else feeds
        assert sorted(mid) == sorted(t.name for t in cut.frontier), cut.id
        for t in cut.frontier:
            assert mid[t.name].shape == t.shape and str(mid[t.name].dtype) == t.dtype
        out_t = tail.run(mid) if m.tail(cut.id) else mid
        got = [out_t[o.name] for o in m.outputs]
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=cut.id)
    assert load_bundle(out).manifest == m


@pytest.mark.parametrize("cls", [Residual, Inception, Dense])
def test_every_cut_composes_and_multi_tensor_frontiers_exist(cls: type, tmp_path: Path) -> None:
    path = _save_torch(cls(), tmp_path / "m.onnx")
    _check_every_cut(path, tmp_path / "b")
    widest = max(len(p.frontier) for p in analyse(load_model(str(path)).model).positions)
    assert widest >= 2  # the cut in the middle of the block carries several tensors


def _const_model(path: Path, initializers_as_inputs: bool) -> Path:
    """x[1,4] → Add(ConstantOfShape(Shape(x)) filled 1) → MatMul W (weights from Constant)."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 10, "w_init")
    bias = numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "bias")
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node(
            "ConstantOfShape", ["xs"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))
        ),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2))),
        helper.make_node("Mul", ["w_init", "two"], ["w2"]),
        helper.make_node("Add", ["x", "ones"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "bias"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    if initializers_as_inputs:
        inputs += [
            helper.make_tensor_value_info("w_init", TensorProto.FLOAT, [4, 4]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 4]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("old_style", [False, True])
def test_constants_never_cross_a_cut(tmp_path: Path, old_style: bool) -> None:
    path = _const_model(tmp_path / "c.onnx", old_style)
    analysis = analyse(load_model(str(path)).model)
    crossing = {t.name for p in analysis.positions for t in p.frontier}
    assert crossing <= {"x", "h1", "h2", "h3", "y"}
    assert [s.name for s in analysis.inputs] == ["x"]
    _check_every_cut(path, tmp_path / "b")


FACTORY = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).mean(dim=(2, 3)))

def make():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(1, 3, 8, 8)
"""


def test_torch_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "userpkg_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("userpkg_factory:make")
    assert loaded.name == "make"
    bundle = partition(loaded, tmp_path / "b")
    assert bundle.manifest.inputs[0].shape == (1, 3, 8, 8)
    assert bundle.manifest.verification["relative_diff"] <= 1e-4


def test_external_data_model(tmp_path: Path) -> None:
    """Weights stored beside the graph (as large models are) load and segment normally."""
    path = _save_torch(Residual(), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.save(
        model,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1000
    _check_every_cut(tmp_path / "ext.onnx", tmp_path / "b")
