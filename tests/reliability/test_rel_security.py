"""Security properties of the running system (issue 12): nothing readable on the wire, mTLS and
tokens enforced, bundles verified on both sides, no key material in any log."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from relkit import CALM_CUT, Service, Tap, contains_any_window, infer_all, spawned_service, status_name
from support import EdgeClient, running_server, serve_config
from test_tls import pki  # noqa: F401  (a throwaway CA, server and device certificates)

from edgecut import codec, sealing
from edgecut.bundle import load_bundle, write_manifest
from edgecut.edge.agent import image_input
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.errors import IntegrityError
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths, load_service_private, load_signing_private
from edgecut.netem import LinkConfig, ThreadedLinkEmulator, parse_address
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

OTHER_MODEL = "other-model"


def renamed(src: Path, dst: Path, model: str, signing_key: Any = None) -> Path:
    """A copy of a bundle served under another model name (optionally signed)."""
    shutil.copytree(src, dst)
    (dst / "manifest.sig").unlink(missing_ok=True)
    write_manifest(dst, dataclasses.replace(load_bundle(dst).manifest, model=model), signing_key)
    return dst


# ---------------------------------------------------------------- the wire


def test_no_plaintext_activation_bytes_on_the_wire(
    service: Service, rel_edge: EdgeClient, rel_keys: KeyPaths
) -> None:
    """Capture what the link emulator forwards while the agent works: no codec frame, no zstd
    frame, no window of the encoded or raw activations; but the (plaintext) routing fields are
    there, which shows the capture sees the traffic."""
    payloads: list[bytes] = []
    frontiers: list[bytes] = []
    photos = sample_photos()[:4]
    tap = Tap(parse_address(service.address))
    with tap as tapped, ThreadedLinkEmulator(tapped, LinkConfig()) as (host, port):
        tap_config = EdgeConfig(
            rel_edge.bundle.root,
            f"{host}:{port}",
            rel_keys.service_pub,
            cut="c06",
            threads=1,
            fallback="fail",
        )
        results: list[Any] = []
        with start_agent(tap_config) as agent:
            encode = agent.choice.encode

            def observed(cut: str, codec_name: str, frontier: Any) -> bytes:
                frontiers.extend(np.ascontiguousarray(v).tobytes() for v in frontier.values())
                payloads.append(encode(cut, codec_name, frontier))
                return payloads[-1]

            agent.choice.encode = observed  # type: ignore[method-assign]
            agent.run([image_input(i, *p) for i, p in enumerate(photos)], results.append)
    assert [r.where for r in results] == ["cloud"] * len(photos)
    assert len(payloads) == len(photos)
    wire = bytes(tap.up)
    assert rel_edge.manifest.model.encode() in wire and b"c06" in wire  # the capture saw the frames
    assert codec.MAGIC not in wire
    assert b"\x28\xb5\x2f\xfd" not in wire  # the zstd frame magic
    for payload, raw in zip(payloads, frontiers, strict=True):
        body = payload[codec.header_of(payload).header_bytes :]
        assert contains_any_window(payload, body)  # the check itself finds what it looks for
        assert not contains_any_window(wire, payload)
        assert not contains_any_window(wire, body)
        assert not contains_any_window(wire, raw)


def test_mtls_refuses_an_uncertified_client(
    rel_bundles: Path,
    rel_keys: KeyPaths,
    pki: Path,  # noqa: F811
) -> None:
    config = serve_config(
        rel_bundles,
        rel_keys,
        tls_cert=pki / "server.crt",
        tls_key=pki / "server.key",
        client_ca=pki / "ca.crt",
    )
    ca = (pki / "ca.crt").read_bytes()
    device = ((pki / "device.key").read_bytes(), (pki / "device.crt").read_bytes())
    with running_server(config) as server:
        target = f"127.0.0.1:{server.port}"
        outcomes = []
        for creds in (
            grpc.ssl_channel_credentials(ca, *device),
            grpc.ssl_channel_credentials(ca),
        ):
            with grpc.secure_channel(target, creds) as channel:
                try:
                    edgecut_pb2_grpc.TailServiceStub(channel).ServerInfo(pb.ServerInfoRequest(), timeout=10)
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)  # type: ignore[attr-defined]
        with grpc.insecure_channel(target) as channel:
            try:
                edgecut_pb2_grpc.TailServiceStub(channel).ServerInfo(pb.ServerInfoRequest(), timeout=10)
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)  # type: ignore[attr-defined]
    assert outcomes == ["OK", "UNAVAILABLE", "UNAVAILABLE"]


# ---------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class TokenSetup:
    service: Service
    tokens: dict[str, str]  # device id → token


@pytest.fixture(scope="module")
def token_service(
    rel_bundles: Path, rel_keys: KeyPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TokenSetup]:
    root = tmp_path_factory.mktemp("token-served")
    shutil.copytree(rel_bundles / "effl0", root / "effl0")
    renamed(rel_bundles / "effl0", root / "other", OTHER_MODEL)
    tokens = {"dev-a": secrets.token_hex(16), "dev-b": secrets.token_hex(16)}
    grants = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    model = load_bundle(root / "effl0").manifest.model
    grants.write_text(f"{tokens['dev-a']} dev-a {model}\n{tokens['dev-b']} dev-b\n")
    grants.chmod(0o600)
    work = tmp_path_factory.mktemp("token-service")
    with spawned_service(root, rel_keys.service_key, work, "--tokens", str(grants)) as service:
        yield TokenSetup(service, tokens)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _as(setup: TokenSetup, device: str) -> dict[str, str]:
    """The seal's identity for frames sent with `device`'s token (bound into the HPKE info)."""
    return {"identity": sealing.device_identity(setup.tokens[device])}


def _send(setup: TokenSetup, device: str | None, frames: list[pb.Frame]) -> list[str]:
    with setup.service.channel() as channel:
        stub = edgecut_pb2_grpc.TailServiceStub(channel)
        metadata = _bearer(setup.tokens[device]) if device else None
        try:
            answers = list(stub.Infer(iter(frames), metadata=metadata, timeout=30))
        except grpc.RpcError as exc:
            return [f"rpc {exc.code().name}"]  # type: ignore[attr-defined]
    return [status_name(a.code) for a in answers]


def test_a_token_granted_one_model_cannot_use_another(
    token_service: TokenSetup, rel_edge: EdgeClient, calm_feeds: dict[str, np.ndarray]
) -> None:
    as_a, as_b = _as(token_service, "dev-a"), _as(token_service, "dev-b")
    own = rel_edge.request(calm_feeds, CALM_CUT, **as_a).frames
    other = rel_edge.request(calm_feeds, CALM_CUT, model=OTHER_MODEL, **as_a).frames
    assert _send(token_service, "dev-a", own) == ["OK"]
    assert _send(token_service, "dev-a", other) == ["PERMISSION_DENIED"]
    assert _send(
        token_service, "dev-b", rel_edge.request(calm_feeds, CALM_CUT, model=OTHER_MODEL, **as_b).frames
    ) == ["OK"]
    assert _send(token_service, None, rel_edge.request(calm_feeds, CALM_CUT).frames) == [
        "rpc UNAUTHENTICATED"
    ]


def test_a_frame_does_not_replay_under_another_devices_token(
    token_service: TokenSetup, rel_edge: EdgeClient, calm_feeds: dict[str, np.ndarray]
) -> None:
    frames = rel_edge.request(calm_feeds, CALM_CUT, **_as(token_service, "dev-a")).frames
    assert _send(token_service, "dev-b", frames) == ["UNAUTHENTICATED"]
    assert _send(token_service, "dev-a", frames) == ["OK"]


# ---------------------------------------------------------------- signed bundles


def test_unsigned_and_tampered_bundles_refused_on_both_sides(
    effl0_bundle: Path, rel_keys: KeyPaths, tmp_path: Path
) -> None:
    signing = load_signing_private(rel_keys.signing_key)
    root = tmp_path / "served"
    root.mkdir()
    good = renamed(effl0_bundle, root / "good", "good-model", signing)
    unsigned = renamed(effl0_bundle, root / "unsigned", "unsigned-model")
    tampered = renamed(effl0_bundle, root / "tampered", "tampered-model", signing)
    segment = sorted(tampered.rglob("*.onnx"))[-1]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 1
    segment.write_bytes(bytes(data))
    resigned = renamed(effl0_bundle, root / "resigned", "resigned-model", signing)
    manifest = (resigned / "manifest.json").read_text()
    (resigned / "manifest.json").write_text(manifest.replace('"resigned-model"', '"forged-model"'))

    with spawned_service(
        root, rel_keys.service_key, tmp_path / "work", "--signing-pub", str(rel_keys.signing_pub)
    ) as s:
        with s.channel() as channel:
            info = edgecut_pb2_grpc.TailServiceStub(channel).ServerInfo(pb.ServerInfoRequest(), timeout=10)
        log = s.log_text()
    assert [m.name for m in info.models] == ["good-model"]
    for name in ("unsigned", "tampered", "resigned"):
        assert f"skipping bundle {name}" in log

    def edge(bundle: Path) -> str:
        config = EdgeConfig(bundle, cut="output", threads=1, signing_pub=rel_keys.signing_pub)
        try:
            with start_agent(config):
                return "loaded"
        except IntegrityError:
            return "refused"

    assert [edge(b) for b in (good, unsigned, tampered, resigned)] == [
        "loaded",
        "refused",
        "refused",
        "refused",
    ]


# ---------------------------------------------------------------- logs


def test_keys_and_tokens_never_in_logs(
    token_service: TokenSetup,
    rel_edge: EdgeClient,
    rel_keys: KeyPaths,
    calm_feeds: dict[str, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Valid, refused and unauthenticated traffic, and an agent run with a token; then grep both
    sides' logs for every secret in play, in the encodings a careless log line would use."""
    as_a = _as(token_service, "dev-a")
    pending = [rel_edge.request(calm_feeds, CALM_CUT, **as_a) for _ in range(3)]
    assert _send(token_service, "dev-a", [f for p in pending for f in p.frames]) == ["OK"] * 3
    other = rel_edge.request(calm_feeds, CALM_CUT, model=OTHER_MODEL, **as_a).frames
    assert _send(token_service, "dev-a", other) == ["PERMISSION_DENIED"]
    bad = rel_edge.request(calm_feeds, CALM_CUT).frames
    bad[0].sealed = bad[0].sealed[:-1] + bytes([bad[0].sealed[-1] ^ 1])
    _send(token_service, "dev-b", bad)
    with token_service.service.channel() as channel:
        wrong = (("authorization", "Bearer " + token_service.tokens["dev-a"][:-1] + "x"),)
        infer_all(edgecut_pb2_grpc.TailServiceStub(channel), [], timeout_s=10)
        with contextlib.suppress(grpc.RpcError):
            list(edgecut_pb2_grpc.TailServiceStub(channel).Infer(iter(bad), metadata=wrong, timeout=10))
    config = EdgeConfig(
        rel_edge.bundle.root,
        token_service.service.address,
        rel_keys.service_pub,
        cut="c06",
        threads=1,
        fallback="local",
        token=token_service.tokens["dev-a"],
    )
    with caplog.at_level(logging.DEBUG, logger="edgecut"), start_agent(config) as agent:
        results: list[Any] = []
        agent.run([image_input(i, *p) for i, p in enumerate(sample_photos()[:3])], results.append)
    assert {r.where for r in results} == {"cloud"}

    private = load_service_private(rel_keys.service_key).key
    raw = private.private_bytes_raw() if hasattr(private, "private_bytes_raw") else b""
    pem_lines = [
        line
        for path in (rel_keys.service_key, rel_keys.signing_key)
        for line in path.read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    secrets_ = [*token_service.tokens.values(), *pem_lines]
    secrets_ += [raw.hex(), base64.b64encode(raw).decode()] if raw else []
    for p in pending:
        secrets_ += [p.response_key.hex(), base64.b64encode(p.response_key).decode()]
    server_log, agent_log = token_service.service.log_text(), caplog.text
    assert "dev-a" in server_log or "serving" in server_log  # the log is there to be read
    leaked = [s[:6] + "…" for s in secrets_ for log in (server_log, agent_log) if s and s in log]
    assert leaked == []


def test_huge_fields_do_not_amplify_the_log(service: Service, rel_edge: EdgeClient) -> None:
    """A bad frame with 64 KiB request id and model costs the server's log a bounded line."""
    frame = pb.Frame(request_id="r" * (64 << 10), model="m" * (64 << 10), cut=CALM_CUT, chunk_count=1)
    frame.sealed, frame.total_bytes = bytes(100), 100
    before = service.log_path.stat().st_size
    with service.channel() as channel:
        answers, error = infer_all(edgecut_pb2_grpc.TailServiceStub(channel), [frame], timeout_s=30)
    assert error is None and [status_name(a.code) for a in answers] in (["INVALID_ARGUMENT"], ["NOT_FOUND"])
    grown = service.log_path.stat().st_size - before
    assert grown <= 4096, f"one refused frame wrote {grown} bytes of log"
