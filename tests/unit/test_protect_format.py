"""The encrypted device copy on a tiny real ONNX model: `partition --encrypt-edge`, bytes that
decrypt to exactly the plaintext segments, ciphertexts bound to their file, errors named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from edgecut.bundle import load_bundle
from edgecut.cli import main
from edgecut.edge.runner import OrtRunner
from edgecut.errors import IntegrityError, UsageError
from edgecut.keys import generate_device_keys, load_device_private
from edgecut.protect import ModelFiles


def _chain_model(path: Path) -> Path:
    """x -> MatMul -> Relu -> MatMul -> Relu: four positions to cut at."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("MatMul", ["b", "w2"], ["c"]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w1, w2],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(plaintext bundle, device copy, device.key) written by one `partition --encrypt-edge`."""
    private, public = generate_device_keys(tmp_path / "dev")
    out = tmp_path / "b"
    args = ["partition", str(_chain_model(tmp_path / "m.onnx")), "-o", str(out), "--all-cuts"]
    assert main([*args, "--encrypt-edge", str(public)]) == 0
    return out, tmp_path / "b.device", private


def test_partition_writes_a_device_copy_that_computes_the_same(pair: tuple[Path, Path, Path]) -> None:
    plain_dir, device_dir, private = pair
    plain, enc = load_bundle(plain_dir), load_bundle(device_dir)
    assert len(plain.manifest.segments) >= 2 and enc.build_sha256 == plain.build_sha256
    files = ModelFiles(enc, load_device_private(private))
    for seg in plain.manifest.segments:
        assert not (device_dir / seg.file).exists()
        assert files.read(seg.file) == plain.path(seg.file).read_bytes()
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 4) - 1.5}
    last = len(plain.manifest.segments) - 1
    ours = OrtRunner(enc, files=files).run(x, 0, last).outputs["y"]
    np.testing.assert_array_equal(ours, OrtRunner(plain).run(x, 0, last).outputs["y"])


def test_a_ciphertext_moved_to_another_file_does_not_open(pair: tuple[Path, Path, Path]) -> None:
    _, device_dir, private = pair
    raw = json.loads((device_dir / "manifest.json").read_text())
    a, b = "segments/seg_001.onnx", "segments/seg_002.onnx"
    entries = raw["encryption"]["files"]
    # swap everything an attacker can swap: stored bytes, their hashes, nonces and tags
    shutil.copyfile(device_dir / f"{a}.enc", device_dir / "tmp")
    shutil.copyfile(device_dir / f"{b}.enc", device_dir / f"{a}.enc")
    shutil.move(device_dir / "tmp", device_dir / f"{b}.enc")
    raw["files"][f"{a}.enc"], raw["files"][f"{b}.enc"] = raw["files"][f"{b}.enc"], raw["files"][f"{a}.enc"]
    for k in ("nonce", "tag", "plain_sha256", "plain_bytes"):
        entries[a][k], entries[b][k] = entries[b][k], entries[a][k]
    (device_dir / "manifest.json").write_text(json.dumps(raw))
    files = ModelFiles(load_bundle(device_dir), load_device_private(private))
    with pytest.raises(IntegrityError, match=r"seg_001\.onnx\.enc: decryption failed"):
        files.read(a)


def test_key_errors_name_the_key(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, device_dir, _ = pair
    enc = load_bundle(device_dir)
    with pytest.raises(UsageError, match="no device key given"):
        ModelFiles(enc)
    other, _ = generate_device_keys(tmp_path / "other")
    with pytest.raises(IntegrityError, match=r"is encrypted for device key [0-9a-f]{16}, not this key"):
        ModelFiles(enc, load_device_private(other))


def test_keys_gen_device_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "gen", "--device", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "device.key").stat().st_mode & 0o077 == 0
    assert main(["keys", "gen", "--device", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: refusing to overwrite existing key files")
