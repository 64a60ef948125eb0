"""The tail service under reloads, bad bundles, hostile frames, skewed clocks and idle lanes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from support import EdgeClient, ServerHandle, Stream, with_version
from test_cloud_service import CODE, OK, GatedExecutor, infer_one, now_ms, wait_for

from edgecut import codec, framing
from edgecut.bundle import Bundle, load_bundle, write_manifest
from edgecut.cloud import batcher
from edgecut.errors import DeadlineError, FrameTooLargeError
from edgecut.framing import Reassembler, RequestHead, split
from edgecut.v1 import edgecut_pb2 as pb


@pytest.fixture(scope="module")
def cut(edge: EdgeClient) -> str:
    cuts = [c.id for c in edge.manifest.cuts]
    return cuts[2 * len(cuts) // 3]


@pytest.fixture(scope="module")
def feeds(edge: EdgeClient, photos: list[np.ndarray], cut: str) -> dict[str, np.ndarray]:
    return edge.frontier(photos[0], cut)


@pytest.fixture
def extra_dirs(bundles_dir: Path) -> Iterator[list[Path]]:
    """Bundle directories a test adds next to effl0; removed afterwards."""
    made: list[Path] = []
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def recv(stream: Stream, request_id: str, timeout_s: float = 20) -> pb.Answer:
    """An answer, or a test failure (not a hang) when none comes."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(stream.recv, request_id).result(timeout_s)
    finally:
        pool.shutdown(wait=False)


def queued(h: ServerHandle) -> int:
    async def count() -> int:
        return sum(lane.queue.qsize() for lane in h.server.ctx.batcher._lanes.values())

    return int(h.call(count()))


# 1. Reloading an identical bundle must not stop the queue its new entry shares.


def test_reloading_an_identical_bundle_keeps_its_queue(
    tail_server: Any, edge: EdgeClient, bundles_dir: Path, cut: str, feeds: dict[str, np.ndarray]
) -> None:
    gated = GatedExecutor()
    gated.gate.set()
    with tail_server(executor=gated, max_batch=1, max_queue_delay_ms=0) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        assert infer_one(stream, edge, feeds, cut).code == OK
        gated.gate.clear()
        gated.entered.clear()
        old = edge.request(feeds, cut)
        stream.send(old)
        assert gated.entered.wait(10)  # computing, holding the entry about to be retired
        for path in (bundles_dir / "effl0").rglob("*"):
            os.utime(path)  # copied in again: new mtimes, same manifest sha
        assert h.call(h.server.rescan()) is None
        new = edge.request(feeds, cut)
        stream.send(new)  # the reloaded entry's request, in the same lane
        wait_for(lambda: queued(h) == 1, 10)
        gated.gate.set()  # the old entry drains
        assert recv(stream, old.binding.request_id).code == OK
        assert recv(stream, new.binding.request_id).code == OK
        assert gated.evicted == []  # its sessions serve the reloaded entry
        assert infer_one(stream, edge, feeds, cut).code == OK
        stream.close()


def test_a_stopped_lane_answers_what_it_held(
    tail_server: Any, edge: EdgeClient, cut: str, feeds: dict[str, np.ndarray]
) -> None:
    gated = GatedExecutor()
    with tail_server(executor=gated, max_batch=1, max_queue_delay_ms=0) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        computing, waiting = edge.request(feeds, cut), edge.request(feeds, cut)
        stream.send(computing)
        assert gated.entered.wait(10)
        stream.send(waiting)
        wait_for(lambda: queued(h) == 1, 10)
        h.call(h.server.ctx.batcher.close())
        for pending in (computing, waiting):
            assert recv(stream, pending.binding.request_id).code == CODE["UNAVAILABLE"]
        gated.gate.set()
        stream.close()


# 2. A bundle ONNX Runtime refuses is skipped; the others still load.


class RefusingExecutor(GatedExecutor):
    """Warm-up fails, as ORT does for an unimplemented op or CUDA OOM, for one version."""

    def warm_up(self, bundle: Bundle, runs: int) -> Any:
        if bundle.manifest.version == "3":
            raise ort_errors.NotImplemented("Could not find an implementation for FancyOp")
        return super().warm_up(bundle, runs)


def test_a_bundle_ort_refuses_is_skipped_and_the_rest_load(
    tail_server: Any, edge: EdgeClient, bundles_dir: Path, extra_dirs: list[Path]
) -> None:
    extra_dirs += [bundles_dir / "a-refused", bundles_dir / "zz-v4"]
    with_version(bundles_dir / "effl0", extra_dirs[0], "3")  # scanned before effl0
    with_version(bundles_dir / "effl0", extra_dirs[1], "4")
    refusing = RefusingExecutor()
    with tail_server(executor=refusing) as h, h.channel() as ch:
        info = h.stub(ch).ServerInfo(pb.ServerInfoRequest())
        assert sorted(m.version for m in info.models) == ["1", "4"]
        assert refusing.evicted == [f"{edge.manifest.model}:3"]
        assert h.call(h.server.rescan()) is None  # skipped quietly until its files change


# 3. Decode cost is judged by what the header promises, not by the sealed size.


@pytest.fixture
def decode_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Thread ids of every codec.decode call made on the server's side."""
    calls: list[int] = []
    real = codec.decode
    test_thread = threading.get_ident()

    def spy(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != test_thread:
            calls.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(codec, "decode", spy)
    return calls


def test_a_tiny_frame_that_decodes_large_is_decoded_off_the_loop(
    tail_server: Any, edge: EdgeClient, decode_threads: list[int]
) -> None:
    spec = edge.manifest.cuts[0].frontier[0]
    zeros = {spec.name: np.zeros((4, *spec.shape[1:]), spec.dtype)}  # 2.4 MB, ~1 KB packed
    pending = edge.request(zeros, "input", spec=codec.CodecSpec("none", zstd_level=1))
    assert sum(len(f.sealed) for f in pending.frames) < 16 << 10
    with tail_server(max_rows_per_request=4) as h, h.channel() as ch:
        loop_thread = h.call(_thread_id())
        stream = Stream(h.stub(ch))
        stream.send(pending)
        assert recv(stream, pending.binding.request_id).code == OK
        stream.close()
    assert decode_threads and loop_thread not in decode_threads


async def _thread_id() -> int:
    return threading.get_ident()


def test_a_batch_for_an_unbatchable_bundle_is_refused_before_decoding(
    tail_server: Any, edge: EdgeClient, bundles_dir: Path, extra_dirs: list[Path], decode_threads: list[int]
) -> None:
    single = bundles_dir / "single"
    extra_dirs.append(single)
    with_version(bundles_dir / "effl0", single, "5")
    write_manifest(single, dataclasses.replace(load_bundle(single).manifest, batchable=False))
    spec = edge.manifest.cuts[0].frontier[0]
    batch = {spec.name: np.zeros((8, *spec.shape[1:]), spec.dtype)}
    pending = edge.request(batch, "input", version="5", spec=codec.CodecSpec("none", zstd_level=1))
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        stream.send(pending)
        answer = recv(stream, pending.binding.request_id)
        stream.close()
    assert answer.code == CODE["INVALID_ARGUMENT"] and "not batchable" in answer.message
    assert decode_threads == []


# 4. Framing: bounded bytes per stream, and partial requests that stall are dropped.


def test_the_default_request_limit_matches_the_decoded_limit() -> None:
    assert framing.MAX_DECODED_BYTES < framing.MAX_REQUEST_BYTES <= framing.MAX_DECODED_BYTES * 1.1


def test_partial_requests_share_one_byte_budget_per_stream() -> None:
    r = Reassembler(max_request_bytes=100)
    assert r.max_pending_bytes == 200
    for rid in ("a", "b"):
        assert r.add(split(RequestHead(rid, "m", "1", "c", 0, 0), b"x" * 100, 10)[0]) is None
    with pytest.raises(FrameTooLargeError, match="partial requests"):
        r.add(split(RequestHead("c", "m", "1", "c", 0, 0), b"x" * 10, 5)[0])
    assert r.add(split(RequestHead("d", "m", "1", "c", 0, 0), b"x" * 10, 10)[0]) is not None


def test_stalled_partial_requests_expire() -> None:
    now = [0.0]
    r = Reassembler(max_pending_s=30, clock=lambda: now[0])
    frames = split(RequestHead("slow", "m", "1", "c", 0, 0), b"x" * 30, 10)
    r.add(frames[0])
    now[0] = 29
    assert r.expire() == []
    now[0] = 31
    ((head, error),) = r.expire()
    assert head.request_id == "slow" and isinstance(error, DeadlineError)
    with pytest.raises(Exception, match="without chunk 0"):
        r.add(frames[1])


# 5. A client that writes junk and never reads cannot grow the server's answer queue.


def test_a_client_that_never_reads_is_held_back(tail_server: Any) -> None:
    sent = 40_000
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        # Each is refused (chunk 1 without chunk 0), its answer echoing the id (the longest allowed).
        stream.send([pb.Frame(request_id=f"{i:06d}" + "x" * 250, chunk_index=1) for i in range(sent)])
        registry = h.server.ctx.metrics.registry

        def answered() -> float:
            return (
                registry.get_sample_value(
                    "edgecut_requests_total", {"model": "unknown", "status": "INVALID_ARGUMENT"}
                )
                or 0
            )

        settled = [-1.0]

        def stalled() -> bool:
            before, settled[0] = settled[0], answered()
            time.sleep(0.3)
            return before == settled[0] > 0

        wait_for(stalled)
        assert settled[0] < sent / 2
        stream.cancel()


# 6. Deadlines are a budget from sent_at_ms, so the edge's clock may be off.


@pytest.mark.parametrize(
    "skew_ms, budget_ms, expected",
    [
        (-10_000, 5_000, "OK"),  # edge clock 10 s behind: its absolute deadline has "passed"
        (10_000, -1, "DEADLINE_EXCEEDED"),  # edge clock ahead: its deadline looks far away
    ],
)
def test_deadlines_survive_clock_skew(
    tail_server: Any,
    edge: EdgeClient,
    cut: str,
    feeds: dict[str, np.ndarray],
    skew_ms: int,
    budget_ms: int,
    expected: str,
) -> None:
    sent_at_ms = now_ms() + skew_ms  # both are bound into the seal: set them when sealing
    pending = edge.request(feeds, cut, now_ms=sent_at_ms, deadline_ms=sent_at_ms + budget_ms)
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        stream.send(pending)
        assert recv(stream, pending.binding.request_id).code == CODE[expected]
        stream.close()


# 7. An idle server reports no queue delay, whatever its last burst was.


def test_queue_delay_estimate_decays_when_idle(
    tail_server: Any,
    edge: EdgeClient,
    cut: str,
    feeds: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batcher, "IDLE_HALF_LIFE_S", 0.05)
    gated = GatedExecutor()
    with tail_server(executor=gated, max_batch=1, max_queue_delay_ms=0) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        first, second = edge.request(feeds, cut), edge.request(feeds, cut)
        stream.send(first)
        assert gated.entered.wait(10)
        stream.send(second)
        wait_for(lambda: queued(h) == 1, 10)
        held_from = time.monotonic()
        wait_for(lambda: time.monotonic() - held_from > 0.3)  # second waits behind first
        gated.gate.set()
        assert recv(stream, first.binding.request_id).code == OK
        answer = recv(stream, second.binding.request_id)
        assert answer.code == OK and answer.server_queue_delay_ms > 1  # the burst left its mark …
        stub = h.stub(ch)
        wait_for(lambda: stub.ServerInfo(pb.ServerInfoRequest()).queue_delay_ms < 1, 5)  # … not kept
        stream.close()
