"""The tail service on Ray Serve: Ray's gRPC proxy in front, autoscaled replicas behind.

Each replica is the same `TailServicer` that `edgecut cloud serve` runs (auth, limits, per-request
errors, dynamic batching across every stream the replica holds), fed by Ray Serve's gRPC ingress
instead of its own port. Frames are sealed to the service key and carry everything needed to answer
them, so Ray may route each stream to any replica.

What Ray Serve 2.60 gives and what it does not (verified by tests/integration/test_ray_serve.py):
- `Infer` runs as a bidirectional stream through the proxy (`gRPCInputStream`, beta): every
  incoming message is one actor call from the replica back to the proxy, so it costs more per
  frame than a direct connection.
- The autoscaler counts *ongoing requests* per replica; for `Infer` one request is one open stream,
  not one frame, so `target_ongoing_requests` is streams (edge devices) per replica.
- The proxy listens on `[::]:PORT` in plaintext: terminate TLS in front of it (a Kubernetes
  ingress or mesh). Device tokens still work: gRPC metadata reaches the replica.
- Per-device limits (streams, in-flight requests, probe bytes) hold per replica, not per cluster;
  the server-wide `max_concurrent_rpcs` is Ray's `max_ongoing_requests` here.
- Ray Serve's own health service replaces `grpc.health.v1`; a new bundle needs a redeploy
  (`serve deploy` rolls replicas), since replicas load the bundles directory once at start.

Run it: `edgecut cloud serve --ray --bundles … --service-key …`, or `serve run deploy/ray/serve.yaml`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from edgecut.cloud.config import ServeConfig, load_tokens
from edgecut.errors import DependencyError, UsageError
from edgecut.keyring import KeyRing
from edgecut.v1 import edgecut_pb2 as pb

log = logging.getLogger(__name__)

SERVICER_FUNCTION = "edgecut.v1.edgecut_pb2_grpc.add_TailServiceServicer_to_server"
APP_NAME = "edgecut"  # clients may pass metadata ("application", APP_NAME) when several apps run
DEPLOYMENT_NAME = "TailService"


@dataclass(frozen=True)
class RayScaling:
    """How Ray Serve places and scales tail replicas."""

    min_replicas: int = 1  # replicas kept while idle
    max_replicas: int = 4  # the autoscaler's ceiling
    target_ongoing_requests: float = 2.0  # open Infer streams (plus unary calls) per replica to aim for
    max_ongoing_requests: int = 64  # streams one replica accepts before Ray queues them at the proxy
    num_cpus: float = 1.0  # CPUs reserved per replica (match --threads)
    num_gpus: float = 0.0  # GPUs per replica (fractions share one GPU)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise UsageError(
                f"replicas {self.min_replicas}..{self.max_replicas}: need 0 <= min <= max, max >= 1"
            )
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            raise UsageError("target_ongoing_requests must be > 0 and max_ongoing_requests >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise UsageError("num_cpus and num_gpus must be >= 0")

    def deployment_options(self) -> dict[str, Any]:
        return {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }


class TailReplica:
    """One Ray Serve replica: the `cloud serve` servicer behind Ray's proxy.

    Built inside the replica (`async __init__` runs on the loop that serves), so its batcher and
    ORT sessions belong to the replica's process, and the config is validated there as well as
    on the driver.
    """

    async def __init__(self, config: Mapping[str, Any]) -> None:  # type: ignore[misc]
        from edgecut.cloud.context import build_context  # grpc and ORT load here
        from edgecut.cloud.service import TailServicer

        self._ctx, self._pool = await build_context(ServeConfig.from_mapping(config, source="ray app"))
        self._servicer = TailServicer(self._ctx)
        log.info("ray replica serving %d bundle(s)", len(self._ctx.registry.entries()))

    async def Infer(
        self, request_stream: AsyncIterator[pb.Frame], grpc_context: Any
    ) -> AsyncIterator[pb.Answer]:
        async for answer in self._servicer.Infer(request_stream, _RayContext(grpc_context)):
            yield answer

    async def Probe(self, request: pb.ProbeRequest, grpc_context: Any) -> pb.ProbeReply:
        return await self._servicer.Probe(request, _RayContext(grpc_context))

    async def ServerInfo(self, request: pb.ServerInfoRequest, grpc_context: Any) -> pb.ServerInfoReply:
        return await self._servicer.ServerInfo(request, _RayContext(grpc_context))

    async def __del__(self) -> None:
        if hasattr(self, "_ctx"):  # Ray calls this even when __init__ failed
            await self._ctx.batcher.close()
            self._pool.shutdown(wait=False, cancel_futures=True)


class _RayContext:
    """The `grpc.aio.ServicerContext` calls the servicer makes, on Ray's serializable context.

    Callers are identified as under `cloud serve`: by their bearer token (the device identity
    bound into the HPKE info), anonymous without one. No client certificate reaches a replica
    (TLS ends in front of Ray's plaintext proxy), so `auth_context` is empty rather than the
    proxy's. Ray has no `abort`: a status set on its context and then an exception is what its
    proxy sends.
    """

    def __init__(self, context: Any) -> None:
        self._context = context

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._context.invocation_metadata())

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def peer(self) -> str:
        return str(self._context.peer() or "unknown")  # the edge's address, as Ray's proxy saw it

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted(details)


class _Aborted(Exception):
    """Ends the call with the status set on Ray's context (Ray's proxy sends that status)."""


def build_app(args: Mapping[str, Any]) -> Any:
    """Application builder: `serve run edgecut.cloud.ray_serve:build_app bundles=DIR key=FILE …`.

    `args` holds ServeConfig fields and RayScaling fields (strings from `serve run`, typed values
    from a config file); it is validated here, on the driver, before any replica starts.
    """
    serve = _serve()
    serve_args, scaling_args = _split(args)
    config = ServeConfig.from_mapping(serve_args, source="ray app")
    _check_ray_fit(config)
    _check_secrets(config)
    scaling = RayScaling(**scaling_args)
    return serve.deployment(TailReplica).options(**scaling.deployment_options()).bind(serve_args)


def grpc_options(port: int) -> Any:
    """Ray's gRPC proxy options serving TailService on `port` (it binds [::]:port, plaintext)."""
    _serve()
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION])


def run(
    config: ServeConfig, scaling: RayScaling, on_ready: Callable[[str, int], None] = lambda h, p: None
) -> int:
    """`edgecut cloud serve --ray`: join (RAY_ADDRESS) or start a Ray cluster, deploy, serve until SIGTERM."""
    _check_ray_fit(config)
    serve = _serve()
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    try:
        serve.start(grpc_options=grpc_options(config.port), http_options={"host": "127.0.0.1", "port": 0})
        serve.run(build_app(_as_args(config, scaling)), name=APP_NAME)
        on_ready(config.host, config.port)
        _wait_for_signal()
        log.info("shutting down Ray Serve")
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _check_ray_fit(config: ServeConfig) -> None:
    """Refuse settings a replica behind Ray's proxy would silently ignore."""
    if config.tls_cert is not None or config.client_ca is not None:
        raise UsageError(
            "Ray Serve's gRPC proxy has no TLS", hint="terminate TLS in front of it (ingress or mesh)"
        )
    if config.metrics_port is not None:
        raise UsageError(
            "Ray replicas open no Prometheus port of their own (several would share a node)",
            hint="use Ray's metrics export",
        )
    if config.max_concurrent_rpcs != ServeConfig.max_concurrent_rpcs:
        raise UsageError(
            "max_concurrent_rpcs bounds a gRPC server; replicas behind Ray's proxy have none",
            hint="bound calls per replica with max_ongoing_requests",
        )


def _check_secrets(config: ServeConfig) -> None:
    """Load the key and tokens as a replica will, so a bad or too-open file fails the deploy on
    the driver with its own message, not as Ray's "Failed to update the deployments"."""
    KeyRing.load(config.key_paths)
    if config.tokens:
        load_tokens(config.tokens)


def _wait_for_signal() -> None:
    async def wait() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()

    asyncio.run(wait())


def _as_args(config: ServeConfig, scaling: RayScaling) -> dict[str, Any]:
    """ServeConfig fields that differ from their defaults (paths as strings) plus the scaling."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    values = {
        k: (str(v) if isinstance(v, os.PathLike) else v)
        for k, v in dataclasses.asdict(config).items()
        if k in ("bundles", "key") or v != defaults[k]
    }
    values.pop("port", None)  # Ray's proxy owns the port
    values.pop("host", None)
    return {**values, **dataclasses.asdict(scaling)}


def _split(args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate and type the two sets of fields (`serve run k=v` passes every value as a string)."""
    serve_types = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    scaling_types = {f.name: f.default for f in dataclasses.fields(RayScaling)}
    serve_args: dict[str, Any] = {}
    scaling_args: dict[str, Any] = {}
    for key, value in args.items():
        target, defaults = (
            (scaling_args, scaling_types) if key in scaling_types else (serve_args, serve_types)
        )
        target[key] = _typed(key, value, defaults.get(key))
    return serve_args, scaling_args


def _typed(key: str, value: Any, default: Any) -> Any:
    if key == "providers" and isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if not isinstance(value, str) or not isinstance(default, int | float) or isinstance(default, bool):
        return value
    try:
        return float(value) if isinstance(default, float) else int(value)
    except ValueError:
        raise UsageError(f"ray app: {key} = {value!r}: expected a number") from None


def _serve() -> Any:
    try:
        from ray import serve
    except ModuleNotFoundError as exc:
        raise DependencyError("Ray Serve is not installed", hint='pip install "edgecut[ray]"') from exc
    return serve
