"""A user's own model, with preprocessing declared at partition time, gets what the built-ins get:
calibration on photos, fidelity rows with the JPEG baseline, photo sources on the edge and in the
cloud. Also the built-in EfficientNet-Lite2 and `--name` / `--model-version` for built-ins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from support import running_server, serve_config

from edgecut.bundle import Preprocess, load_bundle
from edgecut.cli import main
from edgecut.images import prepare, resize_crop, sample_photos
from edgecut.keys import KeyPaths
from edgecut.partition.load import export_torch
from edgecut.runtime import make_session

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class SmallNet(torch.nn.Module):
    """A small CNN classifier over 64x64 photos: 20 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = SmallNet().eval()
    path = tmp_path_factory.mktemp("model") / "small.onnx"
    onnx.save(export_torch(net, (torch.randn(1, 3, 64, 64),), "small"), str(path))
    return path


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for name, image in sample_photos():
        Image.fromarray(image).save(d / f"{name}.jpg", quality=92)
    return d


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    root = tmp_path_factory.mktemp("served")
    argv = ["partition", str(model_file), "-o", str(root / "small"), "--input-shape", "1x3x64x64"]
    assert main([*argv, "--preprocess", "imagenet", "--calibrate", "builtin", "--name", "small"]) == 0
    return root


def torchvision_style(image: np.ndarray) -> np.ndarray:
    """What a torchvision user writes: resize + center crop, /255, mean/std, CHW."""
    x = (resize_crop(image, (64, 64)).astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)[None]


def test_imagenet_preset_is_stored_and_means_what_torchvision_means(bundles: Path) -> None:
    m = load_bundle(bundles / "small").manifest
    pre = m.preprocess
    assert (pre.kind, pre.preset, pre.size, pre.layout, pre.color, pre.resize) == (
        "image",
        "imagenet",
        (64, 64),
        "NCHW",
        "RGB",
        "crop",
    )
    for _, image in sample_photos()[:3]:
        np.testing.assert_allclose(prepare(image, pre), torchvision_style(image), atol=1e-5)


def test_calibration_and_fidelity_work_on_a_user_model(bundles: Path) -> None:
    m = load_bundle(bundles / "small").manifest
    assert set(m.calibration) == {c.id for c in m.cuts[:-1]}
    rows = {(r["cut"], r["codec"]) for r in m.fidelity}
    assert ("input", "jpeg90") in rows  # the image baseline exists for this model too
    assert any(cut not in ("input", "output") for cut, _ in rows)


def test_edge_runs_a_photo_directory_locally_and_through_the_cloud(
    bundles: Path, photo_dir: Path, model_file: Path, keys: KeyPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = bundles / "small"
    m = load_bundle(bundle).manifest
    full = make_session(model_file.read_bytes())
    expected = {}
    for path in sorted(photo_dir.iterdir()):
        image = np.asarray(Image.open(path).convert("RGB"))
        expected[path.name] = int(np.argmax(full.run(None, {m.inputs[0].name: torchvision_style(image)})[0]))
    inner = m.cuts[len(m.cuts) // 2].id
    capsys.readouterr()
    base = ["edge", "run", "--bundle", str(bundle), "--source", str(photo_dir), "--json", "--threads", "1"]
    assert main([*base, "--cut", "output"]) == 0
    with running_server(serve_config(bundles, keys)) as server:
        cloud = ["--server", f"127.0.0.1:{server.port}", "--server-key", str(keys.service_pub)]
        assert main([*base, *cloud, "--cut", inner, "--codec", "int8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 * len(expected)
    assert {x["where"] for x in lines} == {"local", "cloud"} and not any(x["error"] for x in lines)
    local = [x for x in lines if x["where"] == "local"]
    assert all(x["top5"][0]["index"] == expected[Path(x["input"]).name] for x in local)
    agree = np.mean([x["top5"][0]["index"] == expected[Path(x["input"]).name] for x in lines])
    assert agree >= 0.85, agree  # int8 on a random-weight net: near-ties may flip


def test_sweep_runs_on_a_user_model(
    bundles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, profile = str(bundles / "small"), str(tmp_path / "edge.json")
    assert main(["profile", bundle, "--out", profile, "--runs", "3", "--threads", "1"]) == 0
    capsys.readouterr()
    argv = ["bench", "sweep", bundle, "--edge-profile", profile, "--quick", "--out", str(tmp_path / "s")]
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "s" / "results.json").read_text())["measurements"]
    cells = {(r["role"], r["cut"], r["codec"]) for r in rows}
    assert ("grid", "input", "jpeg90") in cells and ("grid", "output", "none") in cells
    assert all(r["where"] != "failed" for r in rows)


@pytest.mark.parametrize(
    ("preprocess", "needle"),
    [
        ("nope", "unknown preset 'nope'"),
        ("imagenet,size=224", "size=224x224 does not match"),
        ("imagenet,layout=NHWC", "needs 3 colour channels"),
        ("imagenet,mean=1:2", "one value or three"),
        ("raw01,color=purple", "expected one of RGB, BGR"),
    ],
)
def test_bad_preprocess_is_one_error_line(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], preprocess: str, needle: str
) -> None:
    argv = ["partition", str(model_file), "-o", str(tmp_path / "b"), "--preprocess", preprocess]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_nhwc_bgr_model_gets_bgr_pixels(tmp_path: Path) -> None:
    pre = Preprocess("image", (32, 32), (0.0,) * 3, (255.0,) * 3, "NHWC", "stretch", "BGR", "raw01")
    image = sample_photos()[0][1]
    x = prepare(image, pre)
    resized = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR))
    assert x.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(x[0], resized[..., ::-1] / 255, atol=1e-6)


@pytest.mark.slow
def test_lite2_builtin_partitions_with_its_own_size_name_and_version(
    tmp_path: Path, photo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lite2 is wired as a built-in (weights package, 260 px, Lite preprocessing), and --name /
    --model-version reach the manifest of a built-in."""
    out = tmp_path / "effl2"
    argv = ["partition", "efficientnet-lite2", "-o", str(out), "--name", "effl2", "--model-version", "7"]
    assert main([*argv, "--max-cuts", "4"]) == 0
    m = load_bundle(out).manifest
    assert (m.model, m.version, m.preprocess.size, m.preprocess.preset) == (
        "effl2",
        "7",
        (260, 260),
        "efficientnet-lite",
    )
    assert m.inputs[0].shape == (1, 3, 260, 260) and m.outputs[0].shape == (1, 1000)
    capsys.readouterr()
    assert (
        main(["edge", "run", "--bundle", str(out), "--cut", "output", "--source", str(photo_dir), "--json"])
        == 0
    )
    lines = {Path(x["input"]).stem: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    print("lite2 top-1:", {k: x["top5"][0]["label"] for k, x in lines.items()})
    assert lines["chelsea"]["top5"][0]["index"] in range(281, 286), lines["chelsea"]  # ImageNet cats
