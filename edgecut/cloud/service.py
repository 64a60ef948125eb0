"""The gRPC tail service: thin `grpc.aio` servicers over one transport-free `TailPipeline`.

`Infer` (edgecut's native, sealed protocol) is one bidirectional stream carrying many requests:
each complete request (chunks reassembled) becomes its own task — the pipeline opens, decodes,
batches, encodes and seals it — and its Answer is written when ready, so answers come back out of
order and one slow or bad request holds up nothing else. Errors are per request (an Answer with
that error's gRPC status) and the stream goes on; only authentication (a missing or unknown device
token) and the per-device stream cap fail the whole RPC. Bad frames are logged at DEBUG (one INFO
summary per status every 10 s), never verbatim.

Cost is bounded before it is paid: rows per request (`max_rows_per_request`, read from the codec
header before decoding), decoded bytes held by all requests, calls server-wide, streams and
in-flight requests per device identity, and Probe replies (relative to the request, rate-limited).
A cancel frame drops its request from the reassembler or the batch queue.

The same port also speaks the Open Inference Protocol (`edgecut.cloud.oip`), on the same pipeline.
`create_server` builds and binds everything without serving; `serve` adds signal handling and a
drain: on SIGTERM the port stops taking new calls, in-flight requests finish within the grace
period, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgecut import __version__, answers, sealing
from edgecut.cloud import catalog, oip
from edgecut.cloud.admission import (
    PROBE_OVERHEAD_BYTES,
    PROBE_REPLY_FLOOR_BYTES,
    PROBE_REPLY_RATIO,
    Caller,
    authenticate,
    peer_host,
)
from edgecut.cloud.config import ServeConfig
from edgecut.cloud.context import TailContext, build_context
from edgecut.cloud.executor import Executor
from edgecut.cloud.limits import PerKeyCap
from edgecut.cloud.pipeline import TailPipeline
from edgecut.cloud.registry import Registry
from edgecut.errors import (
    AddressInUseError,
    CodecError,
    EdgecutError,
    OverloadedError,
    RequestCancelledError,
)
from edgecut.framing import Reassembler, RequestHead, grpc_options, short
from edgecut.keys import key_id
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

__all__ = ["TailServer", "TailServicer", "build_context", "create_server", "serve"]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT_PER_STREAM = 256  # requests (and unsent answers) one stream may hold at once
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TailService"].full_name
# Edges ping every 10 s to find dead links (edgecut.edge.session): allow it, idle streams included,
# instead of answering GOAWAY "too_many_pings".
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
]


class TailServicer(edgecut_pb2_grpc.TailServiceServicer):
    """Parse → domain → reply. Holds no per-stream state beyond the running call."""

    def __init__(self, ctx: TailContext) -> None:
        self.ctx = ctx
        self.pipeline = TailPipeline(ctx)

    async def Infer(
        self, request_iterator: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Answer]:
        caller = await authenticate(self.ctx.grants, context)
        try:
            self.ctx.limits.streams.acquire(caller.identity)
        except OverloadedError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
        # Bounded: a client that sends but never reads stalls its own reader, not our memory.
        answers: asyncio.Queue[pb.Answer | None] = asyncio.Queue(MAX_IN_FLIGHT_PER_STREAM)
        tasks: dict[str, asyncio.Task[None]] = {}
        reader = asyncio.create_task(self._read(request_iterator, caller, answers, tasks))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:  # the client left (or we are done): nothing of this stream may outlive it
            self.ctx.limits.streams.release(caller.identity)
            reader.cancel()
            for task in tasks.values():
                task.cancel()

    async def Probe(
        self,
        request: pb.ProbeRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ProbeReply:
        caller = await authenticate(self.ctx.grants, context)
        c = self.ctx.config
        relative = max(PROBE_REPLY_FLOOR_BYTES, PROBE_REPLY_RATIO * len(request.payload))
        size = min(request.reply_bytes, c.max_probe_bytes, c.max_message_bytes - 1024, relative)
        key = caller.identity if caller.identity != sealing.ANONYMOUS else peer_host(context)
        if not self.ctx.limits.probes.allow(key, len(request.payload) + size + PROBE_OVERHEAD_BYTES):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"probe rate limit: at most {c.probe_bytes_per_s} probe bytes per second per device",
            )
        return pb.ProbeReply(payload=bytes(size), server_time_ms=time.time_ns() // 1_000_000)

    async def ServerInfo(
        self,
        request: pb.ServerInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ServerInfoReply:
        caller = await authenticate(self.ctx.grants, context)
        c = self.ctx
        return pb.ServerInfoReply(
            identity=caller.identity,
            max_rows_per_request=c.config.max_rows_per_request,
            models=[catalog.model_info(e) for e in c.registry.entries()],
            key_id=key_id(c.key.primary.public),
            key_suite=c.key.primary.suite,
            key_ids=c.key.ids,
            queue_delay_ms=c.batcher.queue_delay_ms(),
            device=c.executor.device,
            max_message_bytes=c.config.max_message_bytes,
            server_version=__version__,
            answer_formats=answers.KINDS,
        )

    async def _read(
        self,
        frames: AsyncIterator[pb.Frame],
        caller: Caller,
        answers: asyncio.Queue[pb.Answer | None],
        tasks: dict[str, asyncio.Task[None]],
    ) -> None:
        reassembler = Reassembler(self.ctx.config.max_request_bytes)
        in_flight = self.ctx.limits.in_flight
        try:
            async for frame in frames:
                self.ctx.metrics.bytes_in.labels(self.pipeline.label(frame.model)).inc(len(frame.sealed))
                for head, error in reassembler.expire():
                    await answers.put(self.pipeline.failed(head.request_id, head.model, error))
                if frame.cancel:
                    await self._cancel(frame.request_id, reassembler, answers, tasks)
                    continue
                try:
                    whole = reassembler.add(frame)
                    if whole and len(tasks) + answers.qsize() >= MAX_IN_FLIGHT_PER_STREAM:
                        raise OverloadedError(
                            f"more than {MAX_IN_FLIGHT_PER_STREAM} requests in flight on one stream"
                        )
                    if whole and whole[0].request_id in tasks:
                        raise CodecError(f"request {short(whole[0].request_id)} is already in progress")
                    if whole:
                        in_flight.acquire(caller.identity)
                except EdgecutError as exc:
                    await answers.put(self.pipeline.failed(frame.request_id, frame.model, exc))
                    continue
                if whole:
                    rid = whole[0].request_id
                    task = asyncio.create_task(self._handle(*whole, caller, answers))
                    tasks[rid] = task
                    task.add_done_callback(functools.partial(_done, tasks, rid, in_flight, caller.identity))
            while tasks:  # the client half-closed: finish what it sent
                await asyncio.gather(*tasks.values(), return_exceptions=True)
        except Exception as exc:  # the stream broke (client gone); tasks are cancelled by Infer
            log.debug("stream ended: %s", exc)
        finally:
            dropped = reassembler.drop()
            if dropped:
                log.info("stream ended with %d partial request(s): dropped", dropped)
        await answers.put(None)  # not when cancelled: then Infer has stopped reading answers

    async def _cancel(
        self,
        rid: str,
        reassembler: Reassembler,
        answers: asyncio.Queue[pb.Answer | None],
        tasks: dict[str, asyncio.Task[None]],
    ) -> None:
        """Drop a request the edge gave up on; answered CANCELLED unless its answer already went."""
        task = tasks.get(rid)
        # cancel() is False once the task finished: then its answer is already queued.
        if (task is not None and task.cancel()) or reassembler.cancel(rid):
            error = RequestCancelledError(f"request {short(rid)} cancelled by the edge; not computed")
            await answers.put(self.pipeline.failed(rid, "", error))
        else:
            log.debug("cancel for unknown or answered request %s ignored", short(rid))

    async def _handle(
        self,
        head: RequestHead,
        sealed: bytes,
        caller: Caller,
        answers: asyncio.Queue[pb.Answer | None],
    ) -> None:
        await answers.put(await self.pipeline.answer_sealed(head, sealed, caller))


def _done(
    tasks: dict[str, asyncio.Task[None]],
    rid: str,
    in_flight: PerKeyCap,
    identity: str,
    _task: asyncio.Task[None],
) -> None:
    tasks.pop(rid, None)
    in_flight.release(identity)


class TailServer:
    """A bound, not yet started tail service; `start`, then `stop(grace_s)` to drain and close."""

    def __init__(
        self, ctx: TailContext, server: grpc.aio.Server, health_servicer: Any, pool: ThreadPoolExecutor
    ) -> None:
        self.ctx, self.grpc, self.health, self._pool = ctx, server, health_servicer, pool
        self._poller: asyncio.Task[None] | None = None
        self._healthy: set[str] = set()
        self.metrics_port: int | None = None
        self._stopped = False

    @property
    def registry(self) -> Registry:
        return self.ctx.registry

    async def start(self) -> None:
        c = self.ctx.config
        if c.metrics_port is not None:  # first: a taken metrics port must stop us before serving
            try:
                self.metrics_port = self.ctx.metrics.serve_http(c.host, c.metrics_port)
            except OSError as exc:
                raise AddressInUseError(
                    f"cannot serve metrics on {c.host}:{c.metrics_port}: {exc.strerror or exc}",
                    hint="pick another --metrics-port, or stop what holds it",
                ) from None
        await self.sync_health()
        await self.grpc.start()
        if self.ctx.config.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll(self.ctx.config.poll_interval_s))

    async def rescan(self) -> None:
        """Pick up added, changed and removed bundles now (the poller calls this)."""
        loaded, retired = await asyncio.to_thread(self.ctx.registry.scan)
        if loaded or retired:
            await self.sync_health()

    async def sync_health(self) -> None:
        """Per-model health: SERVING for every served model name, NOT_SERVING once gone."""
        serving = {e.key[0] for e in self.ctx.registry.entries()}
        for name in serving - self._healthy:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for name in self._healthy - serving:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._healthy = serving

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish for up to `grace_s`, then release all.

        Idempotent: a second call (a test stopping a server its fixture stops again) is a no-op.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._poller is not None:
            self._poller.cancel()
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.ctx.config.grace_s if grace_s is None else grace_s)
        await self.ctx.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.ctx.metrics.close()

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.rescan()
            except Exception:  # a scan must never stop future scans
                log.exception("bundle rescan failed")


async def create_server(
    config: ServeConfig,
    *,
    executor: Executor | None = None,
) -> tuple[TailServer, int]:
    """Load keys, tokens and bundles (verified, warmed up) and bind the port; does not start.

    One port, two protocols: edgecut's sealed `TailService` and the Open Inference Protocol.
    `executor` replaces the ONNX Runtime one (tests use it to gate or count compute).
    """
    ctx, pool = await build_context(config, executor=executor)
    # SO_REUSEPORT off: with it, a second server on a busy port "listens" and the kernel splits
    # connections between the two (with different keys, half the edges fail).
    server = grpc.aio.server(
        options=[*grpc_options(config.max_message_bytes), *KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    native = TailServicer(ctx)
    edgecut_pb2_grpc.add_TailServiceServicer_to_server(native, server)
    oip.add_to_server(oip.InferenceServicer(native.pipeline), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, config)
    return TailServer(ctx, server, health_servicer, pool), port


def _bind(server: grpc.aio.Server, config: ServeConfig) -> int:
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert and config.tls_key:
            ca = config.client_ca.read_bytes() if config.client_ca else None
            creds = grpc.ssl_server_credentials(
                [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except (OSError, RuntimeError) as exc:
        raise AddressInUseError(f"cannot listen on {address}: {exc}", hint=_PORT_HINT) from None
    if not port:
        raise AddressInUseError(f"cannot listen on {address}: the port is in use", hint=_PORT_HINT)
    return port


_PORT_HINT = "another process (maybe another `edgecut cloud serve`) holds it; pick another --port"


async def serve(
    config: ServeConfig,
    on_ready: Callable[[str, int], None] = lambda h, p: None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain for `config.grace_s`; return 0, or 130 after Ctrl-C
    (SIGINT), the exit status every edgecut verb gives when interrupted."""
    server, port = await create_server(config)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def stop(sig: int) -> None:
        received.append(sig)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    log.info("serving %d bundle(s) on %s:%d", len(server.registry.entries()), config.host, port)
    on_ready(config.host, port)
    await stopping.wait()
    log.info("shutting down: draining in-flight requests for up to %.1f s", config.grace_s)
    await server.stop()
    log.info("stopped")
    return 130 if received[:1] == [signal.SIGINT] else 0
