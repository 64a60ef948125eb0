"""The tail service behind Ray Serve's gRPC proxy: a real local Ray cluster, real sealed frames.

One cluster for the module (starting Ray costs ~20 s here): two CPUs, one app with device tokens,
an autoscaled deployment of 1..2 replicas. Requests go through the proxy as a bidirectional
`Infer` stream exactly as an edge sends them, and the answers must match the unsplit model.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support import EdgeClient, Stream

from edgecut import framing, sealing
from edgecut.cli import main
from edgecut.errors import UsageError
from edgecut.keys import KeyPaths, key_id, load_service_public
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'edgecut[ray]')")
ray = pytest.importorskip("ray")

from edgecut.cloud import ray_serve  # noqa: E402  (after the skip: it needs nothing, its app needs Ray)

TOKEN = "ray-device-token"
CODE = {s.name: s.value[0] for s in grpc.StatusCode}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_port(bundles_dir: Path, keys: KeyPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tokens = tmp_path_factory.mktemp("ray") / "tokens"
    tokens.write_text(f"{TOKEN} edge-1\n")
    tokens.chmod(0o600)  # a readable tokens file is refused (it may have leaked)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            grpc_options=ray_serve.grpc_options(port), http_options={"host": "127.0.0.1", "port": free_port()}
        )
        args = {  # strings, as `serve run … k=v` passes them
            "bundles": str(bundles_dir),
            "key": str(keys.service_key),
            "tokens": str(tokens),
            "threads": "1",
            "warmup_runs": "0",
            "max_queue_delay_ms": "5",
            "min_replicas": "1",
            "max_replicas": "2",
            "num_cpus": "0.5",
        }
        serve.run(ray_serve.build_app(args), name=ray_serve.APP_NAME)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def stub(ray_port: int) -> Iterator[edgecut_pb2_grpc.TailServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{ray_port}", options=framing.grpc_options()) as channel:
        yield edgecut_pb2_grpc.TailServiceStub(channel)


AUTH = (("authorization", f"Bearer {TOKEN}"),)
IDENTITY = sealing.device_identity(TOKEN)  # what the edge binds into the seal, as under `cloud serve`


def test_sealed_stream_through_ray_matches_the_unsplit_model(
    stub: Any, edge: EdgeClient, photos: list[np.ndarray]
) -> None:
    ids = [c.id for c in edge.manifest.cuts]
    cuts = [ids[len(ids) // 3], ids[2 * len(ids) // 3], ids[-1]]
    stream = Stream(stub, metadata=AUTH)
    sent = [(edge.request(edge.frontier(p, cut), cut, identity=IDENTITY), p) for cut in cuts for p in photos]
    for pending, _ in sent:  # all in flight at once: the replica batches them
        stream.send(pending)
    batch_sizes = []
    for pending, photo in sent:
        answer = stream.recv(pending.binding.request_id)
        got = edge.result(answer, pending)[edge.manifest.outputs[0].name]
        np.testing.assert_allclose(got, edge.logits(photo), atol=1e-4, err_msg=pending.binding.cut)
        batch_sizes.append(answer.timings.batch_size)
    assert stream.close() == []
    assert max(batch_sizes) > 1, "requests in flight together should share a batch in the replica"


def test_bad_request_fails_alone_and_the_stream_goes_on(
    stub: Any, edge: EdgeClient, photos: list[np.ndarray]
) -> None:
    cut = edge.manifest.cuts[-1].id
    stream = Stream(stub, metadata=AUTH)
    bad = edge.request(edge.frontier(photos[0], cut), cut, model="no-such-model", identity=IDENTITY)
    anonymous = edge.request(edge.frontier(photos[0], cut), cut)  # sealed for no token: not this caller
    good = edge.request(edge.frontier(photos[0], cut), cut, identity=IDENTITY)
    stream.send(bad)
    stream.send(anonymous)
    stream.send(good)
    assert stream.recv(bad.binding.request_id).code == CODE["NOT_FOUND"]
    refused = stream.recv(anonymous.binding.request_id)
    assert refused.code == CODE["UNAUTHENTICATED"] and "did not open" in refused.message
    assert edge.result(stream.recv(good.binding.request_id), good)
    stream.close()


def test_missing_token_is_refused_with_unauthenticated(stub: Any, edge: EdgeClient) -> None:
    stream = Stream(stub)
    stream.send(edge.request(edge.frontier(np.zeros((64, 64, 3), np.uint8), "output"), "output"))
    with pytest.raises(grpc.RpcError) as info:
        stream.recv()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        stub.ServerInfo(pb.ServerInfoRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_server_info_and_probe_through_ray(stub: Any, keys: KeyPaths, edge: EdgeClient) -> None:
    info = stub.ServerInfo(pb.ServerInfoRequest(), metadata=AUTH)
    assert info.identity == IDENTITY  # the replica identifies the caller by its token
    assert [m.name for m in info.models] == [edge.manifest.model]
    assert info.key_id == key_id(load_service_public(keys.service_pub))
    assert (
        len(stub.Probe(pb.ProbeRequest(payload=b"x" * 1000, reply_bytes=2000), metadata=AUTH).payload) == 2000
    )


def test_bad_app_arguments_fail_before_any_replica_starts(
    bundles_dir: Path, keys: KeyPaths, tmp_path: Path
) -> None:
    base = {"bundles": str(bundles_dir), "key": str(keys.service_key)}
    with pytest.raises(UsageError, match="max_batch"):
        ray_serve.build_app({**base, "max_batch": "0"})
    with pytest.raises(UsageError, match=r"replicas 3\.\.1"):
        ray_serve.build_app({**base, "min_replicas": "3", "max_replicas": "1"})
    with pytest.raises(UsageError, match="threads"):
        ray_serve.build_app({**base, "threads": "many"})
    with pytest.raises(UsageError, match="Prometheus"):  # replicas would ignore it silently
        ray_serve.build_app({**base, "metrics_port": 9100})
    with pytest.raises(UsageError, match="max_concurrent_rpcs"):
        ray_serve.build_app({**base, "max_concurrent_rpcs": "10"})
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} edge-1\n")
    tokens.chmod(0o644)
    with pytest.raises(UsageError, match="accessible to group or others"):  # not a replica crash
        ray_serve.build_app({**base, "tokens": str(tokens)})


def test_cli_rejects_bad_ray_flags_with_one_line(
    bundles_dir: Path, keys: KeyPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["cloud", "serve", "--ray", "--bundles", str(bundles_dir), "--service-key", str(keys.service_key)]
    assert main([*argv, "--ray-replicas", "four"]) == 2
    assert "error: --ray-replicas 'four': expected MIN:MAX" in capsys.readouterr().err
