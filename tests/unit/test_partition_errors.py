"""Every bad input to `edgecut partition` / `inspect` gets one clear line and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecut.cli import main


def _tiny(path: Path, batch: int | str = 1, op: str = "Relu", domain: str = "") -> Path:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node(op, ["h"], ["y"], domain=domain)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        initializer=[w],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_good_onnx_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny(tmp_path / "m.onnx")
    assert main(["partition", str(model), "-o", str(tmp_path / "b")]) == 0
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "input" in out and "output" in out


@pytest.mark.parametrize(
    ("make", "extra", "code", "needle"),
    [
        (lambda p: p / "missing.onnx", [], 2, "does not exist"),
        (
            lambda p: (p / "t.onnx").write_bytes(b"hello, not a model") and p / "t.onnx",
            [],
            1,
            "not a valid ONNX model",
        ),
        (lambda p: _tiny(p / "dyn.onnx", batch="N"), [], 2, "--input-shape"),
        (lambda p: _tiny(p / "op.onnx", op="Frobnicate"), [], 1, "No Op registered for Frobnicate"),
        (
            lambda p: _tiny(p / "op.onnx", op="Frobnicate", domain="com.example"),
            [],
            1,
            "com.example:Frobnicate(-1) is not a registered",
        ),
        (lambda p: _tiny(p / "m.onnx"), ["--max-cuts", "0"], 2, "--max-cuts"),
        (lambda p: _tiny(p / "m.onnx"), ["--input-shape", "1xax4"], 2, "--input-shape"),
        (lambda p: p / "no_such_module_x:fn", [], 2, "cannot import factory"),
    ],
)
def test_bad_input_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make,
    extra,  # type: ignore[no-untyped-def]
    code: int,
    needle: str,
) -> None:
    src = make(tmp_path)
    source = src.name if ":" in src.name else str(src)
    got, err = _run(capsys, "partition", source, "-o", str(tmp_path / "out"), *extra)
    assert got == code, err
    assert err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp left


def test_truncated_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _tiny(tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    code, err = _run(capsys, "partition", str(tmp_path / "cut.onnx"), "-o", str(tmp_path / "o"))
    assert code == 1 and "not a valid ONNX model" in err


def test_dynamic_dims_with_input_shape(tmp_path: Path) -> None:
    model = _tiny(tmp_path / "dyn.onnx", batch="N")
    assert main(["partition", str(model), "-o", str(tmp_path / "b"), "--input-shape", "1x4"]) == 0


def test_existing_output_refused_unless_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny(tmp_path / "m.onnx")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    code, err = _run(capsys, "partition", str(model), "-o", str(tmp_path / "b"))
    assert code == 2 and "--force" in err
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"
    assert main(["partition", str(model), "-o", str(tmp_path / "b"), "--force"]) == 0
    assert not (tmp_path / "b" / "keep.txt").exists()


def test_tampered_segment_and_signature(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny(tmp_path / "m.onnx")
    assert main(["keys", "gen", "--out", str(tmp_path / "k")]) == 0
    key = tmp_path / "k"
    assert main(["partition", str(model), "-o", str(tmp_path / "b"), "--sign", str(key / "signing.key")]) == 0
    assert main(["inspect", str(tmp_path / "b"), "--key", str(key / "signing.pub")]) == 0
    capsys.readouterr()
    manifest = tmp_path / "b" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": "1"', '"version": "2"'))
    code, err = _run(capsys, "inspect", str(tmp_path / "b"), "--key", str(key / "signing.pub"))
    assert code == 1 and "signature does not verify" in err
    manifest.write_text(manifest.read_text().replace('"version": "2"', '"version": "1"'))
    seg = next((tmp_path / "b" / "segments").iterdir())
    seg.write_bytes(seg.read_bytes() + b"\0")
    code, err = _run(capsys, "inspect", str(tmp_path / "b"))
    assert code == 1 and f"segments/{seg.name}: sha256 mismatch" in err
