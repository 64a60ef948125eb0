"""Compact answers end to end: a real agent asks a real tail service for top-5 or the full output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecut.answers import AnswerSpec, answer_bytes
from edgecut.bundle import load_bundle
from edgecut.costs import CloudTimes, cut_costs
from edgecut.edge.agent import Result, image_input
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths
from edgecut.profile import load_profile

PROFILE = Path(__file__).resolve().parents[2] / "benchmarks/profiles/this-machine-1t.json"


def run(bundle: Path, keys: KeyPaths, port: int | None, **kw: Any) -> list[Result]:
    server = {"server": f"127.0.0.1:{port}", "server_key": keys.service_pub} if port else {}
    config = EdgeConfig(bundle=bundle, threads=1, **server, **kw)
    items = [image_input(i, name, im) for i, (name, im) in enumerate(sample_photos()[:4])]
    results: list[Result] = []
    with start_agent(config) as agent:
        agent.run(items, results.append)
    return sorted(results, key=lambda r: r.position)


@pytest.fixture(scope="module")
def local(effl0_bundle: Path, keys: KeyPaths) -> list[Result]:
    """Edge-only: the unsplit model's own top-5, computed from its full output."""
    return run(effl0_bundle, keys, None, cut="output")


@pytest.mark.parametrize("cut", ["c06", "c11"])
def test_top5_answer_matches_full_answer_and_is_smaller(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, local: list[Result], cut: str
) -> None:
    with tail_server() as server:
        top = run(effl0_bundle, keys, server.port, cut=cut, codec="none")  # default: top-5
        full = run(effl0_bundle, keys, server.port, cut=cut, codec="none", answer="full")
    assert {r.where for r in top + full} == {"cloud"}
    for t, f, ref in zip(top, full, local, strict=True):
        assert [i for i, _, _ in t.top5] == [i for i, _, _ in f.top5] == [i for i, _, _ in ref.top5]
        np.testing.assert_allclose([p for *_, p in t.top5], [p for *_, p in f.top5], rtol=5e-3)
        assert t.top5[0][1] == f.top5[0][1]  # labels from the bundle either way
    down_top, down_full = np.median([r.bytes_down for r in top]), np.median([r.bytes_down for r in full])
    print(f"{cut}: sealed answer bytes: top-5 {down_top:.0f}, full {down_full:.0f}")
    assert down_top * 10 < down_full


def test_cost_model_uses_the_answer_format_the_agent_asks_for(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any
) -> None:
    bundle = load_bundle(effl0_bundle)
    with tail_server() as server:
        measured = run(effl0_bundle, keys, server.port, cut="c11", codec="int8")[0].bytes_down
    costs = {(c.cut, c.codec): c for c in cut_costs(bundle, load_profile(PROFILE), CloudTimes({}), ["int8"])}
    predicted = costs[("c11", "int8")].bytes_down
    assert predicted == answer_bytes(bundle.manifest.outputs, AnswerSpec())
    assert measured <= predicted <= measured + 32  # the Answer message's own fields on top
    full = cut_costs(bundle, load_profile(PROFILE), CloudTimes({}), ["int8"], answer=AnswerSpec("full"))
    assert all(c.bytes_down > 4000 for c in full if c.cut != "output")


def test_bad_answer_flag_is_one_usage_error(
    effl0_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgecut.cli import main

    argv = ["edge", "run", "--bundle", str(effl0_bundle), "--cut", "output", "--source", str(tmp_path)]
    assert main([*argv, "--answer", "top0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: top-k answer with k=0") and "Traceback" not in err, err
