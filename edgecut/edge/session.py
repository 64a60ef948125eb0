"""The edge's long-lived connection to the tail service: one bidi `Infer` stream, many requests.

`submit` seals an encoded frontier under a fresh request id, splits it into frames and queues them
on the stream without waiting, so the caller can run the next head while this frame is on the
wire (pipelining). A reader thread matches answers to requests by id (they may come out of order)
and resolves each request's future exactly once: with the opened answer, or with an error that
says whether retrying can help. `wait` enforces the per-request deadline on the edge side too,
so a silent server cannot hold a request forever.

Several replicas: the target may list several addresses (`127.0.0.1:5001,127.0.0.1:5002`, or
gRPC's own `ipv4:…,…`) or be a name that resolves to many (`dns:///tail.example:50051`). The
channel balances with gRPC's `round_robin` (service config), which skips a replica whose connection
failed and reconnects to it with its own exponential back-off (per endpoint); the session keeps one
stream per replica, sends each request on the next live stream, and replaces a broken stream no
sooner than its own back-off allows. Any replica can answer any frame (frames are sealed to the
service key), so the caller resends a broken stream's requests under fresh ids (`Agent`).

When a stream breaks, every request on it fails with UnavailableError; when every stream is gone the
next `submit` (or `reconnect`, which the agent's background probes call) reconnects, no sooner than
an exponential backoff with jitter allows. Keepalive pings find a silently dead link, and
`MISSED_DEADLINES_RECONNECT` missed deadlines in a row drop the connection, so the next request
reconnects instead of paying one more deadline. Every (re)connect first asks `ServerInfo` and
refuses a server that lacks this model version, serves another build of it (another manifest
sha256) or seals with another key: a wrong key would make every request fail to open on the
server, another build would silently compute other results. `generation` counts connects, so a
planner knows when to re-read `info`.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import grpc

from edgecut import serverinfo
from edgecut.answers import FULL, AnswerSpec
from edgecut.costs import CloudTimes
from edgecut.edge.targets import channel_target
from edgecut.errors import (
    DeadlineError,
    EdgecutError,
    OverloadedError,
    RemoteError,
    SealError,
    UnavailableError,
)
from edgecut.framing import answer_meta, build_request, cancel_frame, grpc_options
from edgecut.keys import ServicePublicKey, key_id
from edgecut.sealing import Binding, device_identity, open_response
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

log = logging.getLogger(__name__)

_STATUS = {s.value[0]: s for s in grpc.StatusCode}
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
MISSED_DEADLINES_RECONNECT = 3  # consecutive requests without an answer in time: drop the connection
KEEPALIVE_MS = 10_000  # HTTP/2 ping period on the channel (the server permits this rate)
KEEPALIVE_TIMEOUT_MS = 5_000  # an unanswered ping this long marks the connection dead
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@dataclass(frozen=True)
class SessionConfig:
    """Where the tail service is and how patient to be with it."""

    target: str  # HOST:PORT, several comma-separated, or a gRPC target (ipv4:…, dns:///…)
    server_key: ServicePublicKey = field(repr=False)  # frames are sealed to this key
    model: str  # model id the bundle names
    version: str  # model version the bundle names
    build: str = ""  # the local bundle's build_sha256; "" = accept any build
    deadline_ms: int = 2000  # per request, from submit to answer
    connect_timeout_ms: int = 2000  # ServerInfo call on (re)connect
    backoff_initial_ms: float = 100.0  # first reconnect delay after a failed connect
    backoff_max_ms: float = 5000.0  # reconnect delay ceiling (also per replica, inside gRPC)
    token: str | None = field(default=None, repr=False)  # per-device token, sent as metadata
    tls_ca: bytes | None = field(default=None, repr=False)  # PEM roots; None = plaintext channel
    tls_cert: bytes | None = field(default=None, repr=False)  # client cert PEM for mTLS
    tls_key: bytes | None = field(default=None, repr=False)  # client key PEM for mTLS
    tls_server_name: str = ""  # name the certificate must carry when `target` is a relay; "" = target's


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
    ahead_done: float | None = None  # perf_counter when the last request queued ahead of this one
    # was answered, less its server time: this one's bytes could not leave before about then
    # (minus one RTT); None when nothing was in flight ahead of it
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
    ahead: frozenset[str]  # requests in flight when this one was queued
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

    def cancel(self) -> None:
        self._call.cancel()

    def close(self, timeout_s: float = 1.0) -> None:
        """Half-close (no more requests), give answers `timeout_s` to arrive, then cancel."""
        self._queue.put(None)
        self._reader.join(timeout_s)
        self._call.cancel()


class TailSession:
    """A connection to a tail service (one or several replicas) for one model version (thread-safe)."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.info: ServerDescription | None = None
        self.generation = 0  # successful connects so far: a change means `info` was re-read
        self._target, self._replicas = channel_target(config.target)
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._answered: OrderedDict[str, float] = OrderedDict()  # rid -> received - server time
        self._channel: grpc.Channel | None = None
        self._stub: edgecut_pb2_grpc.TailServiceStub | None = None
        self._streams: list[_Stream] = []
        self._turn = 0  # round robin over `_streams`
        self._failures = 0  # consecutive failed connects, for the backoff
        self._retry_at = 0.0  # perf_counter before which no reconnect is tried
        self._breaks = 0  # consecutive broken streams without an answer in between
        self._reopen_at = 0.0  # perf_counter before which no broken stream is replaced
        self._missed = 0  # consecutive requests past their deadline
        self._metadata = [("authorization", f"Bearer {config.token}")] if config.token else []
        self.identity = device_identity(config.token, config.tls_cert)  # bound into every seal

    @property
    def connected(self) -> bool:
        return self._channel is not None and bool(self._streams)

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
        with self._lock:
            old, old_streams = self._channel, self._streams
            self._channel, self._stub, self.info = channel, stub, info
            self._streams = [_Stream(stub, self._metadata, self)]
            self._failures = self._breaks = self._missed = 0
            self.generation += 1
        for stream in old_streams:
            stream.close(0)
        if old is not None:
            old.close()
        log.info("connected to %s (%s, key %s)", self.config.target, info.device, info.key_id)
        return info

    def reconnect(self) -> bool:
        """Connect if no stream is open and the backoff allows; whether the session is connected.

        The agent's background probes call this, so an edge that started while the service was
        down (or lost it) finds it again without sending a request first.
        """
        if self.connected:
            return True
        try:
            self._ensure_stream()
        except EdgecutError as exc:
            log.debug("reconnect to %s failed: %s", self.config.target, exc)
            return False
        return True

    def drop(self, why: str) -> None:
        """Close the connection (its requests fail as broken) so the next use reconnects."""
        log.warning("dropping the connection to %s: %s", self.config.target, why)
        with self._lock:
            streams, channel = self._streams, self._channel
            self._streams, self._channel, self._stub = [], None, None
        for stream in streams:
            stream.cancel()
        if channel is not None:
            channel.close()

    def _open_channel(self) -> grpc.Channel:
        c = self.config
        options: list[tuple[str, int | str]] = [
            *grpc_options(),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(c.backoff_max_ms)),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.service_config", _ROUND_ROBIN),
        ]
        if c.tls_ca is None:
            return grpc.insecure_channel(self._target, options=options)
        creds = grpc.ssl_channel_credentials(c.tls_ca, c.tls_key, c.tls_cert)
        if c.tls_server_name:
            options.append(("grpc.ssl_target_name_override", c.tls_server_name))
        return grpc.secure_channel(self._target, creds, options=options)

    def _check(self, reply: pb.ServerInfoReply) -> ServerDescription:
        c = self.config
        where = f"server {c.target}"
        model = serverinfo.find_model(reply, c.model, c.version, where, c.build)
        mine = key_id(c.server_key)
        if mine not in serverinfo.key_ids(reply):
            raise SealError(
                f"wrong server key: {c.target} opens frames sealed to key "
                f"{', '.join(serverinfo.key_ids(reply))}, but --server-key is key {mine}",
                hint="copy this server's service.pub to the device",
            )
        if reply.identity and reply.identity != self.identity:
            raise SealError(
                f"{c.target} authenticates this device as {reply.identity}, but it seals as {self.identity}",
                hint="a client certificate counts only where the server requires one (--client-ca)",
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
        info = self.info
        if answer is not None and (info is None or answer.kind not in info.answer_formats):
            answer = None  # an older server: it reads only version-1 requests
        now_ms = time.time_ns() // 1_000_000
        request = build_request(
            c.server_key,
            payload=payload,
            model=c.model,
            version=c.version,
            cut=cut,
            identity=self.identity,
            deadline_ms=now_ms + c.deadline_ms,
            request_id=rid,
            now_ms=now_ms,
            answer=answer,
        )
        binding, response_key, sealed_bytes = request.binding, request.response_key, request.sealed_bytes
        future: Future[Reply] = Future()
        start = time.perf_counter()
        with self._lock:
            if stream not in self._streams:  # broke while sealing: `_on_broken` has already run
                raise UnavailableError(f"stream to {c.target} broke before the request was sent")
            ahead = frozenset(self._pending)
            self._pending[rid] = _Pending(
                future, binding, response_key, sealed_bytes, start, stream, ahead, answer or FULL
            )
        stream.send(request.frames)
        return Ticket(rid, future, start + c.deadline_ms / 1e3)

    def _ensure_stream(self) -> _Stream:
        """The next live stream in turn; opens a missing replica's stream when its backoff allows,
        and reconnects (ServerInfo first) when none is left."""
        with self._lock:
            streams, channel = list(self._streams), self._stub
            reopen = (
                channel is not None
                and len(streams) < self._replicas
                and time.perf_counter() >= self._reopen_at
            )
            if reopen and channel is not None:
                self._reopen_at = time.perf_counter() + self._reopen_delay_s()
                streams.append(_Stream(channel, self._metadata, self))
                self._streams = streams
            if streams:
                self._turn = (self._turn + 1) % len(streams)
                return streams[self._turn]
        if time.perf_counter() < self._retry_at:
            raise UnavailableError(f"tail service {self.config.target} is unreachable (waiting to reconnect)")
        try:
            self.connect()
        except EdgecutError:
            self._failures += 1
            self._retry_at = time.perf_counter() + self._backoff_ms(self._failures) / 1e3
            raise
        with self._lock:
            if not self._streams:  # broke between connect and now
                raise UnavailableError(f"stream to {self.config.target} closed right after connecting")
            return self._streams[0]

    def _backoff_ms(self, failures: int) -> float:
        c = self.config
        return min(c.backoff_max_ms, c.backoff_initial_ms * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)

    def _reopen_delay_s(self) -> float:
        """After a stream breaks, wait before replacing it: gRPC needs a moment to see the replica
        behind it gone, or round robin may hand the new stream to the dead replica again."""
        return self._backoff_ms(self._breaks) / 1e3 if self._breaks else 0.0

    def wait(self, ticket: Ticket) -> Reply:
        """The reply, or the request's error; DeadlineError once its deadline has passed."""
        try:
            return ticket.future.result(max(0.0, ticket.deadline - time.perf_counter()))
        except FutureTimeout:
            with self._lock:
                pending = self._pending.pop(ticket.request_id, None)
                self._missed += pending is not None
                missed = self._missed
            if pending is None:  # the answer won the race
                return ticket.future.result()
            pending.stream.send([cancel_frame(ticket.request_id)])  # the server drops it
            if missed >= MISSED_DEADLINES_RECONNECT:
                self._missed = 0
                self.drop(f"{missed} requests in a row got no answer within {self.config.deadline_ms} ms")
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
        # The server replies at most 16x the request (no amplification): pad the upload to match.
        payload_bytes = max(payload_bytes, -(-reply_bytes // 16))
        t0 = time.perf_counter()
        try:
            stub.Probe(
                pb.ProbeRequest(payload=bytes(payload_bytes), reply_bytes=reply_bytes),
                metadata=self._metadata,
                timeout=(timeout_ms or self.config.connect_timeout_ms) / 1e3,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineError(f"probe of {payload_bytes} B: no answer in time") from None
            raise UnavailableError(f"probe failed: {exc.code().name}") from None
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        """Half-close the streams (answers in flight may still arrive briefly), then the channel."""
        with self._lock:
            streams, channel = self._streams, self._channel
            self._streams, self._channel, self._stub = [], None, None
        for stream in streams:
            stream.close()
        if channel is not None:
            channel.close()

    def _on_answer(self, answer: pb.Answer) -> None:
        received = time.perf_counter()
        t = answer.timings
        timings = ServerTimings(t.queue_ms, t.decode_ms, t.compute_ms, t.encode_ms, t.batch_size)
        with self._lock:
            pending = self._pending.pop(answer.request_id, None)
            if pending is None:
                log.debug("answer for unknown or expired request %r dropped", answer.request_id)
                return
            self._missed = self._breaks = 0
            done = [self._answered[r] for r in pending.ahead if r in self._answered]
            self._answered[answer.request_id] = received - timings.total_ms / 1e3
            while len(self._answered) > 256:
                self._answered.popitem(last=False)
        payload = b""
        try:  # status, message, timings and queue delay are authenticated with the payload
            if answer.code == 0 or answer.sealed:
                payload = open_response(
                    pending.response_key, pending.binding, answer.sealed, answer_meta(answer)
                )
        except SealError as exc:
            pending.future.set_exception(exc)
            return
        if answer.code != 0:
            pending.future.set_exception(answer_error(answer.code, answer.message))
            return
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
                max(done) if done else None,
                pending.answer,
            )
        )

    def _on_broken(self, stream: _Stream, error: str) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams = [s for s in self._streams if s is not stream]
                self._breaks += 1
                self._reopen_at = time.perf_counter() + self._reopen_delay_s()
            lost = {rid: p for rid, p in self._pending.items() if p.stream is stream}
            for rid in lost:
                del self._pending[rid]
        if lost:
            log.warning(
                "a stream to %s broke (%s): %d request(s) in flight",
                self.config.target,
                error,
                len(lost),
            )
        for p in lost.values():
            p.future.set_exception(UnavailableError(f"stream to {self.config.target} broke: {error}"))
