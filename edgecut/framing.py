"""Requests on the `Infer` stream: split into chunks below the gRPC message limit, and rebuilt.

gRPC refuses messages above its receive limit (4 MiB by default) with an opaque error; a large
frontier must therefore be announced (chunk 0 carries count and total size) and sent in pieces.
The reassembler checks the announcement before buffering anything, so a lying client costs at
most `max_pending_bytes` per stream (announced sizes of its partial requests), and a partial request
whose chunks stop coming is dropped after `max_pending_s`.

Deadlines cross clocks: `Frame.deadline_ms` and `sent_at_ms` are both edge wall clock, so only their
difference (the budget) is meaningful here. A whole request's head carries its deadline on this
host's clock: chunk 0's arrival plus the budget (the absolute value only when `sent_at_ms` is 0).
The values as sent stay on the head too: they are bound into the seal (`sealing.Binding`).

`build_request` is the one place a sealed request is built (edge, tests and benchmarks use it), so
the binding, the seal and the chunk heads can never disagree. String fields are capped at
`sealing.MAX_FIELD_BYTES` when chunk 0 arrives, before anything is buffered or logged.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from edgecut.answers import AnswerSpec
from edgecut.errors import CodecError, DeadlineError, EdgecutError, FrameTooLargeError
from edgecut.keys import ServicePublicKey, key_id
from edgecut.sealing import ANONYMOUS, MAX_FIELD_BYTES, AnswerMeta, Binding, seal_request
from edgecut.v1 import edgecut_pb2 as pb

MAX_MESSAGE_BYTES = 8 << 20  # gRPC send/receive limit set on both sides, bytes
CHUNK_BYTES = 4 << 20  # sealed bytes per Frame message, below MAX_MESSAGE_BYTES with headroom
MAX_DECODED_BYTES = 64 << 20  # largest decoded frontier a server accepts, bytes
# Largest sealed request a server accepts, bytes: a frontier sent raw (no zstd) is its decoded size
# plus the codec header (scales, offsets) and the seal; anything larger cannot decode in bounds.
MAX_REQUEST_BYTES = MAX_DECODED_BYTES + (1 << 20)
MAX_PENDING_S = 30.0  # a partial request whose chunks stop arriving is dropped after this, s


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options that make the message limit explicit on both sides."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


@dataclass(frozen=True)
class RequestHead:
    """What chunk 0 says about a request."""

    request_id: str
    model: str
    version: str
    cut: str
    deadline_ms: int  # absolute unix ms, 0 = none (edge clock; on this host once reassembled)
    sent_at_ms: int  # edge wall clock when chunk 0 was sent, unix ms
    sent_deadline_ms: int | None = None  # deadline_ms as sent (edge clock); None = deadline_ms
    key_id: str = ""  # the service key the request is sealed to (edgecut.keyring); "" = primary

    def binding(self, identity: str = ANONYMOUS) -> Binding:
        """What the request's seal must be bound to, for a sender authenticated as `identity`."""
        deadline = self.deadline_ms if self.sent_deadline_ms is None else self.sent_deadline_ms
        fields = (self.model, self.version, self.cut, self.request_id)
        return Binding(*fields, identity, deadline, self.sent_at_ms)


@dataclass(frozen=True)
class SealedRequest:
    """A request ready for the wire: its frames, and what opening its answer needs."""

    frames: list[pb.Frame]
    binding: Binding
    response_key: bytes = field(repr=False)
    sealed_bytes: int


def build_request(
    public: ServicePublicKey,
    binding: Binding | None = None,
    payload: bytes = b"",
    *,
    model: str = "",
    version: str = "",
    cut: str = "",
    identity: str = ANONYMOUS,
    deadline_ms: int = 0,
    request_id: str | None = None,
    now_ms: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    answer: AnswerSpec | None = None,
) -> SealedRequest:
    """Seal `payload` and split it into frames: the one way a request is built.

    Pass either a complete `binding` (tests forging one) or model/version/cut (+ identity, an
    absolute `deadline_ms` on the edge clock, 0 = none); sent-at is now and the request id fresh.
    `answer` asks for an answer format (sealed with the request); None = the full output.
    """
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if binding is None:
        rid = request_id or uuid.uuid4().hex
        binding = Binding(model, version, cut, rid, identity, deadline_ms, now)
    sealed, response_key = seal_request(public, binding, payload, now_ms=now, answer=answer)
    head = RequestHead(
        binding.request_id,
        binding.model,
        binding.version,
        binding.cut,
        binding.deadline_ms,
        binding.sent_at_ms,
        key_id=key_id(public),
    )
    return SealedRequest(split(head, sealed, chunk_bytes), binding, response_key, len(sealed))


def cancel_frame(request_id: str) -> pb.Frame:
    """The frame telling the server the edge gave up on `request_id` (it drops the request)."""
    return pb.Frame(request_id=request_id, cancel=True)


def answer_meta(answer: pb.Answer) -> AnswerMeta:
    """The authenticated part of an Answer besides its payload (the seal's associated data)."""
    t = answer.timings
    return AnswerMeta(
        answer.code,
        answer.message,
        t.queue_ms,
        t.decode_ms,
        t.compute_ms,
        t.encode_ms,
        t.batch_size,
        answer.sent_at_ms,
        answer.server_queue_delay_ms,
    )


def short(value: str, limit: int = 64) -> str:
    """`repr` of a client-chosen string, cut to `limit` characters: safe for logs and messages."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"…({len(value)} chars)"


def split(head: RequestHead, sealed: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[pb.Frame]:
    count = max(1, -(-len(sealed) // chunk_bytes))
    frames = []
    for i in range(count):
        part = sealed[i * chunk_bytes : (i + 1) * chunk_bytes]
        frame = pb.Frame(request_id=head.request_id, chunk_index=i, sealed=part)
        if i == 0:
            frame.model, frame.version, frame.cut = head.model, head.version, head.cut
            frame.chunk_count, frame.total_bytes = count, len(sealed)
            frame.deadline_ms, frame.sent_at_ms = head.deadline_ms, head.sent_at_ms
            frame.key_id = head.key_id
        frames.append(frame)
    return frames


@dataclass
class _Pending:
    head: RequestHead
    count: int
    total: int
    started_s: float  # Reassembler clock when chunk 0 arrived
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


class Reassembler:
    """Per-stream state: collects chunks until a request is whole. Not thread-safe (one stream)."""

    def __init__(
        self,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_pending: int = 64,
        *,
        max_pending_bytes: int | None = None,
        max_pending_s: float = MAX_PENDING_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_request_bytes = max_request_bytes
        self.max_pending = max_pending
        self.max_pending_bytes = 2 * max_request_bytes if max_pending_bytes is None else max_pending_bytes
        self.max_pending_s = max_pending_s
        self._clock = clock
        self._pending: dict[str, _Pending] = {}

    def expire(self) -> list[tuple[RequestHead, EdgecutError]]:
        """Drop partial requests older than `max_pending_s`; each with the error to answer."""
        now = self._clock()
        old = [p for p in self._pending.values() if now - p.started_s > self.max_pending_s]
        for p in old:
            del self._pending[p.head.request_id]
        return [
            (
                p.head,
                DeadlineError(
                    f"request {short(p.head.request_id)}: {len(p.parts)} of "
                    f"{p.count} chunks arrived in {self.max_pending_s:g} s; "
                    "dropped"
                ),
            )
            for p in old
        ]

    def add(self, frame: pb.Frame) -> tuple[RequestHead, bytes] | None:
        """The whole request once its last chunk arrives; None while incomplete.

        Raises CodecError / FrameTooLargeError for that request only (its state is dropped).
        """
        rid = frame.request_id
        if not rid:
            raise CodecError("frame has no request_id")
        if len(rid) > MAX_FIELD_BYTES or len(rid.encode("utf-8", errors="surrogatepass")) > MAX_FIELD_BYTES:
            raise CodecError(f"frame request_id {short(rid)} is longer than {MAX_FIELD_BYTES} bytes")
        try:
            return self._add(rid, frame)
        except CodecError:
            self._pending.pop(rid, None)
            raise

    def _add(self, rid: str, frame: pb.Frame) -> tuple[RequestHead, bytes] | None:
        if frame.chunk_index == 0:
            pending = self._start(rid, frame)
        elif rid not in self._pending:
            raise CodecError(f"request {short(rid)}: chunk {frame.chunk_index} without chunk 0")
        else:
            pending = self._pending[rid]
        if frame.chunk_index != len(pending.parts):
            raise CodecError(
                f"request {short(rid)}: chunk {frame.chunk_index} arrived, expected {len(pending.parts)}"
            )
        pending.size += len(frame.sealed)
        if pending.size > pending.total:
            raise CodecError(f"request {short(rid)}: chunks exceed the announced {pending.total} bytes")
        pending.parts.append(frame.sealed)
        if len(pending.parts) < pending.count:
            return None
        del self._pending[rid]
        if pending.size != pending.total:
            raise CodecError(f"request {short(rid)}: {pending.size} bytes arrived, {pending.total} announced")
        return self._local(pending), b"".join(pending.parts)

    def _local(self, pending: _Pending) -> RequestHead:
        """The head with its deadline on this host's clock, measured from chunk 0's arrival."""
        head = pending.head
        if not head.deadline_ms or not head.sent_at_ms:
            return head
        elapsed_ms = (self._clock() - pending.started_s) * 1e3
        now_ms = time.time_ns() // 1_000_000
        deadline = now_ms - round(elapsed_ms) + head.deadline_ms - head.sent_at_ms
        return dataclasses.replace(head, deadline_ms=max(1, deadline), sent_deadline_ms=head.deadline_ms)

    def _start(self, rid: str, frame: pb.Frame) -> _Pending:
        for name in ("model", "version", "cut", "key_id"):
            size = len(getattr(frame, name).encode("utf-8", errors="surrogatepass"))
            if size > MAX_FIELD_BYTES:
                raise CodecError(f"request {short(rid)}: {name} is {size} bytes; at most {MAX_FIELD_BYTES}")
        if rid in self._pending:
            raise CodecError(f"request {short(rid)} started twice on this stream")
        if frame.total_bytes > self.max_request_bytes:
            raise FrameTooLargeError(
                f"request {short(rid)} announces {frame.total_bytes} bytes; "
                f"this server accepts at most {self.max_request_bytes}"
            )
        if not 1 <= frame.chunk_count <= max(1, frame.total_bytes):
            raise CodecError(
                f"request {short(rid)}: chunk_count {frame.chunk_count} "
                f"does not fit {frame.total_bytes} bytes"
            )
        if frame.chunk_count > 1 and len(self._pending) >= self.max_pending:
            raise FrameTooLargeError(
                f"request {short(rid)}: more than {self.max_pending} chunked requests pending on one stream"
            )
        held = sum(p.total for p in self._pending.values())
        if frame.chunk_count > 1 and held + frame.total_bytes > self.max_pending_bytes:
            raise FrameTooLargeError(
                f"request {short(rid)}: {held} bytes of partial requests already "
                f"pending on this stream; at most {self.max_pending_bytes}"
            )
        times = (frame.deadline_ms, frame.sent_at_ms)
        head = RequestHead(rid, frame.model, frame.version, frame.cut, *times, key_id=frame.key_id)
        pending = _Pending(head, frame.chunk_count, frame.total_bytes, self._clock())
        self._pending[rid] = pending
        return pending

    def cancel(self, request_id: str) -> bool:
        """Forget a partial request the edge gave up on; True when one was pending."""
        return self._pending.pop(request_id, None) is not None

    def drop(self) -> int:
        """Forget every partial request (the stream ended); returns how many were dropped."""
        n = len(self._pending)
        self._pending.clear()
        return n
