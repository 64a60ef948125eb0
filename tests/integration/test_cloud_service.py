"""The tail service end to end: a real server on loopback, real bundle, keys, codec and sealing."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import EdgeClient, ServerHandle, Stream, with_version

from edgecut import codec
from edgecut.bundle import Bundle
from edgecut.cloud.executor import OrtExecutor
from edgecut.keys import KeyPaths, generate_keys, key_id, load_service_public
from edgecut.runtime import OrtOptions
from edgecut.sealing import device_identity
from edgecut.v1 import edgecut_pb2 as pb

OK = 0
CODE = {s.name: s.value[0] for s in grpc.StatusCode}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_for(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    """Poll a condition (never a blind sleep): used for the background rescan and task cleanup."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


class GatedExecutor:
    """The real ORT executor behind a gate, so tests can hold a batch in compute."""

    def __init__(self) -> None:
        self.inner = OrtExecutor(OrtOptions(threads=1))
        self.device = self.inner.device
        self.gate, self.entered = threading.Event(), threading.Event()
        self.runs = 0
        self.evicted: list[str] = []

    def run(self, bundle: Bundle, cut: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(30)
        self.runs += 1
        return self.inner.run(bundle, cut, feeds)

    def warm_up(self, bundle: Bundle, runs: int) -> Any:
        return self.inner.warm_up(bundle, runs)

    def evict(self, bundle: Bundle) -> None:
        self.evicted.append(bundle.name)
        self.inner.evict(bundle)


@pytest.fixture(scope="module")
def cuts(edge: EdgeClient) -> list[str]:
    """Input, three interior cuts spread over the depth, and output."""
    ids = [c.id for c in edge.manifest.cuts]
    return [ids[0], ids[len(ids) // 3], ids[2 * len(ids) // 3], ids[-2], ids[-1]]


def infer_one(
    stream: Stream, edge: EdgeClient, feeds: dict[str, np.ndarray], cut: str, **kwargs: Any
) -> pb.Answer:
    pending = edge.request(feeds, cut, **kwargs)
    stream.send(pending)
    return stream.recv(pending.binding.request_id)


def logits_of(
    edge: EdgeClient, stream: Stream, feeds: dict[str, np.ndarray], cut: str, **kwargs: Any
) -> np.ndarray:
    pending = edge.request(feeds, cut, **kwargs)
    stream.send(pending)
    answer = stream.recv(pending.binding.request_id)
    return edge.result(answer, pending)[edge.manifest.outputs[0].name]


def test_split_results_match_the_unsplit_model(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str]
) -> None:
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        for image in photos[:2]:
            want = edge.logits(image)
            for cut in cuts:
                got = logits_of(edge, stream, edge.frontier(image, cut), cut)
                np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"cut {cut}")
            quantized = logits_of(
                edge,
                stream,
                edge.frontier(image, cuts[2]),
                cuts[2],
                spec=codec.CodecSpec("int8", "channel", 3),
            )
            assert quantized.argmax() == want.argmax()
            jpeg = logits_of(
                edge,
                stream,
                edge.frontier(image, cuts[0]),
                cuts[0],
                spec=codec.CodecSpec("jpeg", jpeg_quality=90),
            )
            assert jpeg.argmax() == want.argmax()
        assert stream.close() == []


def run_clients(
    h: ServerHandle,
    edge: EdgeClient,
    feeds: list[dict[str, np.ndarray]],
    cut: str,
    streams: int = 8,
    per_stream: int = 4,
) -> tuple[list[np.ndarray], list[int]]:
    """`streams` concurrent streams, each with `per_stream` requests in flight at once."""

    def one_stream(s: int) -> list[tuple[int, np.ndarray, int]]:
        with h.channel() as ch:
            stream = Stream(h.stub(ch))
            sent = []
            for k in range(per_stream):
                index = (s * per_stream + k) % len(feeds)
                pending = edge.request(feeds[index], cut)
                stream.send(pending)
                sent.append((s * per_stream + k, pending))
            out = []
            for n, pending in sent:
                answer = stream.recv(pending.binding.request_id)
                logits = edge.result(answer, pending)[edge.manifest.outputs[0].name]
                out.append((n, logits, answer.timings.batch_size))
            stream.close()
            return out

    with ThreadPoolExecutor(streams) as pool:
        rows = sorted(r for part in pool.map(one_stream, range(streams)) for r in part)
    return [r[1] for r in rows], [r[2] for r in rows]


def test_concurrent_streams_batched_equal_unbatched(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str]
) -> None:
    cut = cuts[2]
    feeds = [edge.frontier(image, cut) for image in photos]
    with tail_server(max_batch=8, max_queue_delay_ms=20) as h:
        batched, sizes = run_clients(h, edge, feeds, cut)
        metrics = h.server.ctx.metrics.registry
        mode = "batched" if edge.manifest.batchable else "sequential"
        batches = metrics.get_sample_value(
            "edgecut_batch_size_count", {"model": edge.manifest.model, "mode": mode}
        )
    with tail_server(max_batch=1, max_queue_delay_ms=0) as h:
        single, single_sizes = run_clients(h, edge, feeds, cut)
    assert len(batched) == len(single) == 32
    assert max(sizes) > 1 and set(single_sizes) == {1}
    assert batches is not None and batches < 32  # requests really shared runs
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_every_bad_input_fails_only_its_request(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str], tmp_path: Path
) -> None:
    cut, other = cuts[2], cuts[1]
    feeds = edge.frontier(photos[0], cut)
    other_key = load_service_public(generate_keys(tmp_path / "other").service_pub)
    replayed = edge.request(feeds, cut)
    tampered = edge.request(feeds, cut)
    tampered.frames[0].sealed = bytes([tampered.frames[0].sealed[0] ^ 1]) + tampered.frames[0].sealed[1:]
    oversized = pb.Frame(
        request_id="huge",
        model=edge.manifest.model,
        version=edge.manifest.version,
        cut=cut,
        chunk_index=0,
        chunk_count=2,
        total_bytes=1 << 40,
        sealed=b"x",
    )
    cases: list[tuple[str, Any]] = [
        ("NOT_FOUND", edge.request(feeds, cut, model="no-such-model")),
        ("NOT_FOUND", edge.request(feeds, cut, version="99")),
        ("NOT_FOUND", edge.request(feeds, "no-such-cut")),
        ("UNAUTHENTICATED", tampered),
        ("UNAUTHENTICATED", edge.request(feeds, cut, public=other_key)),
        ("OK", replayed),
        ("UNAUTHENTICATED", replayed),
        ("INVALID_ARGUMENT", edge.request(feeds, other)),  # shape of another cut
        ("INVALID_ARGUMENT", edge.request(feeds, cut, payload=b"not a codec frame")),
        ("RESOURCE_EXHAUSTED", [oversized]),
        ("DEADLINE_EXCEEDED", edge.request(feeds, cut, deadline_ms=now_ms() - 1000)),
    ]
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        for expected, pending in cases:
            stream.send(pending)
            rid = pending[0].request_id if isinstance(pending, list) else pending.binding.request_id
            answer = stream.recv(rid)
            assert answer.code == CODE[expected], (expected, answer.message)
            assert answer.message or expected == "OK"
            good = infer_one(stream, edge, feeds, cut)
            assert good.code == OK, f"after {expected}: {good.message}"
        assert stream.close() == []
        requests = h.server.ctx.metrics.registry.get_sample_value(
            "edgecut_requests_total", {"model": "unknown", "status": "NOT_FOUND"}
        )
        assert requests == 1


def test_unknown_names_are_listed_in_the_error(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str]
) -> None:
    feeds = edge.frontier(photos[0], cuts[2])
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        assert edge.manifest.model in infer_one(stream, edge, feeds, cuts[2], model="x").message
        assert cuts[2] in infer_one(stream, edge, feeds, "zz").message
        stream.close()


def test_full_queue_is_refused_fast_and_expired_work_is_not_computed(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str]
) -> None:
    cut = cuts[2]
    feeds = edge.frontier(photos[0], cut)
    gated = GatedExecutor()
    with tail_server(executor=gated, max_batch=1, max_queue=1, max_queue_delay_ms=0) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        first = edge.request(feeds, cut)
        stream.send(first)
        assert gated.entered.wait(10)  # the first request is in compute, holding the lane
        queued = edge.request(feeds, cut, deadline_ms=now_ms() + 300)
        refused = edge.request(feeds, cut)
        stream.send(queued)
        assert _queued(h) == 1
        stream.send(refused)
        assert stream.recv(refused.binding.request_id).code == CODE["RESOURCE_EXHAUSTED"]
        wait_for(lambda: now_ms() > queued.frames[0].deadline_ms)
        gated.gate.set()
        assert stream.recv(first.binding.request_id).code == OK
        assert stream.recv(queued.binding.request_id).code == CODE["DEADLINE_EXCEEDED"]
        assert gated.runs == 1  # the expired request was dropped, not computed
        assert infer_one(stream, edge, feeds, cut).code == OK
        stream.close()


def _queued(h: ServerHandle) -> int:
    """Requests waiting in the server's lanes (read on the server's loop)."""

    async def count() -> int:
        return sum(lane.queue.qsize() for lane in h.server.ctx.batcher._lanes.values())

    wait_for(lambda: h.call(count()) > 0, 10)
    return int(h.call(count()))


def test_device_tokens(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# token device models\ntok-a cam-1\ntok-b cam-2 other-model,{edge.manifest.model}x\n")
    tokens.chmod(0o600)
    feeds = edge.frontier(photos[0], cuts[2])
    with tail_server(tokens=tokens) as h, h.channel() as ch:
        stub = h.stub(ch)
        with pytest.raises(grpc.RpcError) as missing:
            infer_one(Stream(stub), edge, feeds, cuts[2])
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ServerInfo(pb.ServerInfoRequest(), metadata=[("authorization", "Bearer nope")])
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        limited = Stream(stub, metadata=[("authorization", "Bearer tok-b")])
        b = device_identity("tok-b")
        assert infer_one(limited, edge, feeds, cuts[2], identity=b).code == CODE["PERMISSION_DENIED"]
        limited.close()
        allowed = Stream(stub, metadata=[("authorization", "Bearer tok-a")])
        assert infer_one(allowed, edge, feeds, cuts[2], identity=device_identity("tok-a")).code == OK
        allowed.close()


def test_health_reflection_server_info_probe_metrics(
    tail_server: Any, edge: EdgeClient, keys: KeyPaths
) -> None:
    model = edge.manifest.model
    with tail_server(metrics_port=0) as h, h.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", model):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(listed).list_services_response.service}
        assert {"edgecut.v1.TailService", "grpc.health.v1.Health"} <= names

        info = h.stub(ch).ServerInfo(pb.ServerInfoRequest())
        assert info.key_id == key_id(load_service_public(keys.service_pub))
        assert info.key_suite == "x25519" and info.device.startswith("cpu")
        assert info.max_message_bytes > 0 and info.server_version
        (served,) = info.models
        assert (served.name, served.version) == (model, edge.manifest.version)
        assert [c.id for c in served.cuts] == [c.id for c in edge.manifest.cuts]
        assert len(served.cuts[0].tail) == len(edge.manifest.segments)
        assert all(p.latency_ms > 0 for p in served.cuts[0].tail)
        assert list(served.cuts[-1].tail) == []

        probe = h.stub(ch).Probe(pb.ProbeRequest(payload=b"x" * 1000, reply_bytes=5000))
        assert len(probe.payload) == 5000 and abs(probe.server_time_ms - now_ms()) < 5000
        capped = h.stub(ch).Probe(pb.ProbeRequest(reply_bytes=1 << 30))
        assert len(capped.payload) <= h.server.ctx.config.max_probe_bytes
        assert h.server.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{h.server.metrics_port}/metrics").read()
        assert b"# TYPE edgecut_queue_seconds histogram" in text


def test_hot_add_and_remove_a_version(
    tail_server: Any, edge: EdgeClient, bundles_dir: Path, photos: list[np.ndarray], cuts: list[str]
) -> None:
    cut = cuts[2]
    feeds = edge.frontier(photos[0], cut)
    gated = GatedExecutor()
    gated.gate.set()
    v2 = bundles_dir / "effl0-v2"
    try:
        with tail_server(executor=gated, poll_interval_s=0.1) as h, h.channel() as ch:
            stub, stream = h.stub(ch), Stream(h.stub(ch))
            with_version(bundles_dir / "effl0", v2, "2")
            wait_for(lambda: len(stub.ServerInfo(pb.ServerInfoRequest()).models) == 2)
            assert infer_one(stream, edge, feeds, cut, version="2").code == OK
            assert infer_one(stream, edge, feeds, cut, version="").code == OK  # newest
            gated.gate.clear()
            gated.entered.clear()
            held = edge.request(feeds, cut, version="2")
            stream.send(held)
            assert gated.entered.wait(10)  # v2 is in compute
            shutil.rmtree(v2)
            wait_for(lambda: len(stub.ServerInfo(pb.ServerInfoRequest()).models) == 1)
            assert infer_one(stream, edge, feeds, cut, version="2").code == CODE["NOT_FOUND"]
            assert gated.evicted == []  # retired, but not drained yet
            gated.gate.set()
            assert stream.recv(held.binding.request_id).code == OK
            wait_for(lambda: gated.evicted == [f"{edge.manifest.model}:2"])
            assert infer_one(stream, edge, feeds, cut).code == OK
            stream.close()
    finally:
        shutil.rmtree(v2, ignore_errors=True)


def test_a_bundle_that_fails_to_verify_is_skipped(
    tail_server: Any, edge: EdgeClient, bundles_dir: Path
) -> None:
    broken = bundles_dir / "broken"
    try:
        with_version(bundles_dir / "effl0", broken, "3")
        segment = broken / edge.manifest.segments[-1].file
        segment.write_bytes(segment.read_bytes() + b"\0")
        with tail_server() as h, h.channel() as ch:
            info = h.stub(ch).ServerInfo(pb.ServerInfoRequest())
            assert [m.version for m in info.models] == [edge.manifest.version]
    finally:
        shutil.rmtree(broken, ignore_errors=True)


def test_a_vanishing_client_leaks_nothing(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str]
) -> None:
    cut = cuts[2]
    feeds = edge.frontier(photos[0], cut)
    gated = GatedExecutor()

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    with tail_server(executor=gated) as h, h.channel() as ch:
        baseline = h.call(tasks())
        stream = Stream(h.stub(ch))
        stream.send(edge.request(feeds, cut))
        partial = edge.request(feeds, cut)
        stream.send(
            [
                partial.frames[0].__class__(
                    request_id="partial",
                    model=edge.manifest.model,
                    cut=cut,
                    chunk_index=0,
                    chunk_count=3,
                    total_bytes=300,
                    sealed=b"x" * 100,
                )
            ]
        )
        assert gated.entered.wait(10)
        stream.cancel()
        wait_for(lambda: h.call(tasks()) <= baseline + 1)  # + the lane's idle batch worker
        gated.gate.set()
        with h.channel() as ch2:
            fresh = Stream(h.stub(ch2))
            assert infer_one(fresh, edge, feeds, cut).code == OK
            fresh.close()
        assert gated.runs == 2  # the vanished request was computed (already running), not answered


def test_sigterm_drains_in_flight_requests(
    bundles_dir: Path, keys: KeyPaths, edge: EdgeClient, photos: list[np.ndarray], cuts: list[str]
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "edgecut.cli",
        "cloud",
        "serve",
        "--bundles",
        str(bundles_dir),
        "--service-key",
        str(keys.service_key),
        "--port",
        "0",
        "--threads",
        "1",
        "--poll-interval-s",
        "0",
        "--max-batch",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("listening "), line + (proc.stderr.read() if proc.stderr else "")
        address = line.split()[1]
        feeds = edge.frontier(photos[0], cuts[0])
        with grpc.insecure_channel(address) as ch:
            from edgecut.v1 import edgecut_pb2_grpc

            stream = Stream(edgecut_pb2_grpc.TailServiceStub(ch))
            sent = [edge.request(feeds, cuts[0]) for _ in range(8)]
            for pending in sent:
                stream.send(pending)
            assert stream.recv().code == OK
            proc.send_signal(signal.SIGTERM)
            rest = stream.close()
        assert len(rest) == 7 and all(a.code == OK for a in rest)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
