"""Fixtures for the reliability suite: the helpers of tests/integration, and a tail service child.

The suite reuses `tests/integration/support.py` (it builds frames exactly as an edge does), so that
directory goes on the import path the way pytest puts a test's own directory there.
"""

from __future__ import annotations

import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from frames import FrameFactory
from relkit import CALM_CUT, Service, spawned_service
from support import EdgeClient

from edgecut.bundle import load_bundle
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths, generate_keys, load_service_public

OTHER_CUT = "c06"


@pytest.fixture(scope="session")
def rel_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPaths:
    return generate_keys(tmp_path_factory.mktemp("rel-keys"))


@pytest.fixture(scope="session")
def rel_bundles(tmp_path_factory: pytest.TempPathFactory, effl0_bundle: Path) -> Path:
    root = tmp_path_factory.mktemp("rel-served")
    shutil.copytree(effl0_bundle, root / "effl0")
    return root


@pytest.fixture(scope="session")
def rel_edge(rel_bundles: Path, rel_keys: KeyPaths) -> EdgeClient:
    return EdgeClient(load_bundle(rel_bundles / "effl0"), load_service_public(rel_keys.service_pub))


@pytest.fixture(scope="session")
def calm_feeds(rel_edge: EdgeClient) -> dict[str, np.ndarray]:
    return rel_edge.frontier(sample_photos()[0][1], CALM_CUT)


@pytest.fixture(scope="session")
def factory(
    rel_edge: EdgeClient, calm_feeds: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> FrameFactory:
    stranger = load_service_public(generate_keys(tmp_path_factory.mktemp("stranger")).service_pub)
    other = rel_edge.frontier(sample_photos()[1][1], OTHER_CUT)
    return FrameFactory(rel_edge, calm_feeds, CALM_CUT, OTHER_CUT, other, stranger, random.Random(12))


@pytest.fixture(scope="session")
def service(
    rel_bundles: Path, rel_keys: KeyPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with spawned_service(rel_bundles, rel_keys.service_key, tmp_path_factory.mktemp("rel-service")) as s:
        yield s
