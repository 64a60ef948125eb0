"""Fixtures: keys, a bundles directory with the real EfficientNet-Lite0 bundle, a tail server."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import EdgeClient, running_server, serve_config

from edgecut.bundle import load_bundle
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths, generate_keys, load_service_public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPaths:
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory, effl0_bundle: Path) -> Path:
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(effl0_bundle, root / "effl0")
    return root


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [image for _, image in sample_photos()]


@pytest.fixture(scope="module")
def edge(bundles_dir: Path, keys: KeyPaths) -> EdgeClient:
    return EdgeClient(load_bundle(bundles_dir / "effl0"), load_service_public(keys.service_pub))


@pytest.fixture
def tail_server(bundles_dir: Path, keys: KeyPaths) -> Any:
    """Factory: `with tail_server(**config_overrides) as handle: ...`."""

    def start(executor: Any = None, **overrides: Any) -> Any:
        return running_server(serve_config(bundles_dir, keys, **overrides), executor)

    return start
