"""The gRPC tail service: a thin `grpc.aio` servicer over registry, batcher and executor.

`Infer` is one bidirectional stream carrying many requests: each complete request (chunks
reassembled) becomes its own task — open, decode, batch, encode, seal — and its Answer is written
when ready, so answers come back out of order and one slow or bad request holds up nothing else.
Errors are per request: any `EdgecutError` becomes an Answer with that error's gRPC status, and the
stream goes on. Only authentication (a missing or unknown device token) and the per-device stream cap
fail the whole RPC. A request whose seal opened is answered with its status, timings and queue delay
as the seal's associated data (an error gets an empty sealed payload), so nobody on the path can
forge them; bad frames are logged at DEBUG (one INFO summary per status every 10 s), never verbatim.

Cost is bounded before it is paid: rows per request (`max_rows_per_request`, read from the codec
header before decoding), decoded bytes held by all requests, calls server-wide, streams and
in-flight requests per device identity, and Probe replies (relative to the request, rate-limited).
A cancel frame drops its request from the reassembler or the batch queue.

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
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgecut import __version__, answers, codec, framing, sealing
from edgecut.bundle import Bundle, Cut, Segment
from edgecut.cloud.admission import (
    PROBE_OVERHEAD_BYTES,
    PROBE_REPLY_FLOOR_BYTES,
    PROBE_REPLY_RATIO,
    Caller,
    Limits,
    authenticate,
    check_min_cut,
    check_rows,
    peer_host,
    recheck,
)
from edgecut.cloud.batcher import Batcher
from edgecut.cloud.config import ServeConfig
from edgecut.cloud.executor import Executor, OrtExecutor
from edgecut.cloud.limits import PerKeyCap
from edgecut.cloud.metrics import ServerMetrics
from edgecut.cloud.registry import Entry, Registry
from edgecut.cloud.tokens import TokenStore
from edgecut.errors import (
    AddressInUseError,
    CodecError,
    EdgecutError,
    ForbiddenError,
    OverloadedError,
    RequestCancelledError,
)
from edgecut.framing import Reassembler, RequestHead, grpc_options, short
from edgecut.keyring import KeyRing
from edgecut.keys import key_id, load_signing_public
from edgecut.runtime import OrtOptions
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

log = logging.getLogger(__name__)

MAX_IN_FLIGHT_PER_STREAM = 256  # requests (and unsent answers) one stream may hold at once
# Frames up to this size are opened on the event loop (well under a millisecond), and decoded there
# when they decode to at most INLINE_DECODE_BYTES; the rest (JPEG, shallow cuts, a zero-filled
# frontier that zstd shrank 1000×) go to a thread so they never stall the other streams.
INLINE_OPEN_BYTES = 64 << 10
INLINE_DECODE_BYTES = 1 << 20
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TailService"].full_name
# Edges ping every 10 s to find dead links (edgecut.edge.session): allow it, idle streams included,
# instead of answering GOAWAY "too_many_pings".
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
]


@dataclass(frozen=True)
class _Context:
    """What the servicer shares across streams."""

    config: ServeConfig
    key: KeyRing  # the primary and any keys still accepted during a rotation
    guards: sealing.DeviceGuards
    grants: TokenStore | None  # re-read when the tokens file changes
    registry: Registry
    batcher: Batcher
    executor: Executor
    metrics: ServerMetrics
    limits: Limits


class TailServicer(edgecut_pb2_grpc.TailServiceServicer):
    """Parse → domain → reply. Holds no per-stream state beyond the running call."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

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
            models=[_model_info(e) for e in c.registry.entries()],
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
                self.ctx.metrics.bytes_in.labels(self._label(frame.model)).inc(len(frame.sealed))
                for head, error in reassembler.expire():
                    await answers.put(self._failed(head.request_id, head.model, error))
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
                    await answers.put(self._failed(frame.request_id, frame.model, exc))
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
            await answers.put(self._failed(rid, "", error))
        else:
            log.debug("cancel for unknown or answered request %s ignored", short(rid))

    async def _handle(
        self,
        head: RequestHead,
        sealed: bytes,
        caller: Caller,
        answers: asyncio.Queue[pb.Answer | None],
    ) -> None:
        t0 = time.perf_counter()
        try:
            answer = await self._answer(head, sealed, caller)
        except EdgecutError as exc:
            answer = self._failed(head.request_id, head.model, exc, sent_at_ms=head.sent_at_ms)
        except Exception:
            log.exception("rid=%r model=%r cut=%r: internal error", head.request_id, head.model, head.cut)
            error = EdgecutError("internal error")
            answer = self._failed(head.request_id, head.model, error, sent_at_ms=head.sent_at_ms)
        else:
            if answer.code == 0:
                self.ctx.metrics.requests.labels(head.model, "OK").inc()
                self.ctx.metrics.bytes_out.labels(head.model).inc(len(answer.sealed))
            log.debug(
                "rid=%r model=%r version=%r cut=%r code %d in %.1f ms (batch %d)",
                head.request_id,
                head.model,
                head.version,
                head.cut,
                answer.code,
                (time.perf_counter() - t0) * 1e3,
                answer.timings.batch_size,
            )
        await answers.put(answer)

    async def _answer(self, head: RequestHead, sealed: bytes, caller: Caller) -> pb.Answer:
        grant = recheck(self.ctx.grants, caller).grant
        if grant is not None and not grant.allows(head.model):
            raise ForbiddenError(f"device {grant.device_id!r} may not use model {short(head.model)}")
        c = self.ctx
        with c.registry.acquire(head.model, head.version) as entry:
            cut = c.registry.cut(entry, head.cut)
            check_min_cut(c.config, entry.bundle, cut)
            binding = head.binding(caller.identity)
            t0 = time.perf_counter()
            guard = c.guards.for_device(grant.device_id if grant is not None else None)
            opened = await self._open_seal(head.key_id, binding, sealed, guard)
            response_key = opened.response_key
            try:
                return await self._compute(entry.bundle, cut, head, binding, opened, t0, entry.extra)
            except EdgecutError as exc:  # the seal opened: answer with an authenticated error
                seal = (response_key, binding)
                return self._failed(head.request_id, head.model, exc, sent_at_ms=head.sent_at_ms, seal=seal)

    async def _compute(
        self,
        bundle: Bundle,
        cut: Cut,
        head: RequestHead,
        binding: sealing.Binding,
        opened: sealing.OpenedRequest,
        t0: float,
        stats: dict[str, Any],
    ) -> pb.Answer:
        c = self.ctx
        payload, response_key = opened.payload, opened.response_key
        header = codec.header_of(payload, max_bytes=c.config.max_decoded_bytes)
        check_rows(bundle, header, c.config.max_rows_per_request)
        c.limits.decoded.acquire(header.decoded_bytes)
        try:
            feeds = await self._decode_frontier(bundle, cut, payload, header)
            t1 = time.perf_counter()
            result = await c.batcher.submit(bundle, cut.id, feeds, deadline_ms=head.deadline_ms)
            del feeds
        finally:
            c.limits.decoded.release(header.decoded_bytes)
        _note_decode(stats, cut.id, (t1 - t0) * 1e3)
        t2 = time.perf_counter()
        encoded = answers.encode_answer(result.outputs, bundle.manifest.outputs, opened.answer)
        answer = pb.Answer(
            request_id=head.request_id,
            code=0,
            timings=pb.Timings(
                queue_ms=result.queue_ms,
                decode_ms=(t1 - t0) * 1e3,
                compute_ms=result.compute_ms,
                encode_ms=(time.perf_counter() - t2) * 1e3,
                batch_size=result.batch_size,
            ),
            sent_at_ms=head.sent_at_ms,
            server_queue_delay_ms=c.batcher.queue_delay_ms(),
        )
        answer.sealed = sealing.seal_response(response_key, binding, encoded, framing.answer_meta(answer))
        return answer

    async def _open_seal(
        self, wanted_key: str, binding: sealing.Binding, sealed: bytes, guard: sealing.ReplayGuard
    ) -> sealing.OpenedRequest:
        """Open the seal with the key it names (replay-checked); a large frame is opened on a thread."""
        if len(sealed) > INLINE_OPEN_BYTES:
            return await asyncio.to_thread(self.ctx.key.open, wanted_key, binding, sealed, guard=guard)
        return self.ctx.key.open(wanted_key, binding, sealed, guard=guard)

    async def _decode_frontier(
        self, bundle: Bundle, cut: Cut, payload: bytes, header: codec.FrameHeader
    ) -> dict[str, np.ndarray]:
        """Decode the frontier, validated against the cut; on a thread when it decodes large.

        The header (read first, cheaply) has already been checked against the rows cap and the
        decoded-bytes budget, so this work is bounded before it starts.
        """
        if header.decoded_bytes > INLINE_DECODE_BYTES:
            return await asyncio.to_thread(self._decode, bundle, cut, payload)
        return self._decode(bundle, cut, payload)

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

    def _failed(
        self,
        request_id: str,
        model: str,
        exc: EdgecutError,
        *,
        sent_at_ms: int = 0,
        seal: tuple[bytes, sealing.Binding] | None = None,
    ) -> pb.Answer:
        """A non-OK answer; authenticated (`seal`: response key, binding) once the request opened."""
        status = grpc.StatusCode[exc.grpc_status]
        self.ctx.metrics.requests.labels(self._label(model), status.name).inc()
        log.debug("rid=%s model=%s: %s: %s", short(request_id), short(model), status.name, exc)
        held_back = self.ctx.limits.logs.admit(status.name)
        if held_back is not None:
            log.info(
                "request failed: %s: %s (%d more %s failure(s) not logged in the last %.0f s; -v shows all)",
                status.name,
                exc,
                held_back,
                status.name,
                self.ctx.limits.logs.interval_s,
            )
        message = f"{exc.message} (hint: {exc.hint})" if exc.hint else exc.message
        answer = pb.Answer(
            request_id=request_id[: sealing.MAX_FIELD_BYTES],
            code=status.value[0],
            message=message,
            sent_at_ms=sent_at_ms,
            server_queue_delay_ms=self.ctx.batcher.queue_delay_ms(),
        )
        if seal is not None:
            response_key, binding = seal
            answer.sealed = sealing.seal_response(response_key, binding, b"", framing.answer_meta(answer))
        return answer

    def _label(self, model: str) -> str:
        """Metric label: served model names only, so clients cannot grow the label space."""
        return model if any(e.key[0] == model for e in self.ctx.registry.entries()) else "unknown"


def _done(
    tasks: dict[str, asyncio.Task[None]],
    rid: str,
    in_flight: PerKeyCap,
    identity: str,
    _task: asyncio.Task[None],
) -> None:
    tasks.pop(rid, None)
    in_flight.release(identity)


def _note_decode(extra: dict[str, Any], cut: str, decode_ms: float) -> None:
    """Running average of open + decode per cut, for ServerInfo: the edge's cost model reads it."""
    seen: dict[str, float] = extra.setdefault("decode_ms", {})
    seen[cut] = decode_ms if cut not in seen else seen[cut] + 0.2 * (decode_ms - seen[cut])


def _model_info(entry: Entry) -> pb.ModelInfo:
    manifest, timings = entry.bundle.manifest, entry.extra.get("timings", {})
    decode = entry.extra.get("decode_ms", {})
    cuts = [
        pb.CutInfo(
            id=cut.id,
            depth=cut.depth,
            tail=[_profile(s, timings) for s in manifest.tail(cut.id)],
            decode_ms=decode.get(cut.id, 0.0),
        )
        for cut in manifest.cuts
    ]
    return pb.ModelInfo(
        name=manifest.model, version=manifest.version, cuts=cuts, manifest_sha256=entry.bundle.build_sha256
    )


def _profile(segment: Segment, timings: dict[str, Any]) -> pb.SegmentProfile:
    name = segment.name
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

    `executor` replaces the ONNX Runtime one (tests use it to gate or count compute).
    """
    ctx, pool = await build_context(config, executor=executor)
    # SO_REUSEPORT off: with it, a second server on a busy port "listens" and the kernel splits
    # connections between the two (with different keys, half the edges fail).
    server = grpc.aio.server(
        options=[*grpc_options(config.max_message_bytes), *KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    edgecut_pb2_grpc.add_TailServiceServicer_to_server(TailServicer(ctx), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, config)
    return TailServer(ctx, server, health_servicer, pool), port


async def build_context(
    config: ServeConfig, *, executor: Executor | None = None
) -> tuple[_Context, ThreadPoolExecutor]:
    """Everything a `TailServicer` needs, without a port: `create_server` and Ray Serve replicas.

    Call on the event loop that will serve (the batcher binds to it); the pool runs the batches.
    """
    key = KeyRing.load(config.key_paths)
    signing = load_signing_public(config.signing_pub) if config.signing_pub else None
    grants = TokenStore(config.tokens) if config.tokens else None
    if grants is not None and config.tls_cert is None:
        log.warning(
            "INSECURE: device tokens are accepted over plaintext gRPC; anyone on the path can read "
            "and reuse them. Serve with --tls-cert/--tls-key."
        )
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
        Limits.of(config),
    )
    return ctx, pool


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
