"""Requests on the `Infer` stream: split into chunks below the gRPC message limit, and rebuilt.

gRPC refuses messages above its receive limit (4 MiB by default) with an opaque error; a large
frontier must therefore be announced (chunk 0 carries count and total size) and sent in pieces.
The reassembler checks the announcement before buffering anything, so a lying client costs at
most `max_pending_bytes` per stream (announced sizes of its partial requests), and a partial request
whose chunks stop coming is dropped after `max_pending_s`.

Deadlines cross clocks: `Frame.deadline_ms` and `sent_at_ms` are both edge wall clock, so only their
difference (the budget) is meaningful here. A whole request's head carries its deadline on this
host's clock: chunk 0's arrival plus the budget (the absolute value only when `sent_at_ms` is 0).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgecut.errors import CodecError, DeadlineError, EdgecutError, FrameTooLargeError
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
                    f"request '{p.head.request_id}': {len(p.parts)} of "
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
        try:
            return self._add(rid, frame)
        except CodecError:
            self._pending.pop(rid, None)
            raise

    def _add(self, rid: str, frame: pb.Frame) -> tuple[RequestHead, bytes] | None:
        if frame.chunk_index == 0:
            pending = self._start(rid, frame)
        elif rid not in self._pending:
            raise CodecError(f"request '{rid}': chunk {frame.chunk_index} without chunk 0")
        else:
            pending = self._pending[rid]
        if frame.chunk_index != len(pending.parts):
            raise CodecError(
                f"request '{rid}': chunk {frame.chunk_index} arrived, expected {len(pending.parts)}"
            )
        pending.size += len(frame.sealed)
        if pending.size > pending.total:
            raise CodecError(f"request '{rid}': chunks exceed the announced {pending.total} bytes")
        pending.parts.append(frame.sealed)
        if len(pending.parts) < pending.count:
            return None
        del self._pending[rid]
        if pending.size != pending.total:
            raise CodecError(f"request '{rid}': {pending.size} bytes arrived, {pending.total} announced")
        return self._local(pending), b"".join(pending.parts)

    def _local(self, pending: _Pending) -> RequestHead:
        """The head with its deadline on this host's clock, measured from chunk 0's arrival."""
        head = pending.head
        if not head.deadline_ms or not head.sent_at_ms:
            return head
        elapsed_ms = (self._clock() - pending.started_s) * 1e3
        now_ms = time.time_ns() // 1_000_000
        deadline = now_ms - round(elapsed_ms) + head.deadline_ms - head.sent_at_ms
        return dataclasses.replace(head, deadline_ms=max(1, deadline))

    def _start(self, rid: str, frame: pb.Frame) -> _Pending:
        if rid in self._pending:
            raise CodecError(f"request '{rid}' started twice on this stream")
        if frame.total_bytes > self.max_request_bytes:
            raise FrameTooLargeError(
                f"request '{rid}' announces {frame.total_bytes} bytes; "
                f"this server accepts at most {self.max_request_bytes}"
            )
        if not 1 <= frame.chunk_count <= max(1, frame.total_bytes):
            raise CodecError(
                f"request '{rid}': chunk_count {frame.chunk_count} does not fit {frame.total_bytes} bytes"
            )
        if frame.chunk_count > 1 and len(self._pending) >= self.max_pending:
            raise FrameTooLargeError(
                f"request '{rid}': more than {self.max_pending} chunked requests pending on one stream"
            )
        held = sum(p.total for p in self._pending.values())
        if frame.chunk_count > 1 and held + frame.total_bytes > self.max_pending_bytes:
            raise FrameTooLargeError(
                f"request '{rid}': {held} bytes of partial requests already "
                f"pending on this stream; at most {self.max_pending_bytes}"
            )
        head = RequestHead(rid, frame.model, frame.version, frame.cut, frame.deadline_ms, frame.sent_at_ms)
        pending = _Pending(head, frame.chunk_count, frame.total_bytes, self._clock())
        self._pending[rid] = pending
        return pending

    def drop(self) -> int:
        """Forget every partial request (the stream ended); returns how many were dropped."""
        n = len(self._pending)
        self._pending.clear()
        return n
