"""`--preprocess`: presets and overrides resolve to the manifest's pixel-unit Preprocess, checked
against the model's input; old manifests without the new fields still read."""

from __future__ import annotations

import numpy as np
import pytest

from edgecut.bundle import Manifest, Preprocess, TensorSpec
from edgecut.errors import BundleError, UsageError
from edgecut.partition.preprocessing import PRESETS, parse, resolve

NCHW = TensorSpec("x", (1, 3, 96, 128), "float32")
NHWC = TensorSpec("x", (1, 96, 128, 3), "float32")


def test_imagenet_preset_in_pixel_units() -> None:
    pre = resolve(parse("imagenet"), NCHW, "m")
    assert (pre.kind, pre.size, pre.layout, pre.color, pre.resize, pre.preset) == (
        "image",
        (96, 128),
        "NCHW",
        "RGB",
        "crop",
        "imagenet",
    )
    np.testing.assert_allclose(pre.mean, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(pre.std, [58.395, 57.12, 57.375])


def test_overrides_and_layout_from_the_shape() -> None:
    pre = resolve(parse("raw01, resize=stretch, color=bgr, size=96x128"), NHWC, "m")
    assert (pre.layout, pre.resize, pre.color, pre.size, pre.mean, pre.std) == (
        "NHWC",
        "stretch",
        "BGR",
        (96, 128),
        (0.0, 0.0, 0.0),
        (255.0, 255.0, 255.0),
    )
    pre = resolve(parse("scale=1/255,mean=0.5,std=0.25:0.5:1"), NCHW, "m")
    np.testing.assert_allclose(pre.mean, [127.5] * 3)
    np.testing.assert_allclose(pre.std, [63.75, 127.5, 255.0])
    assert pre.preset == ""


def test_every_preset_resolves() -> None:
    for name in PRESETS:
        assert resolve(parse(name), NCHW, "m").preset == name


def test_apply_matches_the_formula() -> None:
    pre = resolve(parse("caffe"), NHWC, "m")
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    x = pre.apply(image)
    want = image[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(x[0], want, atol=1e-4)


@pytest.mark.parametrize(
    ("text", "spec", "needle"),
    [
        ("", NCHW, "empty"),
        ("mobilenet", NCHW, "unknown preset"),
        ("imagenet,gamma=2", NCHW, "known key"),
        ("imagenet,scale=0", NCHW, "must be positive"),
        ("imagenet,scale=1/0", NCHW, "not a number"),
        ("imagenet,size=96x96", NCHW, "does not match"),
        ("imagenet,layout=NHWC", NCHW, "3 colour channels"),
        ("imagenet", TensorSpec("x", (1, 10), "float32"), "float32 image input"),
        ("imagenet", TensorSpec("x", (1, 3, 8, 8), "uint8"), "float32 image input"),
        ("imagenet", TensorSpec("x", (4, 3, 8, 8), "float32"), "batch 4"),
        ("imagenet", TensorSpec("x", (1, 4, 8, 8), "float32"), "no 3-channel axis"),
    ],
)
def test_bad_declarations_are_usage_errors(text: str, spec: TensorSpec, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        resolve(parse(text), spec, "m")


def test_manifest_without_the_new_fields_reads_with_defaults() -> None:
    m = _manifest(Preprocess("image", (8, 8), (1.0,) * 3, (2.0,) * 3, "NHWC", "stretch", "BGR", "x"))
    d = m.to_json()
    assert Manifest.from_json(d) == m
    for key in ("resize", "color", "preset"):
        del d["preprocess"][key]
    old = Manifest.from_json(d).preprocess
    assert (old.resize, old.color, old.preset, old.layout) == ("crop", "RGB", "", "NHWC")
    d["preprocess"]["color"] = "CMYK"
    with pytest.raises(BundleError, match="color"):
        Manifest.from_json(d)


def _manifest(pre: Preprocess) -> Manifest:
    from edgecut.bundle import Cut, Segment

    spec = TensorSpec("x", (1, 8, 8, 3), "float32")
    cuts = (Cut("input", 0, -1, (spec,)), Cut("output", 1, 0, (spec,)))
    seg = (Segment("segments/seg_001.onnx", "input", "output", ("x",), ("x",)),)
    return Manifest("m", "1", (spec,), (spec,), pre, cuts, seg, {})
