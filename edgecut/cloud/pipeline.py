"""The tail pipeline without a transport: open → decode → validate → batch → run → encode → seal.

In the spirit of LitServe's decode / predict / encode split, every stage is a method and two
entry points chain them: `answer_sealed` turns one reassembled native request (a sealed, encoded
frontier) into its `Answer`, and `infer_tensors` turns plain tensors (the Open Inference Protocol)
into outputs. Both go through the same admission checks, the same batcher (so requests of either
kind share batches) and the same metrics. gRPC servicers call these; so does a benchmark that
wants the service's whole cost without a socket (`benchmarks/cloud_throughput.py`).

Errors are per request: any `EdgecutError` in the sealed path becomes an Answer with that error's
gRPC status; once the seal opened, that answer is sealed too (status, timings and queue delay as
associated data), so nobody on the path can forge it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from edgecut import answers, codec, framing, sealing
from edgecut.bundle import Bundle, Cut
from edgecut.cloud.admission import Caller, check_min_cut, check_rows, recheck
from edgecut.cloud.batcher import BatchResult
from edgecut.cloud.config import DeviceGrant
from edgecut.cloud.context import TailContext
from edgecut.cloud.tokens import TokenStore
from edgecut.errors import CodecError, EdgecutError, ForbiddenError, FrameTooLargeError
from edgecut.framing import RequestHead, short
from edgecut.v1 import edgecut_pb2 as pb

log = logging.getLogger("edgecut.cloud.service")  # one logger for the service's request records

# Frames up to this size are opened on the event loop (well under a millisecond), and decoded there
# when they decode to at most INLINE_DECODE_BYTES; the rest (JPEG, shallow cuts, a zero-filled
# frontier that zstd shrank 1000×) go to a thread so they never stall the other streams.
INLINE_OPEN_BYTES = 64 << 10
INLINE_DECODE_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorAnswer:
    """What `infer_tensors` gives back: the tail's outputs and how they were computed."""

    model: str
    version: str  # the bundle version that served it
    outputs: dict[str, np.ndarray]  # manifest.outputs, in order
    result: BatchResult


class TailPipeline:
    """Requests in, answers out, on one `TailContext`; holds no per-request state."""

    def __init__(self, ctx: TailContext) -> None:
        self.ctx = ctx

    # -- the native sealed path ---------------------------------------------------------------

    async def answer_sealed(self, head: RequestHead, sealed: bytes, caller: Caller) -> pb.Answer:
        """One native request, answered: never raises for a bad request, logs it once."""
        t0 = time.perf_counter()
        try:
            answer = await self._sealed(head, sealed, caller)
        except EdgecutError as exc:
            answer = self.failed(head.request_id, head.model, exc, sent_at_ms=head.sent_at_ms)
        except Exception:
            log.exception("rid=%r model=%r cut=%r: internal error", head.request_id, head.model, head.cut)
            error = EdgecutError("internal error")
            answer = self.failed(head.request_id, head.model, error, sent_at_ms=head.sent_at_ms)
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
        return answer

    async def _sealed(self, head: RequestHead, sealed: bytes, caller: Caller) -> pb.Answer:
        caller = authorize(self.ctx.grants, caller, head.model)
        c = self.ctx
        with c.registry.acquire(head.model, head.version) as entry:
            cut = c.registry.cut(entry, head.cut)
            check_min_cut(c.config, entry.bundle, cut)
            binding = head.binding(caller.identity)
            t0 = time.perf_counter()
            opened = await self.open_request(head.key_id, binding, sealed, caller.grant)
            try:
                return await self._compute(entry.bundle, cut, head, binding, opened, t0, entry.extra)
            except EdgecutError as exc:  # the seal opened: answer with an authenticated error
                seal = (opened.response_key, binding)
                return self.failed(head.request_id, head.model, exc, sent_at_ms=head.sent_at_ms, seal=seal)

    async def open_request(
        self, key_id: str, binding: sealing.Binding, sealed: bytes, grant: DeviceGrant | None
    ) -> sealing.OpenedRequest:
        """Open the seal with the service key the frame names (`key_id`; "" = the primary),
        replay-checked per device; large frames on a thread.

        The one place a request meets the service's private keys (`ctx.credentials`).
        """
        ring = self.ctx.credentials.key
        guard = self.ctx.guards.for_device(grant.device_id if grant is not None else None)
        if len(sealed) > INLINE_OPEN_BYTES:
            return await asyncio.to_thread(ring.open, key_id, binding, sealed, guard=guard)
        return ring.open(key_id, binding, sealed, guard=guard)

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
        payload = opened.payload
        header = codec.header_of(payload, max_bytes=c.config.max_decoded_bytes)
        check_rows(bundle, header, c.config.max_rows_per_request)
        c.limits.decoded.acquire(header.decoded_bytes)
        try:
            feeds = await self.decode(bundle, cut, payload, header)
            t1 = time.perf_counter()
            result = await self.predict(bundle, cut, feeds, deadline_ms=head.deadline_ms)
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
        meta = framing.answer_meta(answer)
        answer.sealed = sealing.seal_response(opened.response_key, binding, encoded, meta)
        m = bundle.manifest
        c.metrics.triton.request(m.model, m.version, True, time.perf_counter() - t0)  # t0: before open
        return answer

    async def decode(
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

    async def predict(
        self, bundle: Bundle, cut: Cut, feeds: Mapping[str, np.ndarray], *, deadline_ms: int = 0
    ) -> BatchResult:
        """Run the tail behind `cut` on validated feeds, batched with whatever else is queued."""
        return await self.ctx.batcher.submit(bundle, cut.id, feeds, deadline_ms=deadline_ms)

    # -- the plain-tensor path (Open Inference Protocol) ----------------------------------------

    async def infer_tensors(
        self,
        caller: Caller,
        model: str,
        version: str,
        cut_id: str,
        feeds: Mapping[str, np.ndarray],
        *,
        deadline_ms: int = 0,
    ) -> TensorAnswer:
        """The tail behind `cut_id` on caller-supplied tensors; raises `EdgecutError` subclasses.

        The same admission as a sealed request: the caller's grant, the operator's minimum cut,
        the rows cap and the decoded-bytes budget; tensors are checked against the cut's frontier.
        """
        caller = authorize(self.ctx.grants, caller, model)
        c = self.ctx
        with c.registry.acquire(model, version) as entry:
            bundle = entry.bundle
            cut = c.registry.cut(entry, cut_id)
            check_min_cut(c.config, bundle, cut)
            rows = check_tensors(bundle, cut, feeds)
            if rows > c.config.max_rows_per_request:
                raise FrameTooLargeError(
                    f"request carries {rows} rows; this server accepts at most "
                    f"{c.config.max_rows_per_request} per request"
                )
            nbytes = sum(int(x.nbytes) for x in feeds.values())
            c.limits.decoded.acquire(nbytes)
            try:
                result = await self.predict(bundle, cut, feeds, deadline_ms=deadline_ms)
            finally:
                c.limits.decoded.release(nbytes)
            outputs = {spec.name: result.outputs[spec.name] for spec in bundle.manifest.outputs}
            return TensorAnswer(bundle.manifest.model, bundle.manifest.version, outputs, result)

    # -- failures and labels --------------------------------------------------------------------

    def failed(
        self,
        request_id: str,
        model: str,
        exc: EdgecutError,
        *,
        sent_at_ms: int = 0,
        seal: tuple[bytes, sealing.Binding] | None = None,
    ) -> pb.Answer:
        """A non-OK answer; authenticated (`seal`: response key, binding) once the request opened."""
        status = self.note_failure(model, exc)
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

    def note_failure(self, model: str, exc: EdgecutError) -> grpc.StatusCode:
        """Count and log a failed request (rate-limited at INFO); its gRPC status."""
        status = grpc.StatusCode[exc.grpc_status]
        self.ctx.metrics.requests.labels(self.label(model), status.name).inc()
        self.ctx.metrics.triton.request(self.label(model), "", False, 0.0)
        log.debug("model=%s: %s: %s", short(model), status.name, exc)
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
        return status

    def label(self, model: str) -> str:
        """Metric label: served model names only, so clients cannot grow the label space."""
        return model if any(e.key[0] == model for e in self.ctx.registry.entries()) else "unknown"


def authorize(tokens: TokenStore | None, caller: Caller, model: str) -> Caller:
    """The caller as the tokens file says now (a revoked token is refused), allowed `model`."""
    caller = recheck(tokens, caller)
    grant = caller.grant
    if grant is not None and not grant.allows(model):
        raise ForbiddenError(f"device {grant.device_id!r} may not use model {short(model)}")
    return caller


def check_tensors(bundle: Bundle, cut: Cut, feeds: Mapping[str, np.ndarray]) -> int:
    """Names, dtypes and shapes against the cut's frontier; the request's rows (axis 0).

    Axis 0 may differ from the manifest's only for a batchable bundle; every other axis is exact.
    """
    specs = {spec.name: spec for spec in cut.frontier}
    if set(feeds) != set(specs):
        raise CodecError(f"{bundle.name} cut {cut.id} takes inputs {sorted(specs)}; got {sorted(feeds)}")
    rows = set()
    for name, spec in specs.items():
        x = feeds[name]
        if x.dtype != np.dtype(spec.dtype):
            raise CodecError(f"input {name!r}: dtype {x.dtype} where {bundle.name} takes {spec.dtype}")
        fixed = spec.shape[1:] if bundle.manifest.batchable else spec.shape
        if x.ndim != len(spec.shape) or tuple(x.shape[x.ndim - len(fixed) :]) != tuple(fixed) or not x.size:
            want = ("N", *spec.shape[1:]) if bundle.manifest.batchable else spec.shape
            raise CodecError(f"input {name!r}: shape {list(x.shape)} where {bundle.name} takes {list(want)}")
        rows.add(int(x.shape[0]) if x.ndim else 1)
    if len(rows) > 1:
        raise CodecError(f"inputs disagree on the batch size: {sorted(rows)}")
    return rows.pop() if rows else 1


def _note_decode(extra: dict[str, Any], cut: str, decode_ms: float) -> None:
    """Running average of open + decode per cut, for ServerInfo: the edge's cost model reads it."""
    seen: dict[str, float] = extra.setdefault("decode_ms", {})
    seen[cut] = decode_ms if cut not in seen else seen[cut] + 0.2 * (decode_ms - seen[cut])
