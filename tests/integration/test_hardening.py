"""Regression tests for the holes of issue 12, one group per hole, against a real tail service.

Each test here failed on the code before the fix (most because the limit or check did not exist:
the frame was accepted, the port shared, the file loaded, the token refused or the error escaped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support import EdgeClient, ServerHandle, Stream
from test_cloud_robustness import decode_threads as decode_threads  # a fixture
from test_cloud_robustness import queued, recv
from test_cloud_service import CODE, OK, GatedExecutor, infer_one, wait_for

from edgecut import codec, framing, sealing
from edgecut.bundle import load_bundle, write_manifest
from edgecut.cloud.config import ServeConfig, load_tokens
from edgecut.cloud.executor import OrtExecutor
from edgecut.edge.agent import image_input
from edgecut.edge.session import SessionConfig, TailSession
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.errors import AddressInUseError, BundleError, DeadlineError, SealError, UsageError
from edgecut.keys import KeyPaths, load_service_public
from edgecut.runtime import OrtOptions
from edgecut.v1 import edgecut_pb2 as pb

RAW = codec.CodecSpec("none", zstd_level=1)


@pytest.fixture(scope="module")
def cut_ids(edge: EdgeClient) -> list[str]:
    return [c.id for c in edge.manifest.cuts]


@pytest.fixture(scope="module")
def deep(cut_ids: list[str]) -> str:
    return cut_ids[2 * len(cut_ids) // 3]


@pytest.fixture(scope="module")
def feeds(edge: EdgeClient, photos: list[np.ndarray], deep: str) -> dict[str, np.ndarray]:
    return edge.frontier(photos[0], deep)


def zeros(edge: EdgeClient, rows: int) -> dict[str, np.ndarray]:
    spec = edge.manifest.cuts[0].frontier[0]
    return {spec.name: np.zeros((rows, *spec.shape[1:]), spec.dtype)}


@pytest.fixture
def service_log(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[logging.LogRecord]]]:
    """The records of edgecut.cloud.service at DEBUG and up, once each, whatever else the run
    did to logger propagation (the CLI turns it off for its own handler)."""
    logger = logging.getLogger("edgecut.cloud.service")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    yield lambda: list({id(r): r for r in caplog.records if r.name == logger.name}.values())
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# 1. Amplification: rows per request capped before decoding, a global decoded-bytes budget.


def test_a_row_bomb_is_refused_before_decoding(
    tail_server: Any, edge: EdgeClient, decode_threads: list[int]
) -> None:
    pending = edge.request(zeros(edge, 8), "input", spec=RAW)  # 4.8 MB of rows in a few KB
    assert sum(len(f.sealed) for f in pending.frames) < 64 << 10
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        stream.send(pending)
        answer = recv(stream, pending.binding.request_id)
        stream.close()
    assert answer.code == CODE["RESOURCE_EXHAUSTED"], answer.message
    assert "carries 8 rows" in answer.message and "at most 1 per request" in answer.message
    assert decode_threads == []


def test_rows_count_against_max_batch(tail_server: Any, edge: EdgeClient) -> None:
    gated = GatedExecutor()
    config = {"max_batch": 4, "max_rows_per_request": 3, "max_queue_delay_ms": 500}
    with tail_server(executor=gated, **config) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        first = edge.request(zeros(edge, 1), "input", spec=RAW)
        stream.send(first)
        assert gated.entered.wait(20)  # held in compute while the next two queue
        three = [edge.request(zeros(edge, 3), "input", spec=RAW) for _ in range(2)]
        for pending in three:
            stream.send(pending)
        wait_for(lambda: queued(h) == 2)
        gated.gate.set()
        answers = [recv(stream, p.binding.request_id) for p in [first, *three]]
        stream.close()
    assert [a.code for a in answers] == [OK] * 3
    assert [a.timings.batch_size for a in answers[1:]] == [1, 1]  # 3 + 3 rows > max_batch 4


def test_the_decoded_bytes_budget_is_shared_by_all_streams(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str
) -> None:
    one = sum(v.size for v in feeds.values()) * 4  # decoded as float32
    gated = GatedExecutor()
    with tail_server(executor=gated, max_decoded_total_bytes=one * 3 // 2) as h, h.channel() as ch:
        a, b = Stream(h.stub(ch)), Stream(h.stub(ch))
        held = edge.request(feeds, deep)
        a.send(held)
        assert gated.entered.wait(20)
        refused = infer_one(b, edge, feeds, deep)
        assert refused.code == CODE["RESOURCE_EXHAUSTED"]
        assert "decoded-bytes budget" in refused.message
        gated.gate.set()
        assert recv(a, held.binding.request_id).code == OK
        assert infer_one(b, edge, feeds, deep).code == OK  # released once answered
        a.close()
        b.close()


# 2. Silent port sharing: SO_REUSEPORT off, one clear error line.


def test_a_second_server_on_a_busy_port_is_refused(tail_server: Any) -> None:
    with (
        tail_server() as h,
        pytest.raises(AddressInUseError, match=f"127.0.0.1:{h.port}"),
        tail_server(port=h.port),
    ):
        pass


def _serve(bundles_dir: Path, keys: KeyPaths, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgecut.cli", "cloud", "serve", "--bundles", str(bundles_dir)]
    cmd += ["--service-key", str(keys.service_key), "--threads", "1", "--poll-interval-s", "0", *flags]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_cli_busy_ports_give_one_error_line(tail_server: Any, bundles_dir: Path, keys: KeyPaths) -> None:
    with tail_server() as h:
        busy = _serve(bundles_dir, keys, "--port", str(h.port))
    assert busy.returncode == 1, busy.stdout + busy.stderr
    assert busy.stdout == "" and "Traceback" not in busy.stderr
    errors = [ln for ln in busy.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot listen on 127.0.0.1:{h.port}")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        metrics = _serve(bundles_dir, keys, "--port", "0", "--metrics-port", str(held.getsockname()[1]))
    assert metrics.returncode == 1, metrics.stdout + metrics.stderr
    assert "Traceback" not in metrics.stderr and "listening" not in metrics.stdout
    errors = [ln for ln in metrics.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot serve metrics" in errors[0]


# 3. Bundle files: every referenced file listed and contained; ORT gets the hashed bytes.


@pytest.fixture
def bundle_copy(effl0_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(effl0_bundle, tmp_path / "b"))


def test_a_referenced_file_missing_from_files_is_refused(bundle_copy: Path) -> None:
    manifest = load_bundle(bundle_copy).manifest
    rel = manifest.segments[3].file
    write_manifest(
        bundle_copy,
        dataclasses.replace(manifest, files={k: v for k, v in manifest.files.items() if k != rel}),
    )
    with pytest.raises(BundleError, match=f"'{rel}' is used by the manifest but not listed"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_file_outside_the_bundle_is_refused(bundle_copy: Path, tmp_path: Path, how: str) -> None:
    outside = tmp_path / "labels.json"
    outside.write_text(json.dumps(["x"]))
    rel = {"dotdot": "../labels.json", "absolute": str(outside), "symlink": "labels-link.json"}[how]
    if how == "symlink":
        (bundle_copy / rel).symlink_to(outside)
    manifest = load_bundle(bundle_copy).manifest
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    write_manifest(
        bundle_copy, dataclasses.replace(manifest, labels_file=rel, files={**manifest.files, rel: digest})
    )
    with pytest.raises(BundleError, match=f"'{rel}'"):
        load_bundle(bundle_copy)


def test_a_segment_swapped_after_loading_is_never_run(bundle_copy: Path, edge: EdgeClient) -> None:
    bundle = load_bundle(bundle_copy)
    m = bundle.manifest
    executor = OrtExecutor(OrtOptions(threads=1), cache_size=1)  # every run re-creates sessions
    last = m.cuts[-2]
    frontier = {t.name: np.zeros(t.shape, t.dtype) for t in last.frontier}
    assert set(executor.run(bundle, last.id, frontier)) == {o.name for o in m.outputs}
    victim = bundle_copy / m.segments[-1].file
    victim.write_bytes((bundle_copy / m.segments[-2].file).read_bytes())  # a valid, other model
    executor.evict(bundle)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        executor.run(bundle, last.id, frontier)


# 4. Tokens: hashed, compared in constant time, private file, loud about plaintext.


def test_tokens_may_be_stored_hashed(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str, tmp_path: Path
) -> None:
    digest = hashlib.sha256(b"s3cret-token").hexdigest()
    tokens = private_file(tmp_path / "tokens.txt", f"sha256:{digest} cam-1\n")
    assert "s3cret" not in tokens.read_text()
    with tail_server(tokens=tokens) as h, h.channel() as ch:
        stream = Stream(h.stub(ch), metadata=[("authorization", "Bearer s3cret-token")])
        identity = sealing.device_identity("s3cret-token")
        assert infer_one(stream, edge, feeds, deep, identity=identity).code == OK
        stream.close()


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("tok-a cam-1\n")
    tokens.chmod(0o644)
    with pytest.raises(UsageError, match="accessible to group or others") as info:
        load_tokens(tokens)
    assert info.value.hint == f"chmod 600 {tokens}" and "tok-a" not in str(info.value)


def test_tokens_over_plaintext_are_warned_about(tail_server: Any, tmp_path: Path, service_log: Any) -> None:
    tokens = private_file(tmp_path / "tokens.txt", "tok-a cam-1\n")
    with tail_server(tokens=tokens):
        pass
    warned = [r for r in service_log() if r.levelno == logging.WARNING and "INSECURE" in r.getMessage()]
    assert len(warned) == 1


# 5. The authenticated device is bound into the seal: no replay under another device's token.


def test_a_frame_does_not_replay_under_another_devices_token(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str, tmp_path: Path
) -> None:
    tokens = private_file(tmp_path / "tokens.txt", "tok-a cam-1\ntok-b cam-2\n")
    captured = edge.request(feeds, deep, identity=sealing.device_identity("tok-a"))
    with tail_server(tokens=tokens) as h, h.channel() as ch:
        thief = Stream(h.stub(ch), metadata=[("authorization", "Bearer tok-b")])
        thief.send(captured)
        answer = recv(thief, captured.binding.request_id)
        assert answer.code == CODE["UNAUTHENTICATED"] and "did not open" in answer.message
        owner = Stream(h.stub(ch), metadata=[("authorization", "Bearer tok-a")])
        owner.send(captured)
        assert recv(owner, captured.binding.request_id).code == OK
        info = h.stub(ch).ServerInfo(pb.ServerInfoRequest(), metadata=[("authorization", "Bearer tok-b")])
        assert info.identity == sealing.device_identity("tok-b")
        thief.close()
        owner.close()


# 6. Answer metadata and the frame's deadline / sent-at are authenticated.


def test_a_stretched_deadline_does_not_open(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str
) -> None:
    pending = edge.request(feeds, deep, deadline_ms=time.time_ns() // 1_000_000 + 1000)
    pending.frames[0].deadline_ms += 60_000  # a man in the middle buying the request more time
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        assert infer_one(stream, edge, feeds, deep).code == OK
        stream.send(pending)
        assert recv(stream, pending.binding.request_id).code == CODE["UNAUTHENTICATED"]
        stream.close()


def test_answer_status_and_timings_are_authenticated(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str
) -> None:
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        pending = edge.request(feeds, deep)
        stream.send(pending)
        answer = recv(stream, pending.binding.request_id)
        bomb = edge.request(zeros(edge, 2), "input", spec=RAW)
        stream.send(bomb)
        refused = recv(stream, bomb.binding.request_id)
        stream.close()
    assert edge.result(answer, pending)  # opens as sent
    for change in (
        lambda a: setattr(a.timings, "queue_ms", a.timings.queue_ms + 500),
        lambda a: setattr(a, "server_queue_delay_ms", 1e6),
        lambda a: setattr(a, "sent_at_ms", a.sent_at_ms - 1000),
    ):
        forged = pb.Answer()
        forged.CopyFrom(answer)
        change(forged)
        with pytest.raises(SealError, match="did not open"):
            edge.result(forged, pending)
    # A refusal after the request opened is authenticated too: its code and message cannot change.
    assert refused.code == CODE["RESOURCE_EXHAUSTED"] and refused.sealed
    meta = framing.answer_meta(refused)
    assert sealing.open_response(bomb.response_key, bomb.binding, refused.sealed, meta) == b""
    forged_meta = dataclasses.replace(meta, code=CODE["INVALID_ARGUMENT"])
    with pytest.raises(SealError):
        sealing.open_response(bomb.response_key, bomb.binding, refused.sealed, forged_meta)


# 7. Probe replies are capped relative to the request and rate limited; fields capped; quiet logs.


def test_probe_replies_are_capped_relative_to_the_request(tail_server: Any) -> None:
    with tail_server() as h, h.channel() as ch:
        stub = h.stub(ch)
        tiny = stub.Probe(pb.ProbeRequest(reply_bytes=4 << 20))
        assert len(tiny.payload) == 4096
        fair = stub.Probe(pb.ProbeRequest(payload=bytes(16 << 10), reply_bytes=4 << 20))
        assert len(fair.payload) == 256 << 10  # 16 x the upload


def test_probes_are_rate_limited_per_peer(tail_server: Any) -> None:
    with tail_server(probe_bytes_per_s=20_000, max_probe_bytes=16 << 10) as h, h.channel() as ch:
        stub = h.stub(ch)
        codes = []
        for _ in range(20):
            try:
                stub.Probe(pb.ProbeRequest(payload=bytes(1024), reply_bytes=16 << 10))
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    assert codes[0] == "OK" and "RESOURCE_EXHAUSTED" in codes


def test_bad_frames_are_not_logged_one_info_line_each(tail_server: Any, service_log: Any) -> None:
    bad = [pb.Frame(request_id=f"evil-{i}\n{'x' * 300}", chunk_index=1) for i in range(40)]
    with tail_server() as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        stream.send(bad)
        answers = [stream.recv() for _ in bad]
        stream.close()
    assert all(a.code == CODE["INVALID_ARGUMENT"] and len(a.request_id) <= 256 for a in answers)
    assert all("longer than 256 bytes" in a.message for a in answers)
    service = service_log()
    assert len([r for r in service if r.levelno == logging.DEBUG and "longer than" in r.getMessage()]) == 40
    assert len([r for r in service if r.levelno >= logging.INFO and "request failed" in r.getMessage()]) == 1
    assert all("\n" not in r.getMessage() for r in service)  # client strings only as repr


# 8. Server-wide and per-device limits; a cancel frame frees the queue.


def _open(h: ServerHandle, ch: grpc.Channel, edge: EdgeClient, feeds: Any, deep: str, **kw: Any) -> Stream:
    stream = Stream(h.stub(ch), **kw)
    assert infer_one(stream, edge, feeds, deep).code == OK  # the call is live on the server
    return stream


def test_concurrent_calls_are_capped_server_wide(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str
) -> None:
    with tail_server(max_concurrent_rpcs=2) as h, h.channel() as ch:
        streams = [_open(h, ch, edge, feeds, deep) for _ in range(2)]
        with pytest.raises(grpc.RpcError) as refused:
            h.stub(ch).ServerInfo(pb.ServerInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for s in streams:
            s.close()


def test_streams_per_device_are_capped(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str
) -> None:
    with tail_server(max_streams_per_device=1) as h, h.channel() as ch:
        first = _open(h, ch, edge, feeds, deep)
        with pytest.raises(grpc.RpcError) as refused:
            infer_one(Stream(h.stub(ch)), edge, feeds, deep)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "open Infer streams" in (refused.value.details() or "")
        first.close()
        wait_for(lambda: h.server.ctx.limits.streams.held(sealing.ANONYMOUS) == 0)
        _open(h, ch, edge, feeds, deep).close()


def test_requests_in_progress_per_device_are_capped(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str
) -> None:
    gated = GatedExecutor()
    with tail_server(executor=gated, max_in_flight_per_device=1) as h, h.channel() as ch:
        a, b = Stream(h.stub(ch)), Stream(h.stub(ch))
        held = edge.request(feeds, deep)
        a.send(held)
        assert gated.entered.wait(20)
        refused = infer_one(b, edge, feeds, deep)  # another stream: the cap is per device
        assert refused.code == CODE["RESOURCE_EXHAUSTED"] and "requests in progress" in refused.message
        gated.gate.set()
        assert recv(a, held.binding.request_id).code == OK
        a.close()
        b.close()


def test_a_cancel_frame_removes_a_queued_request(
    tail_server: Any, edge: EdgeClient, feeds: dict[str, np.ndarray], deep: str
) -> None:
    gated = GatedExecutor()
    with tail_server(executor=gated, max_batch=1) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        computing, abandoned = edge.request(feeds, deep), edge.request(feeds, deep)
        stream.send(computing)
        assert gated.entered.wait(20)
        stream.send(abandoned)
        wait_for(lambda: queued(h) == 1)
        stream.send([framing.cancel_frame(abandoned.binding.request_id)])
        assert recv(stream, abandoned.binding.request_id).code == CODE["CANCELLED"]
        assert queued(h) == 0
        gated.gate.set()
        assert recv(stream, computing.binding.request_id).code == OK
        assert stream.close() == []  # exactly one answer each
    assert gated.runs == 1  # the abandoned request was never computed


def test_the_edge_cancels_a_request_it_gave_up_on(
    tail_server: Any, edge: EdgeClient, keys: KeyPaths, feeds: dict[str, np.ndarray], deep: str
) -> None:
    gated = GatedExecutor()
    with tail_server(executor=gated, max_batch=1) as h:
        m = edge.manifest
        config = SessionConfig(
            f"127.0.0.1:{h.port}", load_service_public(keys.service_pub), m.model, m.version, deadline_ms=300
        )
        session = TailSession(config)
        session.connect()
        payload = codec.encode(feeds, m.cut(deep).frontier, RAW)
        tickets = [session.submit(deep, payload) for _ in range(2)]
        for ticket in tickets:
            with pytest.raises(DeadlineError):
                session.wait(ticket)
        registry = h.server.ctx.metrics.registry
        labels = {"model": "unknown", "status": "CANCELLED"}  # a cancel names only the request
        wait_for(lambda: registry.get_sample_value("edgecut_requests_total", labels) == 2)
        assert queued(h) == 0
        gated.gate.set()
        session.close()


# 9. --min-cut on both sides; a failing local fallback still yields one failed result.


@pytest.mark.parametrize("min_cut", ["c05", "5"])
def test_the_edge_refuses_a_fixed_cut_shallower_than_min_cut(
    effl0_bundle: Path, keys: KeyPaths, min_cut: str
) -> None:
    config = EdgeConfig(
        effl0_bundle, "127.0.0.1:9", keys.service_pub, cut="c02", min_cut=min_cut, threads=1, fallback="local"
    )
    with pytest.raises(UsageError, match="shallower than --min-cut"), start_agent(config):
        pass


def test_the_server_refuses_cuts_below_its_minimum(
    tail_server: Any, edge: EdgeClient, photos: list[np.ndarray], tmp_path: Path, keys: KeyPaths
) -> None:
    toml = tmp_path / "serve.toml"
    model = edge.manifest.model
    toml.write_text(f'bundles = "."\nkey = "{keys.service_key}"\n[min_cut]\n"{model}" = "c05"\n')
    assert dict(ServeConfig.from_toml(toml).min_cut) == {edge.manifest.model: "c05"}
    with tail_server(min_cut={edge.manifest.model: "c05"}) as h, h.channel() as ch:
        stream = Stream(h.stub(ch))
        shallow = infer_one(stream, edge, edge.frontier(photos[0], "c02"), "c02")
        assert shallow.code == CODE["PERMISSION_DENIED"] and "minimum depth 5" in shallow.message
        assert infer_one(stream, edge, edge.frontier(photos[0], "c05"), "c05").code == OK
        stream.close()


def test_a_failing_local_fallback_yields_one_failed_result(
    effl0_bundle: Path, keys: KeyPaths, photos: list[np.ndarray]
) -> None:
    config = EdgeConfig(effl0_bundle, "127.0.0.1:9", keys.service_pub, cut="c05", threads=1, fallback="local")
    results: list[Any] = []
    with start_agent(config) as agent:
        real = agent.tail.run

        def broken_tail(feeds: Any, first: int, last: int, *precision: str) -> Any:
            if first > 0:  # the local tail, not the head
                raise RuntimeError("tail runtime crashed")
            return real(feeds, first, last, *precision)

        agent.tail.run = broken_tail  # type: ignore[method-assign]
        assert agent.run([image_input(i, f"p{i}", p) for i, p in enumerate(photos[:2])], results.append) == 2
    assert [r.where for r in results] == ["failed", "failed"]
    assert all("local fallback: RuntimeError: tail runtime crashed" in r.error for r in results)
