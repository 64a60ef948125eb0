"""The edge under faults: interrupts mid-request, bad answers, broken streams, silent links.

Faults are injected deterministically (a wrapped method raises on its k-th call, a stream is killed
at a chosen point) against a real tail service from the `tail_server` fixture.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import running_server, serve_config

from edgecut.bundle import load_bundle
from edgecut.edge import session as session_module
from edgecut.edge.agent import Agent, Input, Result, image_input
from edgecut.edge.cli import stop_on_signals
from edgecut.edge.cutchoice import PROBE_TIMEOUT_MS, AutoCut, FixedCut
from edgecut.edge.runner import OrtRunner
from edgecut.edge.session import SessionConfig, TailSession
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.errors import NotFoundError, UnavailableError
from edgecut.images import prepare, sample_photos
from edgecut.keys import KeyPaths, load_service_public
from edgecut.netem import LinkConfig, ThreadedLinkEmulator
from edgecut.runtime import OrtOptions


def edge_config(bundle: Path, port: int, keys: KeyPaths, **kw: Any) -> EdgeConfig:
    return EdgeConfig(
        bundle=bundle, server=f"127.0.0.1:{port}", server_key=keys.service_pub, threads=1, cut="c06", **kw
    )


def raise_on_call(
    obj: Any, name: str, k: int, *, after: bool = False, exc: Callable[[], BaseException] = KeyboardInterrupt
) -> None:
    """Make `obj.name` raise on its k-th call: before the real call, or after it has run."""
    real, calls = getattr(obj, name), 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == k and not after:
            raise exc()
        out = real(*args, **kwargs)
        if calls == k:
            raise exc()
        return out

    setattr(obj, name, wrapper)


def run_counting(config: EdgeConfig, patch: Callable[[Agent], None]) -> tuple[list[Result], int, Agent]:
    """Run the agent over the sample photos; also return how many inputs it pulled."""
    pulled = 0

    def source() -> Iterator[Input]:
        nonlocal pulled
        for i, (name, image) in enumerate(sample_photos()):
            pulled += 1
            yield image_input(i, name, image)

    results: list[Result] = []
    with start_agent(config) as agent:
        patch(agent)
        agent.run(source(), results.append)
    return results, pulled, agent


# ---------------------------------------------------------------- agent: exactly once


def signal_on_call(agent: Agent, obj: Any, name: str, k: int, after: bool) -> None:
    """On the k-th call of `obj.name` (before or after the real call) deliver SIGINT the way
    `edgecut edge run` handles it: the installed handler runs right there."""
    handler = _cli_handler(agent)
    real, calls = getattr(obj, name), 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == k and not after:
            handler(signal.SIGINT, None)
        out = real(*args, **kwargs)
        if calls == k and after:
            handler(signal.SIGINT, None)
        return out

    setattr(obj, name, wrapper)


def _cli_handler(agent: Agent) -> Callable[[int, object], None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_on_signals(agent)
        return signal.getsignal(signal.SIGINT)  # type: ignore[return-value]
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.parametrize(
    ("target", "name", "k", "after"),
    [
        ("session", "wait", 2, False),  # the signal lands while waiting for an answer
        ("head", "run", 3, False),  # ... while the head runs (nothing submitted yet)
        ("session", "submit", 2, True),  # ... after the request went out, before its ticket is kept
        ("session", "wait", 3, True),  # ... after an answer arrived, before its result is emitted
    ],
)
def test_interrupt_anywhere_still_one_result_per_started_input(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, target: str, name: str, k: int, after: bool
) -> None:
    with tail_server() as server:
        results, pulled, agent = run_counting(
            edge_config(effl0_bundle, server.port, keys, in_flight=2),
            lambda a: signal_on_call(a, getattr(a, target), name, k, after),
        )
    assert agent.interrupted
    assert pulled < len(sample_photos())  # the stop really cut the source short
    assert sorted(r.position for r in results) == list(range(pulled))
    assert {r.where for r in results} <= {"cloud", "local"}


def test_interrupt_while_reading_the_source(effl0_bundle: Path, keys: KeyPaths, tail_server: Any) -> None:
    """A source blocked in a read (stdin, camera) is interrupted by the signal itself."""

    def source(agent: Agent) -> Iterator[Input]:
        photos = sample_photos()
        for i in range(3):
            yield image_input(i, *photos[i])
        assert agent.reading
        _cli_handler(agent)(signal.SIGINT, None)  # raises KeyboardInterrupt inside the read
        raise AssertionError("not reached")

    results: list[Result] = []
    with (
        tail_server() as server,
        start_agent(edge_config(effl0_bundle, server.port, keys, in_flight=2)) as agent,
    ):
        agent.run(source(agent), results.append)
    assert agent.interrupted
    assert sorted(r.position for r in results) == [0, 1, 2]


@pytest.mark.parametrize("fallback", ["local", "fail"])
def test_malformed_answer_fails_only_its_input(
    effl0_bundle: Path, keys: KeyPaths, tail_server: Any, fallback: str
) -> None:
    def corrupt_second_answer(agent: Agent) -> None:
        assert agent.session is not None
        real, calls = agent.session.wait, 0

        def wait(ticket: Any) -> Any:
            nonlocal calls
            calls += 1
            reply = real(ticket)
            return dataclasses.replace(reply, payload=b"junk") if calls == 2 else reply

        agent.session.wait = wait  # type: ignore[method-assign]

    with tail_server() as server:
        results, pulled, agent = run_counting(
            edge_config(effl0_bundle, server.port, keys, fallback=fallback), corrupt_second_answer
        )
    assert not agent.interrupted
    assert sorted(r.position for r in results) == list(range(pulled))
    (bad,) = [r for r in results if r.where != "cloud"]
    assert bad.where == ("local" if fallback == "local" else "failed")
    assert bad.error is not None and "frame truncated" in bad.error


# ---------------------------------------------------------------- session


def test_server_with_another_build_of_the_version_is_refused(
    effl0_bundle: Path, keys: KeyPaths, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    shutil.copytree(effl0_bundle, served / "effl0")
    with (served / "effl0" / "manifest.json").open("a") as f:
        f.write("\n")  # same model:version, other manifest bytes: another build
    theirs = load_bundle(served / "effl0").manifest_sha256[:12]
    ours = load_bundle(effl0_bundle).manifest_sha256[:12]
    with running_server(serve_config(served, keys)) as server, pytest.raises(NotFoundError) as err:
        run_counting(edge_config(effl0_bundle, server.port, keys), lambda agent: None)
    assert str(err.value).endswith(
        f"serves a different build of efficientnet-lite0:1 (manifest sha {theirs} vs local {ours})"
    )


@pytest.fixture
def session_for(effl0_bundle: Path, keys: KeyPaths) -> Iterator[Callable[[int], TailSession]]:
    made: list[TailSession] = []
    manifest = load_bundle(effl0_bundle).manifest

    def make(port: int) -> TailSession:
        made.append(
            TailSession(
                SessionConfig(
                    f"127.0.0.1:{port}",
                    load_service_public(keys.service_pub),
                    manifest.model,
                    manifest.version,
                    deadline_ms=3000,
                )
            )
        )
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def c06_payload(effl0_bundle: Path) -> bytes:
    bundle = load_bundle(effl0_bundle)
    m = bundle.manifest
    feeds = {m.inputs[0].name: prepare(sample_photos()[0][1], m.preprocess)}
    frontier = OrtRunner(bundle, OrtOptions(threads=1)).run(feeds, 0, m.cut("c06").depth - 1)
    return FixedCut(bundle, "c06", "int8").encode("c06", "int8", frontier.outputs)


def wait_until(done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_broken_streams_leave_no_thread_behind(tail_server: Any, session_for: Any) -> None:
    with tail_server() as server:
        link = ThreadedLinkEmulator(("127.0.0.1", server.port), LinkConfig())
        with link as (_, link_port):
            session = session_for(link_port)

            def break_once() -> None:
                session.connect()
                link.reset_all()
                wait_until(lambda: session._stream is None)

            break_once()  # warms up gRPC's own threads
            before = threading.active_count()
            for _ in range(8):
                break_once()
            wait_until(lambda: threading.active_count() <= before + 1)


def test_reader_crash_fails_requests_fast_and_reconnects(
    tail_server: Any, session_for: Any, c06_payload: bytes
) -> None:
    with tail_server() as server:
        session = session_for(server.port)
        session.connect()
        raise_on_call(session, "_on_answer", 1, exc=lambda: RuntimeError("bug in a handler"))
        with pytest.raises(UnavailableError, match="answer reader failed"):
            session.wait(session.submit("c06", c06_payload))
        wait_until(lambda: session._stream is None)
        reply = session.wait(session.submit("c06", c06_payload))
    assert reply.payload


def test_stream_breaking_during_submit_fails_at_once(
    tail_server: Any, session_for: Any, c06_payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_seal = session_module.seal_request
    with tail_server() as server:
        session = session_for(server.port)
        session.connect()

        def seal_while_the_stream_dies(*args: Any, **kwargs: Any) -> Any:
            stream = session._stream
            assert stream is not None
            stream._call.cancel()
            stream._reader.join(5)
            return real_seal(*args, **kwargs)

        monkeypatch.setattr(session_module, "seal_request", seal_while_the_stream_dies)
        with pytest.raises(UnavailableError, match="broke before the request was sent"):
            session.submit("c06", c06_payload)


# ---------------------------------------------------------------- cut choice


class _SilentSession:
    """A session whose link drops everything: each Probe fails (after its timeout, in reality)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float | None, float]] = []  # (timeout_ms, perf_counter at call)

    def probe(self, payload_bytes: int = 0, reply_bytes: int = 0, timeout_ms: float | None = None) -> float:
        self.calls.append((timeout_ms, time.perf_counter()))
        raise UnavailableError("probe failed: DEADLINE_EXCEEDED")


def test_edge_only_probe_is_short_and_not_repeated_at_once(effl0_bundle: Path) -> None:
    bundle = load_bundle(effl0_bundle)
    m = bundle.manifest
    choice = AutoCut(
        bundle, OrtRunner(bundle, OrtOptions(threads=1)), None, "int8", min_depth=len(m.segments)
    )  # only "output": edge-only
    choice.calibrate({m.inputs[0].name: prepare(sample_photos()[0][1], m.preprocess)})
    silent = _SilentSession()
    choice.session = silent  # type: ignore[assignment]
    choice._last_probe = 0.0  # due now
    assert choice.current() == ("output", "none")
    assert len(silent.calls) == 1  # the first failed Probe ends the round
    timeout_ms, called_at = silent.calls[0]
    assert timeout_ms is not None and timeout_ms <= PROBE_TIMEOUT_MS
    assert choice._last_probe >= called_at  # the clock restarts after the probe, not before
    choice.current()
    assert len(silent.calls) == 1
