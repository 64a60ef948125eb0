"""Requests on the `Infer` stream: split into chunks below the gRPC message limit, and rebuilt.

gRPC refuses messages above its receive limit (4 MiB by default) with an opaque error; a large
frontier must therefore be announced (chunk 0 carries count and total size) and sent in pieces.
The reassembler checks the announcement before buffering anything, so a lying client costs at
most `max_request_bytes` per pending request and `max_pending` requests per stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgecut.errors import CodecError, FrameTooLargeError
from edgecut.v1 import edgecut_pb2 as pb

MAX_MESSAGE_BYTES = 8 << 20  # gRPC send/receive limit set on both sides, bytes
CHUNK_BYTES = 4 << 20  # sealed bytes per Frame message, below MAX_MESSAGE_BYTES with headroom
MAX_REQUEST_BYTES = 256 << 20  # largest sealed request a server accepts, bytes


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options that make the message limit explicit on both sides."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


@dataclass(frozen=True)
class RequestHead:
    """What chunk 0 says about a request."""

    request_id: str
    model: str
    version: str
    cut: str
    deadline_ms: int  # absolute unix ms, 0 = none
    sent_at_ms: int


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
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


class Reassembler:
    """Per-stream state: collects chunks until a request is whole. Not thread-safe (one stream)."""

    def __init__(self, max_request_bytes: int = MAX_REQUEST_BYTES, max_pending: int = 64) -> None:
        self.max_request_bytes = max_request_bytes
        self.max_pending = max_pending
        self._pending: dict[str, _Pending] = {}

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
            raise CodecError(f"request '{rid}': chunk {frame.chunk_index} arrived, "
                             f"expected {len(pending.parts)}")
        pending.size += len(frame.sealed)
        if pending.size > pending.total:
            raise CodecError(f"request '{rid}': chunks exceed the announced {pending.total} bytes")
        pending.parts.append(frame.sealed)
        if len(pending.parts) < pending.count:
            return None
        del self._pending[rid]
        if pending.size != pending.total:
            raise CodecError(f"request '{rid}': {pending.size} bytes arrived, "
                             f"{pending.total} announced")
        return pending.head, b"".join(pending.parts)

    def _start(self, rid: str, frame: pb.Frame) -> _Pending:
        if rid in self._pending:
            raise CodecError(f"request '{rid}' started twice on this stream")
        if frame.total_bytes > self.max_request_bytes:
            raise FrameTooLargeError(f"request '{rid}' announces {frame.total_bytes} bytes; "
                                     f"this server accepts at most {self.max_request_bytes}")
        if not 1 <= frame.chunk_count <= max(1, frame.total_bytes):
            raise CodecError(f"request '{rid}': chunk_count {frame.chunk_count} does not fit "
                             f"{frame.total_bytes} bytes")
        if frame.chunk_count > 1 and len(self._pending) >= self.max_pending:
            raise FrameTooLargeError(f"request '{rid}': more than {self.max_pending} chunked "
                                     "requests pending on one stream")
        head = RequestHead(rid, frame.model, frame.version, frame.cut, frame.deadline_ms,
                           frame.sent_at_ms)
        pending = _Pending(head, frame.chunk_count, frame.total_bytes)
        self._pending[rid] = pending
        return pending

    def drop(self) -> int:
        """Forget every partial request (the stream ended); returns how many were dropped."""
        n = len(self._pending)
        self._pending.clear()
        return n
