"""Online adaptation, against a real tail service: the agent moves its cut when the link drops from
100 to 0.25 Mbit/s and back, and finds a service that came up after it started.

The edge plans with a slow-device profile: this machine's per-segment shares, scaled so the whole
model takes `SLOW_DEVICE_MS` (a Pi-Zero-class device). Fixing the total, instead of scaling a
measurement by a constant, keeps the margins the same on a loaded machine, where a measured profile
comes out several times slower and would make running on the device look better than it is. The
link emulator's burst is one paced chunk (as in the sweep), so a frame's time is its bytes over
the bandwidth instead of crossing free on the bucket's credit.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import running_server, serve_config

from edgecut.bundle import load_bundle
from edgecut.edge.agent import Input, Result, image_input
from edgecut.edge.profiler import profile_bundle
from edgecut.edge.runner import OrtRunner
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths
from edgecut.netem import LinkConfig, ThreadedLinkEmulator, paced_burst_bytes
from edgecut.profile import save_profile
from edgecut.runtime import OrtOptions

SLOW_DEVICE_MS = 600.0  # the whole model on the emulated device


def _link(bandwidth: str) -> LinkConfig:
    config = LinkConfig.parse(bandwidth, "10ms")
    return dataclasses.replace(config, burst_bytes=paced_burst_bytes(config.up_bps))


FAST, SLOW = _link("100mbit"), _link("0.25mbit")


@pytest.fixture(scope="module")
def slow_profile(effl0_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = load_bundle(effl0_bundle)
    here = profile_bundle(
        bundle, OrtRunner(bundle, OrtOptions(threads=1)), runtime="ort", threads=1, runs=3, codecs=()
    )
    factor = SLOW_DEVICE_MS / sum(t.latency_ms for t in here.segments)
    path = tmp_path_factory.mktemp("profiles") / "slow.json"
    save_profile(here.scaled(factor, "slow-device", f"one core here scaled to {SLOW_DEVICE_MS:.0f} ms"), path)
    return path


def _numbered() -> Callable[[], Input]:
    photo = sample_photos()[0][1]
    count = iter(range(1_000_000))
    return lambda: image_input(next(count), "chelsea", photo)


def _inputs(link: ThreadedLinkEmulator, seen: list[Result]) -> Iterator[Input]:
    """Fast link, then slow until the agent stops offloading, then fast until it offloads again."""
    nxt = _numbered()
    for _ in range(6):
        yield nxt()
    link.set_config(SLOW)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (seen and seen[-1].cut == "output"):
        yield nxt()
    link.set_config(FAST)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not seen or seen[-1].cut == "output"):
        time.sleep(0.3)  # edge-only sends nothing: the agent learns the link from its probes
        yield nxt()
    for _ in range(2):
        yield nxt()


def test_cut_follows_the_bandwidth(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, slow_profile: Path
) -> None:
    seen: list[Result] = []
    with tail_server(max_queue_delay_ms=0) as server:
        link = ThreadedLinkEmulator(("127.0.0.1", server.port), FAST)
        with link as (host, port):
            config = EdgeConfig(
                effl0_bundle,
                f"{host}:{port}",
                keys.service_pub,
                cut="auto",
                in_flight=1,
                edge_profile=slow_profile,
                deadline_ms=10_000,
            )
            with start_agent(config) as agent:
                agent.run(_inputs(link, seen), seen.append)
    cuts = [r.cut for r in seen]
    assert all(r.where in ("cloud", "local") for r in seen)
    first_slow = 6
    assert cuts[first_slow - 1] != "output", cuts  # 100 Mbit/s: offloading beats a slow device
    assert "output" in cuts[first_slow:], cuts  # 0.25 Mbit/s: run everything on the device
    back = cuts.index("output", first_slow)
    assert any(c != "output" for c in cuts[back:]), cuts  # 100 Mbit/s again: offload again


def test_agent_started_with_the_service_down_offloads_once_it_is_up(
    bundles_dir: Path, keys: KeyPaths, slow_profile: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = EdgeConfig(
        bundles_dir / "effl0",
        f"127.0.0.1:{port}",
        keys.service_pub,
        cut="auto",
        in_flight=1,
        edge_profile=slow_profile,
        threads=1,
    )
    seen: list[Result] = []
    up: list[int] = []

    def inputs() -> Iterator[Input]:
        nxt = _numbered()
        for _ in range(3):
            yield nxt()  # nothing listens yet
        with running_server(serve_config(bundles_dir, keys, port=port)):
            up.append(len(seen))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (seen and seen[-1].where == "cloud"):
                time.sleep(0.3)
                yield nxt()
            yield nxt()  # answered while the service is still up

    with start_agent(config) as agent:
        agent.run(inputs(), seen.append)
    assert sorted(r.position for r in seen) == list(range(len(seen)))
    assert [r.where for r in seen[:3]] == ["local"] * 3
    assert any(r.where == "cloud" for r in seen[up[0] :]), [(r.cut, r.where) for r in seen]
