"""The edge's long-lived connection to the tail service: one bidi `Infer` stream, many requests.

`submit` seals an encoded frontier under a fresh request id, splits it into frames and queues them
on the stream without waiting, so the caller can run the next head while this frame is on the
wire (pipelining). A reader thread matches answers to requests by id (they may come out of order)
and resolves each request's future exactly once: with the opened answer, or with an error that
says whether retrying can help. `wait` enforces the per-request deadline on the edge side too,
so a silent server cannot hold a request forever.

When the stream breaks, every request on it fails with UnavailableError (the caller retries or runs
locally) and the next `submit` reconnects, no sooner than an exponential backoff with jitter allows.
Every (re)connect first asks `ServerInfo` and refuses a server that lacks this model version, serves
another build of it (another manifest sha256) or seals with another key: a wrong key would make
every request fail to open on the server, another build would silently compute other results.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import grpc

from edgecut import serverinfo
from edgecut.answers import FULL, AnswerSpec
from edgecut.costs import CloudTimes
from edgecut.errors import (
    DeadlineError,
    EdgecutError,
    NotFoundError,
    OverloadedError,
    RemoteError,
    SealError,
    UnavailableError,
)
from edgecut.framing import RequestHead, grpc_options, split
from edgecut.keys import ServicePublicKey, key_id
from edgecut.sealing import Binding, open_response, seal_request
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

log = logging.getLogger(__name__)

_STATUS = {s.value[0]: s for s in grpc.StatusCode}
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class SessionConfig:
    """Where the tail service is and how patient to be with it."""

    target: str  # HOST:PORT
    server_key: ServicePublicKey = field(repr=False)  # frames are sealed to this key
    model: str  # model id the bundle names
    version: str  # model version the bundle names
    build: str = ""  # the local bundle's build_sha256; "" = accept any build
    deadline_ms: int = 2000  # per request, from submit to answer
    connect_timeout_ms: int = 2000  # ServerInfo call on (re)connect
    backoff_initial_ms: float = 100.0  # first reconnect delay after a failed connect
    backoff_max_ms: float = 5000.0  # reconnect delay ceiling
    token: str | None = field(default=None, repr=False)  # per-device token, sent as metadata
    tls_ca: bytes | None = field(default=None, repr=False)  # PEM roots; None = plaintext channel
    tls_cert: bytes | None = field(default=None, repr=False)  # client cert PEM for mTLS
    tls_key: bytes | None = field(default=None, repr=False)  # client key PEM for mTLS


@dataclass(frozen=True)
class ServerDescription:
    """What `ServerInfo` said, reduced to what the edge uses."""

    key_id: str
    device: str
    queue_delay_ms: float
    times: CloudTimes  # the server's per-segment tail latency (unprofiled segments left out)
    answer_formats: tuple[str, ...] = ()  # answer kinds the server honours; () = full answers only


@dataclass(frozen=True)
class ServerTimings:
    """Server-side time of one request, in ms, as the answer reports it."""

    queue_ms: float = 0.0
    decode_ms: float = 0.0
    compute_ms: float = 0.0
    encode_ms: float = 0.0
    batch_size: int = 0

    @property
    def total_ms(self) -> float:
        return self.queue_ms + self.decode_ms + self.compute_ms + self.encode_ms


@dataclass(frozen=True)
class Reply:
    """An opened answer: the encoded outputs and what the exchange cost."""

    request_id: str
    payload: bytes  # codec frame of the model outputs
    timings: ServerTimings
    bytes_up: int  # sealed request bytes
    bytes_down: int  # sealed answer bytes
    wire_start: float  # perf_counter when the frames were queued
    received: float  # perf_counter when the answer arrived
    queue_delay_ms: float  # the server's live queue estimate
    answer: AnswerSpec = FULL  # the format `payload` is in (what was asked, or full from an old server)


@dataclass(frozen=True)
class Ticket:
    """A submitted request: wait on it with `TailSession.wait`."""

    request_id: str
    future: Future[Reply] = field(repr=False)
    deadline: float  # perf_counter after which the answer is useless


@dataclass
class _Pending:
    future: Future[Reply]
    binding: Binding
    response_key: bytes
    bytes_up: int
    wire_start: float
    stream: _Stream
    answer: AnswerSpec = FULL


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt (fresh id) or the local tail can help: network, time, load."""
    if isinstance(exc, UnavailableError | DeadlineError | OverloadedError):
        return True
    return isinstance(exc, RemoteError) and exc.status in RETRYABLE


def answer_error(code: int, message: str) -> EdgecutError:
    """The typed error for a non-OK answer."""
    status = _STATUS.get(code, grpc.StatusCode.UNKNOWN).name
    if status == "UNAVAILABLE":
        return UnavailableError(f"tail service: {message}")
    if status == "DEADLINE_EXCEEDED":
        return DeadlineError(f"tail service: {message}")
    if status == "RESOURCE_EXHAUSTED":
        return OverloadedError(f"tail service: {message}")
    return RemoteError(status, message)


class _Stream:
    """One `Infer` call: a queue feeding the request iterator and a thread reading answers."""

    def __init__(
        self,
        stub: edgecut_pb2_grpc.TailServiceStub,
        metadata: Sequence[tuple[str, str]],
        session: TailSession,
    ) -> None:
        self._queue: queue.SimpleQueue[pb.Frame | None] = queue.SimpleQueue()
        self._call = stub.Infer(self._requests(), metadata=metadata)
        self._session = session
        self._reader = threading.Thread(target=self._read, name="edgecut-answers", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.Frame]:
        while (frame := self._queue.get()) is not None:
            yield frame

    def send(self, frames: Sequence[pb.Frame]) -> None:
        for frame in frames:
            self._queue.put(frame)

    def _read(self) -> None:
        error: str = "the server closed the stream"
        try:
            for answer in self._call:
                self._session._on_answer(answer)
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # a dead reader must not leave requests waiting for their deadline
            log.exception("answer reader failed")
            error = f"answer reader failed: {exc!r}"
        finally:
            self._queue.put(None)  # ends the request iterator, so gRPC's consumer thread exits
            self._call.cancel()
            self._session._on_broken(self, error)

    def close(self, timeout_s: float = 1.0) -> None:
        """Half-close (no more requests), give answers `timeout_s` to arrive, then cancel."""
        self._queue.put(None)
        self._reader.join(timeout_s)
        self._call.cancel()


class TailSession:
    """A connection to one tail service for one model version (thread-safe)."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.info: ServerDescription | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._channel: grpc.Channel | None = None
        self._stub: edgecut_pb2_grpc.TailServiceStub | None = None
        self._stream: _Stream | None = None
        self._failures = 0  # consecutive failed connects, for the backoff
        self._retry_at = 0.0  # perf_counter before which no reconnect is tried
        self._metadata = [("authorization", f"Bearer {config.token}")] if config.token else []

    def connect(self) -> ServerDescription:
        """Open channel + stream after checking ServerInfo; raises on a wrong or absent server."""
        channel = self._open_channel()
        stub = edgecut_pb2_grpc.TailServiceStub(channel)
        try:
            reply = stub.ServerInfo(
                pb.ServerInfoRequest(), metadata=self._metadata, timeout=self.config.connect_timeout_ms / 1e3
            )
        except grpc.RpcError as exc:
            channel.close()
            raise UnavailableError(
                f"tail service {self.config.target} is unreachable ({exc.code().name}: {exc.details()})"
            ) from None
        try:
            info = self._check(reply)
        except EdgecutError:
            channel.close()
            raise
        old = self._channel
        with self._lock:
            self._channel, self._stub, self.info = channel, stub, info
            self._stream = _Stream(stub, self._metadata, self)
            self._failures = 0
        if old is not None:
            old.close()
        log.info("connected to %s (%s, key %s)", self.config.target, info.device, info.key_id)
        return info

    def _open_channel(self) -> grpc.Channel:
        c = self.config
        options = [
            *grpc_options(),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(c.backoff_max_ms)),
        ]
        if c.tls_ca is None:
            return grpc.insecure_channel(c.target, options=options)
        creds = grpc.ssl_channel_credentials(c.tls_ca, c.tls_key, c.tls_cert)
        return grpc.secure_channel(c.target, creds, options=options)

    def _check(self, reply: pb.ServerInfoReply) -> ServerDescription:
        c = self.config
        model = next((m for m in reply.models if (m.name, m.version) == (c.model, c.version)), None)
        if model is None:
            serves = ", ".join(f"{m.name}:{m.version}" for m in reply.models) or "nothing"
            raise NotFoundError(
                f"server {c.target} has no model '{c.model}' version '{c.version}' (serves: {serves})"
            )
        if c.build and model.manifest_sha256 and model.manifest_sha256 != c.build:
            raise NotFoundError(
                f"server {c.target} serves a different build of {c.model}:{c.version} "
                f"(manifest sha {model.manifest_sha256[:12]} vs local "
                f"{c.build[:12]})"
            )
        mine = key_id(c.server_key)
        if reply.key_id != mine:
            raise SealError(
                f"wrong server key: {c.target} opens frames sealed to key "
                f"{reply.key_id}, but --server-key is key {mine}",
                hint="copy this server's service.pub to the device",
            )
        times = serverinfo.tail_info(reply, model).times
        formats = tuple(reply.answer_formats)
        return ServerDescription(reply.key_id, reply.device, reply.queue_delay_ms, times, formats)

    def submit(self, cut: str, payload: bytes, answer: AnswerSpec | None = None) -> Ticket:
        """Seal `payload` for `cut` under a fresh request id and queue it; never blocks on the wire.

        `answer` (sealed with the request) asks for a compact answer; a server that does not
        offer it answers in full, and the Reply says which format came back.
        """
        stream = self._ensure_stream()
        c = self.config
        rid = uuid.uuid4().hex
        binding = Binding(c.model, c.version, cut, rid)
        info = self.info
        if answer is not None and (info is None or answer.kind not in info.answer_formats):
            answer = None  # an older server: it reads only version-1 requests
        sealed, response_key = seal_request(c.server_key, binding, payload, answer=answer)
        now_ms = time.time_ns() // 1_000_000
        head = RequestHead(rid, c.model, c.version, cut, now_ms + c.deadline_ms, now_ms)
        future: Future[Reply] = Future()
        start = time.perf_counter()
        with self._lock:
            if self._stream is not stream:  # broke while sealing: `_on_broken` has already run
                raise UnavailableError(f"stream to {c.target} broke before the request was sent")
            self._pending[rid] = _Pending(
                future, binding, response_key, len(sealed), start, stream, answer or FULL
            )
        stream.send(split(head, sealed))
        return Ticket(rid, future, start + c.deadline_ms / 1e3)

    def _ensure_stream(self) -> _Stream:
        if self._stream is not None:
            return self._stream
        if time.perf_counter() < self._retry_at:
            raise UnavailableError(f"tail service {self.config.target} is unreachable (waiting to reconnect)")
        try:
            self.connect()
        except EdgecutError:
            self._failures += 1
            delay_ms = min(
                self.config.backoff_max_ms, self.config.backoff_initial_ms * 2 ** (self._failures - 1)
            )
            self._retry_at = time.perf_counter() + delay_ms * random.uniform(0.5, 1.0) / 1e3
            raise
        stream = self._stream
        if stream is None:  # broke between connect and now
            raise UnavailableError(f"stream to {self.config.target} closed right after connecting")
        return stream

    def wait(self, ticket: Ticket) -> Reply:
        """The reply, or the request's error; DeadlineError once its deadline has passed."""
        try:
            return ticket.future.result(max(0.0, ticket.deadline - time.perf_counter()))
        except FutureTimeout:
            with self._lock:
                mine = self._pending.pop(ticket.request_id, None) is not None
            if not mine:  # the answer won the race
                return ticket.future.result()
            raise DeadlineError(
                f"request {ticket.request_id}: no answer within {self.config.deadline_ms} ms"
            ) from None

    def probe(self, payload_bytes: int = 0, reply_bytes: int = 0, timeout_ms: float | None = None) -> float:
        """Round trip of a Probe carrying `payload_bytes` up and `reply_bytes` down, in ms.

        `timeout_ms` defaults to the connect timeout.
        """
        stub = self._stub
        if stub is None:
            raise UnavailableError(f"tail service {self.config.target}: not connected")
        t0 = time.perf_counter()
        try:
            stub.Probe(
                pb.ProbeRequest(payload=bytes(payload_bytes), reply_bytes=reply_bytes),
                metadata=self._metadata,
                timeout=(timeout_ms or self.config.connect_timeout_ms) / 1e3,
            )
        except grpc.RpcError as exc:
            raise UnavailableError(f"probe failed: {exc.code().name}") from None
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        """Half-close the stream (answers in flight may still arrive briefly), then the channel."""
        with self._lock:
            stream, channel = self._stream, self._channel
            self._stream = self._channel = self._stub = None
        if stream is not None:
            stream.close()
        if channel is not None:
            channel.close()

    def _on_answer(self, answer: pb.Answer) -> None:
        received = time.perf_counter()
        with self._lock:
            pending = self._pending.pop(answer.request_id, None)
        if pending is None:
            log.debug("answer for unknown or expired request %r dropped", answer.request_id)
            return
        if answer.code != 0:
            pending.future.set_exception(answer_error(answer.code, answer.message))
            return
        try:
            payload = open_response(pending.response_key, pending.binding, answer.sealed)
        except SealError as exc:
            pending.future.set_exception(exc)
            return
        t = answer.timings
        timings = ServerTimings(t.queue_ms, t.decode_ms, t.compute_ms, t.encode_ms, t.batch_size)
        pending.future.set_result(
            Reply(
                answer.request_id,
                payload,
                timings,
                pending.bytes_up,
                len(answer.sealed),
                pending.wire_start,
                received,
                answer.server_queue_delay_ms,
                pending.answer,
            )
        )

    def _on_broken(self, stream: _Stream, error: str) -> None:
        with self._lock:
            if self._stream is stream:
                self._stream = None
            lost = {rid: p for rid, p in self._pending.items() if p.stream is stream}
            for rid in lost:
                del self._pending[rid]
        if lost:
            log.warning(
                "stream to %s broke (%s): %d request(s) in flight", self.config.target, error, len(lost)
            )
        for p in lost.values():
            p.future.set_exception(UnavailableError(f"stream to {self.config.target} broke: {error}"))
