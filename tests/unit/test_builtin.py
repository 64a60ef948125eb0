"""The built-in EfficientNet-Lite models load their shipped weights with their own preprocessing;
the committed Pi-class Lite2 profile is what benchmarks/lite2_profile.py says it is.

Partitioning Lite2 end to end is the slow test in tests/integration/test_user_model.py; this one
is cheap and still fails if Lite2's weights package, size or preprocessing wiring breaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgecut.images import prepare, sample_photos
from edgecut.partition.builtin import builtin_names, load_builtin
from edgecut.profile import load_profile

PROFILES = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles"


@pytest.mark.parametrize(("name", "size"), [("efficientnet-lite0", 224), ("efficientnet-lite2", 260)])
def test_builtin_loads_real_weights_and_recognises_a_cat(name: str, size: int) -> None:
    assert name in builtin_names()
    tm = load_builtin(name)
    pre = tm.preprocess
    assert (pre.size, pre.preset, pre.mean, pre.std) == (
        (size, size),
        "efficientnet-lite",
        (127.0,) * 3,
        (128.0,) * 3,
    )
    assert tuple(tm.example[0].shape) == (1, 3, size, size)
    cat = dict(sample_photos())["chelsea"]
    with torch.no_grad():
        logits = tm.module(torch.from_numpy(prepare(cat, pre))).numpy()
    assert logits.shape == (1, 1000)
    assert tm.labels is not None
    top = [tm.labels[i].lower() for i in np.argsort(-logits[0])[:5]]
    assert any("cat" in label or "tabby" in label for label in top), top


def test_lite2_pi_class_profile_is_scaled_from_lite0_by_the_pixel4_ratio() -> None:
    lite2 = load_profile(PROFILES / "effl2-pi4-scaled.json")
    measured = load_profile(PROFILES / "effl2-this-machine-1t-loaded.json")
    lite0 = load_profile(PROFILES / "pi4-scaled-5x.json")
    assert (lite2.model, lite2.mode, measured.model, measured.mode) == (
        "efficientnet-lite2",
        "scaled",
        "efficientnet-lite2",
        "measured",
    )
    assert "26/12" in lite2.source and "Pixel 4" in lite2.source
    total = sum(t.latency_ms for t in lite2.segments)
    assert total == pytest.approx(sum(t.latency_ms for t in lite0.segments) * 26 / 12, rel=1e-6)
    assert [t.segment for t in lite2.segments] == [t.segment for t in measured.segments]
    for a, b in zip(lite2.segments, measured.segments, strict=True):
        assert a.latency_ms == pytest.approx(b.latency_ms * lite2.scale, rel=1e-9)
