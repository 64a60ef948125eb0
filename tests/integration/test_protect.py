"""Encrypted device copies: they run end to end without a plaintext model file on disk, and a
wrong key or a tampered ciphertext is refused with one `error:` line naming what is wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecut.bundle import load_bundle
from edgecut.cli import main
from edgecut.edge.agent import image_input
from edgecut.edge.runner import OrtRunner
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import prepare, sample_photos
from edgecut.keys import KeyPaths, generate_device_keys, key_id, load_device_public

_WATCH: dict[str, Any] = {"on": False, "opened": []}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Records every Python-level open() of a model file while a test watches."""
    if _WATCH["on"] and event == "open" and isinstance(args[0], str | bytes | Path):
        name = str(args[0])
        if name.endswith((".onnx", ".tflite")):
            _WATCH["opened"].append(name)


sys.addaudithook(_audit)  # audit hooks cannot be removed; it is inert unless a test turns it on


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_device_keys(tmp_path_factory.mktemp("device"))


@pytest.fixture(scope="module")
def protected(
    effl0_bundle: Path, device: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("protected") / "effl0.device"
    code = main(["bundle", "protect", str(effl0_bundle), "--device-key", str(device[1]), "-o", str(out)])
    assert code == 0
    return out


def model_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.suffix in (".onnx", ".tflite")}


def test_device_copy_holds_only_ciphertext_and_keeps_the_build_identity(
    effl0_bundle: Path, protected: Path, device: tuple[Path, Path]
) -> None:
    plain, enc = load_bundle(effl0_bundle), load_bundle(protected)
    assert model_files(protected) == set()
    assert enc.build_sha256 == plain.build_sha256 and enc.manifest_sha256 != plain.manifest_sha256
    section = enc.manifest.encryption
    assert section["key_id"] == key_id(load_device_public(device[1]))
    for seg in plain.manifest.segments:
        stored = protected / section["files"][seg.file]["stored"]
        body = stored.read_bytes()
        assert body != plain.path(seg.file).read_bytes()[: len(body)]
        assert enc.manifest.files[str(stored.relative_to(protected))] == hashlib.sha256(body).hexdigest()


def test_encrypted_bundle_runs_end_to_end_without_plaintext_on_disk(
    effl0_bundle: Path,
    protected: Path,
    device: tuple[Path, Path],
    keys: KeyPaths,
    tail_server: Any,
    bundles_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photos = sample_photos()
    plain = load_bundle(effl0_bundle)
    m, runner = plain.manifest, OrtRunner(plain)
    last = len(m.segments) - 1
    reference = [
        int(
            np.argmax(
                runner.run({m.inputs[0].name: prepare(im, m.preprocess)}, 0, last).outputs[m.outputs[0].name]
            )
        )
        for _, im in photos
    ]
    # A private temp dir for this process (Python's tempfile and native code via $TMPDIR): the
    # machine's /tmp is shared with other jobs writing their own .onnx files.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    scanned = [protected, private_tmp]
    before = {root: model_files(root) for root in scanned}
    config = EdgeConfig(
        bundle=protected,
        server_key=keys.service_pub,
        cut="c06",
        codec="int8",
        threads=1,
        device_key=device[0],
    )
    results: list[Any] = []
    _WATCH["opened"].clear()
    _WATCH["on"] = True
    try:
        with tail_server() as server:  # the tail serves the plaintext original (bundles_dir)
            cfg = dataclasses.replace(config, server=f"127.0.0.1:{server.port}")
            with start_agent(cfg) as agent:
                agent.run([image_input(i, n, im) for i, (n, im) in enumerate(photos)], results.append)
    finally:
        _WATCH["on"] = False
    # The tail service runs in this process too and reads its own plaintext copy; nothing else.
    assert [p for p in _WATCH["opened"] if not Path(p).is_relative_to(bundles_dir)] == []
    assert {root: model_files(root) for root in scanned} == before
    assert sorted(r.position for r in results) == list(range(len(photos)))
    assert {r.where for r in results} == {"cloud"}
    assert [r.top5[0][0] for r in sorted(results, key=lambda r: r.position)] == reference


def _edge_only(bundle: Path, device_key: Path, photo: Path) -> list[str]:
    return [
        "edge", "run", "--bundle", str(bundle), "--cut", "output", "--source", str(photo),
        "--device-key", str(device_key),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(sample_photos()[0][1]).save(path)
    return path


def test_edge_only_run_of_the_device_copy(
    protected: Path, device: tuple[Path, Path], photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_edge_only(protected, device[0], photo), "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["where"] == "local"


def test_wrong_or_missing_device_key_is_one_error_line(
    protected: Path, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other, _ = generate_device_keys(tmp_path / "other")
    assert main(_edge_only(protected, other, photo)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: bundle 'efficientnet-lite0:1' is encrypted for device key ")
    assert "not this key" in err[0] and all(not x.startswith("error") for x in err[1:])
    args = _edge_only(protected, other, photo)
    assert main(args[: args.index("--device-key")]) == 2
    assert "no device key given" in capsys.readouterr().err.splitlines()[0]


def test_tampered_ciphertext_is_refused_naming_the_file(
    protected: Path,
    device: tuple[Path, Path],
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(protected, copy)
    rel = "segments/seg_003.onnx.enc"
    data = bytearray((copy / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / rel).write_bytes(bytes(data))
    assert main(_edge_only(copy, device[0], photo)) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert rel in line and "sha256 mismatch" in line
    # An attacker who also rewrites the (unsigned) manifest's hash still meets the AEAD tag.
    raw = json.loads((copy / "manifest.json").read_text())
    raw["files"][rel] = hashlib.sha256(bytes(data)).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert main(_edge_only(copy, device[0], photo)) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert line.startswith(
        "error: bundle 'efficientnet-lite0:1' segments/seg_003.onnx.enc: decryption failed"
    )


def test_protect_refuses_an_encrypted_bundle_and_a_service_key(
    protected: Path,
    device: tuple[Path, Path],
    keys: KeyPaths,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        ["bundle", "protect", str(protected), "--device-key", str(device[1]), "-o", str(tmp_path / "x")]
    )
    assert code == 2 and "already encrypted" in capsys.readouterr().err
    code = main(
        [
            "bundle",
            "protect",
            str(protected),
            "--device-key",
            str(keys.signing_pub),
            "-o",
            str(tmp_path / "y"),
        ]
    )
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert code == 1 and "expected a device public key (device.pub)" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_signed_device_copy_verifies(
    effl0_bundle: Path, device: tuple[Path, Path], keys: KeyPaths, tmp_path: Path
) -> None:
    from edgecut.keys import load_signing_public

    out = tmp_path / "signed.device"
    args = ["bundle", "protect", str(effl0_bundle), "--device-key", str(device[1]), "-o", str(out)]
    assert main([*args, "--sign", str(keys.signing_key)]) == 0
    assert load_bundle(out, public_key=load_signing_public(keys.signing_pub), require_signature=True).signed
