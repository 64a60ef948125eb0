"""The gRPC tail service: a thin `grpc.aio` servicer over registry, batcher and executor.

`Infer` is one bidirectional stream carrying many requests: each complete request (chunks
reassembled) becomes its own task — open, decode, batch, encode, seal — and its Answer is written
when ready, so answers come back out of order and one slow or bad request holds up nothing else.
Errors are per request: any `EdgecutError` becomes an Answer with that error's gRPC status, and the
stream goes on. Only authentication (a missing or unknown device token) fails the whole RPC.

`create_server` builds and binds everything without serving; `serve` adds signal handling and a
drain: on SIGTERM the port stops taking new calls, in-flight requests finish within the grace
period, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgecut import __version__, codec, sealing
from edgecut.bundle import Bundle, Cut
from edgecut.cloud.batcher import Batcher
from edgecut.cloud.config import DeviceGrant, ServeConfig, load_tokens
from edgecut.cloud.executor import Executor, OrtExecutor
from edgecut.cloud.metrics import ServerMetrics
from edgecut.cloud.registry import Entry, Registry
from edgecut.errors import AuthError, CodecError, EdgecutError, ForbiddenError, OverloadedError, UsageError
from edgecut.framing import Reassembler, RequestHead, grpc_options
from edgecut.keys import ServicePrivateKey, key_id, load_service_private, load_signing_public
from edgecut.runtime import OrtOptions
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

log = logging.getLogger(__name__)

ANSWER_CODEC = codec.CodecSpec("none", zstd_level=1)  # results are small: exact, lightly packed
MAX_IN_FLIGHT_PER_STREAM = 256  # requests (and unsent answers) one stream may hold at once
# Frames up to this size are opened on the event loop (well under a millisecond), and decoded there
# when they decode to at most INLINE_DECODE_BYTES; the rest (JPEG, shallow cuts, a zero-filled
# frontier that zstd shrank 1000×) go to a thread so they never stall the other streams.
INLINE_OPEN_BYTES = 64 << 10
INLINE_DECODE_BYTES = 1 << 20
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TailService"].full_name


@dataclass(frozen=True)
class _Context:
    """What the servicer shares across streams."""

    config: ServeConfig
    key: ServicePrivateKey
    guards: sealing.DeviceGuards
    grants: dict[str, DeviceGrant] | None
    registry: Registry
    batcher: Batcher
    executor: Executor
    metrics: ServerMetrics


class TailServicer(edgecut_pb2_grpc.TailServiceServicer):
    """Parse → domain → reply. Holds no per-stream state beyond the running call."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    async def Infer(
        self, request_iterator: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Answer]:
        grant = await _authenticate(self.ctx.grants, context)
        # Bounded: a client that sends but never reads stalls its own reader, not our memory.
        answers: asyncio.Queue[pb.Answer | None] = asyncio.Queue(MAX_IN_FLIGHT_PER_STREAM)
        tasks: set[asyncio.Task[None]] = set()
        reader = asyncio.create_task(self._read(request_iterator, grant, answers, tasks))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:  # the client left (or we are done): nothing of this stream may outlive it
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def Probe(
        self,
        request: pb.ProbeRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ProbeReply:
        await _authenticate(self.ctx.grants, context)
        cap = min(self.ctx.config.max_probe_bytes, self.ctx.config.max_message_bytes - 1024)
        return pb.ProbeReply(
            payload=bytes(min(request.reply_bytes, cap)), server_time_ms=time.time_ns() // 1_000_000
        )

    async def ServerInfo(
        self,
        request: pb.ServerInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ServerInfoReply:
        await _authenticate(self.ctx.grants, context)
        c = self.ctx
        return pb.ServerInfoReply(
            models=[_model_info(e) for e in c.registry.entries()],
            key_id=key_id(c.key.public),
            key_suite=c.key.suite,
            queue_delay_ms=c.batcher.queue_delay_ms(),
            device=c.executor.device,
            max_message_bytes=c.config.max_message_bytes,
            server_version=__version__,
        )

    async def _read(
        self,
        frames: AsyncIterator[pb.Frame],
        grant: DeviceGrant | None,
        answers: asyncio.Queue[pb.Answer | None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        reassembler = Reassembler(self.ctx.config.max_request_bytes)
        try:
            async for frame in frames:
                self.ctx.metrics.bytes_in.labels(self._label(frame.model)).inc(len(frame.sealed))
                for head, error in reassembler.expire():
                    await answers.put(self._failed(head.request_id, head.model, error))
                try:
                    whole = reassembler.add(frame)
                    if whole and len(tasks) + answers.qsize() >= MAX_IN_FLIGHT_PER_STREAM:
                        raise OverloadedError(
                            f"more than {MAX_IN_FLIGHT_PER_STREAM} requests in flight on one stream"
                        )
                except EdgecutError as exc:
                    await answers.put(self._failed(frame.request_id, frame.model, exc))
                    continue
                if whole:
                    task = asyncio.create_task(self._handle(*whole, grant, answers))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            while tasks:  # the client half-closed: finish what it sent
                await asyncio.gather(*tasks)
        except Exception as exc:  # the stream broke (client gone); tasks are cancelled by Infer
            log.debug("stream ended: %s", exc)
        finally:
            dropped = reassembler.drop()
            if dropped:
                log.info("stream ended with %d partial request(s): dropped", dropped)
        await answers.put(None)  # not when cancelled: then Infer has stopped reading answers

    async def _handle(
        self,
        head: RequestHead,
        sealed: bytes,
        grant: DeviceGrant | None,
        answers: asyncio.Queue[pb.Answer | None],
    ) -> None:
        t0 = time.perf_counter()
        try:
            answer = await self._answer(head, sealed, grant)
        except EdgecutError as exc:
            answer = self._failed(head.request_id, head.model, exc)
        except Exception:
            log.exception("rid=%s model=%s cut=%s: internal error", head.request_id, head.model, head.cut)
            answer = self._failed(head.request_id, head.model, EdgecutError("internal error"))
        else:
            self.ctx.metrics.requests.labels(head.model, "OK").inc()
            self.ctx.metrics.bytes_out.labels(head.model).inc(len(answer.sealed))
            log.debug(
                "rid=%s model=%s version=%s cut=%s ok in %.1f ms (batch %d)",
                head.request_id,
                head.model,
                head.version,
                head.cut,
                (time.perf_counter() - t0) * 1e3,
                answer.timings.batch_size,
            )
        answer.sent_at_ms = head.sent_at_ms
        answer.server_queue_delay_ms = self.ctx.batcher.queue_delay_ms()
        await answers.put(answer)

    async def _answer(self, head: RequestHead, sealed: bytes, grant: DeviceGrant | None) -> pb.Answer:
        if grant is not None and not grant.allows(head.model):
            raise ForbiddenError(f"device {grant.device_id!r} may not use model {head.model!r}")
        c = self.ctx
        with c.registry.acquire(head.model, head.version) as entry:
            cut = c.registry.cut(entry, head.cut)
            binding = sealing.Binding(head.model, head.version, head.cut, head.request_id)
            t0 = time.perf_counter()
            guard = c.guards.for_device(grant.device_id if grant is not None else None)
            feeds, response_key = await self._open(entry.bundle, cut, binding, sealed, guard)
            t1 = time.perf_counter()
            result = await c.batcher.submit(entry.bundle, cut.id, feeds, deadline_ms=head.deadline_ms)
            t2 = time.perf_counter()
            payload = codec.encode(result.outputs, entry.bundle.manifest.outputs, ANSWER_CODEC)
            sealed_answer = sealing.seal_response(response_key, binding, payload)
        timings = pb.Timings(
            queue_ms=result.queue_ms,
            decode_ms=(t1 - t0) * 1e3,
            compute_ms=result.compute_ms,
            encode_ms=(time.perf_counter() - t2) * 1e3,
            batch_size=result.batch_size,
        )
        return pb.Answer(request_id=head.request_id, code=0, sealed=sealed_answer, timings=timings)

    async def _open(
        self, bundle: Bundle, cut: Cut, binding: sealing.Binding, sealed: bytes, guard: sealing.ReplayGuard
    ) -> tuple[dict[str, np.ndarray], bytes]:
        """Open the seal (replay-checked) and decode the frontier, validated against the cut.

        Work sized by the frame runs on a thread: the seal by its sealed size, the decode by the
        size the header promises (read first, cheaply, and checked against the bundle).
        """
        if len(sealed) > INLINE_OPEN_BYTES:
            payload, key = await asyncio.to_thread(
                sealing.open_request, self.ctx.key, binding, sealed, guard=guard
            )
        else:
            payload, key = sealing.open_request(self.ctx.key, binding, sealed, guard=guard)
        header = codec.header_of(payload, max_bytes=self.ctx.config.max_decoded_bytes)
        _check_batch(bundle, header)
        if header.decoded_bytes > INLINE_DECODE_BYTES:
            return await asyncio.to_thread(self._decode, bundle, cut, payload), key
        return self._decode(bundle, cut, payload), key

    def _decode(self, bundle: Bundle, cut: Cut, payload: bytes) -> dict[str, np.ndarray]:
        pre = bundle.manifest.preprocess
        norm = (pre.mean, pre.std) if pre.kind == "image" else None
        return codec.decode(
            payload,
            cut.frontier,
            max_bytes=self.ctx.config.max_decoded_bytes,
            image_norm=norm,
            calibration=codec.calibration_for(bundle, cut.id),
        )

    def _failed(self, request_id: str, model: str, exc: EdgecutError) -> pb.Answer:
        status = grpc.StatusCode[exc.grpc_status]
        self.ctx.metrics.requests.labels(self._label(model), status.name).inc()
        log.info("rid=%s model=%s: %s: %s", request_id, model, status.name, exc)
        message = f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message
        return pb.Answer(request_id=request_id, code=status.value[0], message=message)

    def _label(self, model: str) -> str:
        """Metric label: served model names only, so clients cannot grow the label space."""
        return model if any(e.key[0] == model for e in self.ctx.registry.entries()) else "unknown"


async def _authenticate(
    grants: dict[str, DeviceGrant] | None, context: grpc.aio.ServicerContext
) -> DeviceGrant | None:
    if grants is None:
        return None
    metadata = dict(context.invocation_metadata() or ())
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    grant = grants.get(token.strip()) if scheme.lower() == "bearer" else None
    if grant is None:
        error = AuthError("missing or unknown device token (metadata 'authorization: Bearer …')")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.message)
    return grant


def _check_batch(bundle: Bundle, header: codec.FrameHeader) -> None:
    """Refuse a batch a non-batchable bundle cannot run, before paying for its decode."""
    rows = {t.shape[0] for t in header.tensors if t.shape}
    if not bundle.manifest.batchable and rows - {1}:
        raise CodecError(f"{bundle.name} is not batchable: send one item per frame, not {max(rows)}")


def _model_info(entry: Entry) -> pb.ModelInfo:
    manifest, timings = entry.bundle.manifest, entry.extra.get("timings", {})
    cuts = [
        pb.CutInfo(
            id=cut.id, depth=cut.depth, tail=[_profile(s.file, timings) for s in manifest.tail(cut.id)]
        )
        for cut in manifest.cuts
    ]
    return pb.ModelInfo(
        name=manifest.model, version=manifest.version, cuts=cuts, manifest_sha256=entry.bundle.build_sha256
    )


def _profile(file: str, timings: dict[str, Any]) -> pb.SegmentProfile:
    name = file.rsplit("/", 1)[-1].removesuffix(".onnx")
    timing = timings.get(name)
    return pb.SegmentProfile(segment=name, latency_ms=timing.latency_ms if timing else 0.0)


class TailServer:
    """A bound, not yet started tail service; `start`, then `stop(grace_s)` to drain and close."""

    def __init__(
        self, ctx: _Context, server: grpc.aio.Server, health_servicer: Any, pool: ThreadPoolExecutor
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
        await self.sync_health()
        await self.grpc.start()
        if self.ctx.config.metrics_port is not None:
            self.metrics_port = self.ctx.metrics.serve_http(
                self.ctx.config.host, self.ctx.config.metrics_port
            )
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

    `executor` replaces the ONNX Runtime one (tests use it to gate or count compute).
    """
    key = load_service_private(config.key)
    signing = load_signing_public(config.signing_pub) if config.signing_pub else None
    grants = load_tokens(config.tokens) if config.tokens else None
    executor = executor or OrtExecutor(
        OrtOptions(config.resolved_providers, config.threads), config.session_cache
    )
    metrics = ServerMetrics()
    pool = ThreadPoolExecutor(config.compute_threads, thread_name_prefix="edgecut-tail")
    batcher = Batcher(
        executor,
        pool,
        max_batch=config.max_batch,
        metrics=metrics,
        max_queue_delay_ms=config.max_queue_delay_ms,
        max_queue=config.max_queue,
    )

    def on_load(entry: Entry) -> None:
        entry.extra["timings"] = executor.warm_up(entry.bundle, config.warmup_runs)

    def on_retire(entry: Entry) -> None:
        executor.evict(entry.bundle)
        batcher.retire(entry.bundle)

    registry = Registry(config.bundles, public_key=signing, on_load=on_load, on_retire=on_retire)
    await asyncio.to_thread(registry.scan)
    ctx = _Context(
        config,
        key,
        sealing.DeviceGuards(config.replay_window_ms),
        grants,
        registry,
        batcher,
        executor,
        metrics,
    )
    server = grpc.aio.server(options=grpc_options(config.max_message_bytes))
    edgecut_pb2_grpc.add_TailServiceServicer_to_server(TailServicer(ctx), server)
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
        raise UsageError(f"cannot listen on {address}: {exc}") from None
    if not port:
        raise UsageError(f"cannot listen on {address} (port in use?)")
    return port


async def serve(
    config: ServeConfig,
    on_ready: Callable[[str, int], None] = lambda h, p: None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain for `config.grace_s` and return 0."""
    server, port = await create_server(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("serving %d bundle(s) on %s:%d", len(server.registry.entries()), config.host, port)
    on_ready(config.host, port)
    await stopping.wait()
    log.info("shutting down: draining in-flight requests for up to %.1f s", config.grace_s)
    await server.stop()
    log.info("stopped")
    return 0
