"""Online adaptation: the agent moves its cut when the link drops from 100 to 1 Mbit/s and back.

A real tail service behind the link emulator; the edge plans with a slow-device profile (this
machine's single thread × 10, a Pi-Zero-class device), so that a fast link clearly makes
offloading win and a slow one clearly makes running everything on the device win — the margins
must survive a loaded CI machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgecut.bundle import load_bundle
from edgecut.edge.agent import Input, Result, image_input
from edgecut.edge.profiler import profile_bundle
from edgecut.edge.runner import OrtRunner
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths
from edgecut.netem import LinkConfig, ThreadedLinkEmulator
from edgecut.profile import save_profile
from edgecut.runtime import OrtOptions

FAST, SLOW = LinkConfig.parse("100mbit", "10ms"), LinkConfig.parse("1mbit", "10ms")


@pytest.fixture(scope="module")
def pi_profile(effl0_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = load_bundle(effl0_bundle)
    here = profile_bundle(
        bundle, OrtRunner(bundle, OrtOptions(threads=1)), runtime="ort", threads=1, runs=3, codecs=()
    )
    path = tmp_path_factory.mktemp("profiles") / "pi.json"
    save_profile(here.scaled(10.0, "slow-device", "10x one core here: a slow device"), path)
    return path


def _inputs(link: ThreadedLinkEmulator, seen: list[Result]) -> Iterator[Input]:
    """Fast link, then slow until the agent stops offloading, then fast until it offloads again."""
    photo = sample_photos()[0][1]
    n = 0

    def nxt() -> Input:
        nonlocal n
        n += 1
        return image_input(n, "chelsea", photo)

    for _ in range(6):
        yield nxt()
    link.set_config(SLOW)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (seen and seen[-1].cut == "output"):
        yield nxt()
    link.set_config(FAST)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not seen or seen[-1].cut == "output"):
        time.sleep(0.3)  # edge-only sends nothing: the agent learns the link from its probes
        yield nxt()
    for _ in range(2):
        yield nxt()


def test_cut_follows_the_bandwidth(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, pi_profile: Path
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
                edge_profile=pi_profile,
                deadline_ms=10_000,
            )
            with start_agent(config) as agent:
                agent.run(_inputs(link, seen), seen.append)
    cuts = [r.cut for r in seen]
    assert all(r.where in ("cloud", "local") for r in seen)
    first_slow = 6
    assert cuts[0] != "output", cuts  # 100 Mbit/s: offloading beats a Pi
    assert "output" in cuts[first_slow:], cuts  # 1 Mbit/s: run everything on the device
    back = cuts.index("output", first_slow)
    assert any(c != "output" for c in cuts[back:]), cuts  # 100 Mbit/s again: offload again
