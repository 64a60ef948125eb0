"""`--cut auto` plans with what its own requests cost, not only with what it was told at start.

Round 3's settled agent kept choosing `input/png` at 128 Mbit/s (84 ms measured, 22 predicted):
with an edge profile given, only the first encode of an option the profile lacks was kept, and
the server's decode and tail times in each answer never reached the cost table. These tests pin
both paths: the edge's own encode figures, and the server's per-answer decode and compute,
against a real tail service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgecut.bundle import load_bundle
from edgecut.costs import CloudTimes, cut_costs
from edgecut.edge import edgetimes, served
from edgecut.edge.agent import Result, image_input
from edgecut.edge.cutchoice import AutoCut
from edgecut.edge.edgetimes import EdgeTimes
from edgecut.edge.served import ServedTimes
from edgecut.edge.session import ServerTimings
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths
from edgecut.link import Ewma
from edgecut.profile import CodecTiming, Profile, SegmentTiming, save_profile


def _profile(bundle: Any, segment_ms: float, codecs: tuple[CodecTiming, ...] = ()) -> Profile:
    m = bundle.manifest
    return Profile(
        model=m.model,
        model_version=m.version,
        manifest_sha256=bundle.manifest_sha256,
        device="slow-device",
        runtime="ort",
        threads=1,
        mode="scaled",
        scale=1.0,
        source="test: every segment the same",
        segments=tuple(SegmentTiming(s.name, segment_ms, segment_ms, 1) for s in m.segments),
        codecs=codecs,
        created_at="2026-11-28T00:00:00Z",
    )


def _ewma(values: list[float], alpha: float) -> float:
    e = Ewma(alpha)
    for v in values:
        e.add(v)
    assert e.value is not None
    return e.value


def test_a_given_profile_keeps_learning_the_options_it_lacks(effl0_bundle: Path) -> None:
    bundle = load_bundle(effl0_bundle)
    given = CodecTiming("c05", "int8", 0.5, 0.3, 16_000)
    times = EdgeTimes(bundle, _profile(bundle, 2.0, (given,)), learn=False)
    times.observe_encode("c05", "int8", 9.0, 15_000)  # the profile's own figure stands
    assert times.new_figures == 0 and times.observations == 0
    for ms in (40.0, 40.0, 20.0):
        times.observe_encode("input", "png", ms, 80_000)
    assert times.new_figures == 1 and times.observations == 3  # round 3 kept only the first one
    costs = {(c.cut, c.codec): c for c in cut_costs(bundle, times.profile(), CloudTimes({}), ["int8", "png"])}
    assert costs[("input", "png")].encode_ms == pytest.approx(_ewma([40, 40, 20], edgetimes.ALPHA))
    assert costs[("c05", "int8")].encode_ms == 0.5


def test_served_times_replace_the_servers_start_figures(effl0_bundle: Path) -> None:
    bundle = load_bundle(effl0_bundle)
    costs = cut_costs(bundle, _profile(bundle, 2.0), CloudTimes({}), ["int8", "pca4"])
    before = {(c.cut, c.codec): c for c in costs}
    times = ServedTimes()
    times.observe("c05", "int8", ServerTimings())  # an old server reports nothing: skipped
    assert times.observations == 0
    times.observe("c05", "int8", ServerTimings(decode_ms=3.0, compute_ms=12.0))
    times.observe("c05", "int8", ServerTimings(decode_ms=1.0, compute_ms=10.0))
    after = {(c.cut, c.codec): c for c in times.apply(costs)}
    c05 = _ewma([12, 10], served.ALPHA)
    assert after[("c05", "int8")].decode_ms == pytest.approx(_ewma([3, 1], served.ALPHA))
    assert after[("c05", "int8")].cloud_ms == pytest.approx(c05)
    assert after[("c05", "pca4")].cloud_ms == after[("c05", "int8")].cloud_ms  # same tail
    assert after[("c05", "pca4")].decode_ms == before[("c05", "pca4")].decode_ms  # never used
    # a cut never used: the server's figure x how the measured tail compares with its figures
    ratio = c05 / before[("c05", "int8")].cloud_ms
    assert after[("c03", "int8")].cloud_ms == pytest.approx(before[("c03", "int8")].cloud_ms * ratio)
    assert after[("c03", "int8")].decode_ms == before[("c03", "int8")].decode_ms
    assert after[("output", "none")] == before[("output", "none")]
    assert times.new_figures == 1


def test_the_agents_answers_reach_its_cost_table(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, tmp_path: Path
) -> None:
    """A slow device with no codec figures, on loopback: it offloads, and every option it used is
    planned with the encode it measured and the decode and tail time the server reported."""
    bundle = load_bundle(effl0_bundle)
    path = tmp_path / "slow.json"
    save_profile(_profile(bundle, 50.0), path)
    photo = sample_photos()[0][1]
    seen: list[Result] = []
    with tail_server(max_queue_delay_ms=0) as server:
        config = EdgeConfig(
            effl0_bundle,
            f"127.0.0.1:{server.port}",
            keys.service_pub,
            cut="auto",
            in_flight=1,
            edge_profile=path,
            max_accuracy_drop=None,
        )
        with start_agent(config) as agent:
            agent.run((image_input(i, "chelsea", photo) for i in range(10)), seen.append)
            choice = agent.choice
            assert isinstance(choice, AutoCut)
            choice.refresh(force=True)
            assert choice.replanner is not None
            table = {(c.cut, c.codec): c for c in choice.replanner.costs}
    cloud = [r for r in seen if r.where == "cloud"]
    assert len(cloud) >= 5, [(r.cut, r.where, r.error) for r in seen]
    assert choice.served.observations == len(cloud)
    for key in {(str(r.cut), str(r.codec)) for r in cloud}:
        mine = [r.timings_ms for r in cloud if (r.cut, r.codec) == key]
        cost = table[key]
        assert cost.decode_ms == pytest.approx(_ewma([t["server_decode_ms"] for t in mine], served.ALPHA))
        assert cost.encode_ms == pytest.approx(_ewma([t["encode_ms"] for t in mine], edgetimes.ALPHA))
        at_cut = [r.timings_ms["server_compute_ms"] for r in cloud if r.cut == key[0]]
        assert cost.cloud_ms == pytest.approx(_ewma(at_cut, served.ALPHA))
