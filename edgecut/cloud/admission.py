"""Admission: who is calling, and whether a request may cost what it asks, decided before paying.

The caller's identity (token, else client certificate, else "anonymous") is what its frames must
be sealed with and what per-device limits count. Rows are checked from the codec header before
decoding, and the operator's minimum cut before the seal is even opened.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from edgecut import codec, sealing
from edgecut.bundle import Bundle, Cut
from edgecut.cloud.config import DeviceGrant, ServeConfig, min_depth
from edgecut.cloud.limits import ByteBudget, LogLimiter, PerKeyCap, RateLimiter
from edgecut.cloud.tokens import TokenStore
from edgecut.errors import AuthError, CodecError, ForbiddenError, FrameTooLargeError

PROBE_REPLY_RATIO = 16  # a Probe reply is at most this many times its request's payload...
PROBE_REPLY_FLOOR_BYTES = 4096  # ...or this many bytes, whichever is larger (RTT probes send nothing)
PROBE_OVERHEAD_BYTES = 1024  # what a Probe costs in the rate limit besides its payloads


@dataclass
class Limits:
    """Server-wide counters shared by all streams (event-loop only)."""

    streams: PerKeyCap
    in_flight: PerKeyCap
    decoded: ByteBudget
    probes: RateLimiter
    logs: LogLimiter

    @classmethod
    def of(cls, c: ServeConfig) -> Limits:
        return cls(
            PerKeyCap(c.max_streams_per_device, "open Infer streams"),
            PerKeyCap(c.max_in_flight_per_device, "requests in progress"),
            ByteBudget(c.max_decoded_total_bytes, "decoded-bytes budget"),
            RateLimiter(c.probe_bytes_per_s, 2 * c.max_probe_bytes + c.probe_bytes_per_s),
            LogLimiter(),
        )


@dataclass(frozen=True)
class Caller:
    """Who is calling: the grant of its token (None without tokens) and its sealing identity."""

    grant: DeviceGrant | None
    identity: str  # sealing.device_identity of the caller's token / client certificate
    token_sha256: str | None = None  # digest of the token it presented (never the token)


async def authenticate(tokens: TokenStore | None, context: grpc.aio.ServicerContext) -> Caller:
    """The caller's grant (tokens configured) and the identity its frames must be sealed with."""
    metadata = dict(context.invocation_metadata() or ())
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    grant = tokens.find(token) if tokens is not None and token else None
    if tokens is not None and grant is None:
        error = AuthError("missing or unknown device token (metadata 'authorization: Bearer …')")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.message)
    certs = (context.auth_context() or {}).get("x509_pem_cert") or [None]
    digest = sealing.token_digest(token) if token else None
    return Caller(grant, sealing.device_identity(token or None, certs[0]), digest)


def recheck(tokens: TokenStore | None, caller: Caller) -> Caller:
    """The caller as the token file says now, before each request: a token removed since its
    stream opened is refused here (AuthError), a changed grant (its models) applies at once."""
    if tokens is None or caller.token_sha256 is None:
        return caller
    grant = tokens.find_digest(caller.token_sha256)
    if grant is None:
        raise AuthError("device token revoked: it is no longer in this server's tokens file")
    return caller if grant == caller.grant else Caller(grant, caller.identity, caller.token_sha256)


def peer_host(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port (`ipv4:1.2.3.4:5678` -> `ipv4:1.2.3.4`)."""
    return str(context.peer() or "unknown").rpartition(":")[0] or "unknown"


def check_rows(bundle: Bundle, header: codec.FrameHeader, max_rows: int) -> None:
    """Refuse more rows than one request may carry, before paying for its decode.

    Rows are what a tail run costs: a frame of zeros compresses a thousandfold, so its sealed
    size says nothing about them; the header does.
    """
    rows = max((t.shape[0] for t in header.tensors if t.shape), default=1)
    if rows > 1 and not bundle.manifest.batchable:
        raise CodecError(f"{bundle.name} is not batchable: send one item per frame, not {rows}")
    if rows > max_rows:
        raise FrameTooLargeError(
            f"request carries {rows} rows; this server accepts at most {max_rows} per request",
            hint="send one frame per input (max_rows_per_request on the server)",
        )


def check_min_cut(config: ServeConfig, bundle: Bundle, cut: Cut) -> None:
    """Refuse a cut shallower than the operator's minimum for this model (a privacy floor)."""
    floor = min_depth(config, bundle.manifest)
    if cut.depth < floor:
        raise ForbiddenError(
            f"{bundle.name}: cut {cut.id!r} (depth {cut.depth}) is shallower than this server's "
            f"minimum depth {floor} for {bundle.manifest.model!r}",
            hint="cut deeper on the edge (--min-cut)",
        )
