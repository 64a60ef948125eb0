"""Shared fixtures: the real EfficientNet-Lite0 bundle is built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def effl0_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 partitioned from its shipped pretrained weights, calibrated."""
    from edgecut.partition.build import partition
    from edgecut.partition.load import load_model

    out = tmp_path_factory.mktemp("bundles") / "effl0"
    bundle = partition(load_model("efficientnet-lite0"), out)
    try:
        from edgecut.partition.calibrate import calibrate_bundle
    except ImportError:
        return out
    calibrate_bundle(bundle, "builtin")
    return out
