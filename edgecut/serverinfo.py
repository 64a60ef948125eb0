"""Reading a tail service's `ServerInfo`: which model builds it serves and how fast its tail
segments run. The edge session, `edgecut plan` and the sweep all read it here, so all three
plan with the same numbers and fail with the same messages."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from edgecut.costs import CloudTimes
from edgecut.credentials import ClientCredentials
from edgecut.errors import AuthError, NotFoundError, UnavailableError
from edgecut.framing import grpc_options
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc


@dataclass(frozen=True)
class TailInfo:
    """What the service says about itself for one model version."""

    device: str  # e.g. "cpu", "cuda:0 NVIDIA H100"
    queue_delay_ms: float  # its live queue estimate
    times: CloudTimes  # per-segment tail latency from its warm-up profile
    unprofiled: tuple[str, ...]  # segments it reports no timing for (unknown, not free)
    key_suite: str = "x25519"  # HPKE suite of the key frames are sealed to (sets the seal overhead)


def key_ids(reply: pb.ServerInfoReply) -> tuple[str, ...]:
    """Every service key id the server opens frames for, its primary first (a server from before
    key rotation lists none: then only its `key_id`)."""
    return tuple(reply.key_ids) or (reply.key_id,)


def find_model(
    reply: pb.ServerInfoReply, model: str, version: str, where: str, build: str = ""
) -> pb.ModelInfo:
    """The served model version, checked against `build` (a manifest sha256; "" = any build).

    Another build of the same version would silently compute other results, so it is refused
    like a missing model; the edge session and `edgecut plan` both check here.
    """
    found = next((m for m in reply.models if (m.name, m.version) == (model, version)), None)
    if found is None:
        serves = ", ".join(f"{m.name}:{m.version}" for m in reply.models) or "nothing"
        raise NotFoundError(f"{where} has no model '{model}' version '{version}' (serves: {serves})")
    if build and found.manifest_sha256 and found.manifest_sha256 != build:
        raise NotFoundError(
            f"{where} serves a different build of {model}:{version} "
            f"(manifest sha {found.manifest_sha256[:12]} vs local {build[:12]})"
        )
    return found


def tail_info(reply: pb.ServerInfoReply, model: pb.ModelInfo) -> TailInfo:
    times = {p.segment.removesuffix(".onnx"): p.latency_ms for c in model.cuts for p in c.tail}
    return TailInfo(
        reply.device,
        reply.queue_delay_ms,
        CloudTimes(
            {s: ms for s, ms in times.items() if ms > 0},
            cut_decode_ms={c.id: c.decode_ms for c in model.cuts if c.decode_ms > 0},
        ),
        tuple(sorted(s for s, ms in times.items() if ms <= 0)),
        reply.key_suite or "x25519",
    )


def ask(
    address: str,
    model: str,
    version: str,
    timeout_s: float = 5.0,
    credentials: ClientCredentials | None = None,
) -> TailInfo:
    """One ServerInfo call (control traffic, not the data path); plaintext without credentials."""
    credentials = credentials or ClientCredentials()
    with credentials.channel(address, grpc_options()) as channel:
        stub = edgecut_pb2_grpc.TailServiceStub(channel)
        try:
            reply = stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout_s, metadata=credentials.metadata)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise AuthError(
                    f"tail service {address} refused us: {exc.details()}", hint="--token"
                ) from None
            raise UnavailableError(f"tail service {address} is unreachable ({exc.code().name})") from None
    where = f"tail service {address}"
    return tail_info(reply, find_model(reply, model, version, where))
