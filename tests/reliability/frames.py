"""Hostile frames for the tail service, each with the statuses a correct service may answer.

Every frame starts from what a real edge sends (`support.EdgeClient.request`: head → codec → HPKE
seal → chunks) and is then broken one way, so the suite follows the wire contract as it evolves.
A `Hostile` is one request: its frames, the id its answer must carry, the category and a recipe
(what was done, enough to rebuild it in a bug report) and the set of acceptable gRPC statuses.
UNKNOWN and INTERNAL are never acceptable: they name nothing the client did.

Categories (the `CATEGORIES` order is the round-robin order of `generate`):
valid, random, bitflip_head, bitflip_payload, bitflip_ciphertext, wrong_target, shape_lie,
dtype_lie, truncated, oversized, decompression_bomb, row_bomb, replay, wrong_key.
"""

from __future__ import annotations

import os
import random
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zstandard
from support import EdgeClient

from edgecut import codec
from edgecut.bundle import TensorSpec
from edgecut.keys import ServicePublicKey
from edgecut.v1 import edgecut_pb2 as pb

INVALID, SEAL, NOT_FOUND, TOO_BIG, LATE = (
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
)
OK = "OK"
CATEGORIES = (
    "valid",
    "random",
    "bitflip_head",
    "bitflip_payload",
    "bitflip_ciphertext",
    "wrong_target",
    "shape_lie",
    "dtype_lie",
    "truncated",
    "oversized",
    "decompression_bomb",
    "row_bomb",
    "replay",
    "wrong_key",
)
VALID_CODEC = codec.CodecSpec("int8", zstd_level=3)
GRPC_LIMIT_BYTES = 8 << 20  # framing.MAX_MESSAGE_BYTES: a single message above it is refused by gRPC


@dataclass(frozen=True)
class Hostile:
    category: str
    recipe: str
    frames: tuple[pb.Frame, ...]
    allowed: frozenset[str]
    request_id: str
    own_stream: bool = False  # the RPC itself is expected to end with one of `allowed`


@dataclass
class FrameFactory:
    """Builds hostile requests at `cut` from a real frontier `feeds` (one row)."""

    edge: EdgeClient
    feeds: dict[str, np.ndarray]
    cut: str
    other_cut: str  # a cut with another frontier shape, for "right seal, wrong tensors"
    other_feeds: dict[str, np.ndarray]
    stranger: ServicePublicKey  # a service key that is not the server's
    rng: random.Random = field(default_factory=random.Random)
    _fresh: list[tuple[pb.Frame, ...]] = field(default_factory=list)  # valid, not yet answered
    _replayable: list[tuple[pb.Frame, ...]] = field(default_factory=list)  # valid and answered

    # ------------------------------------------------------------ helpers

    def _specs(self, feeds: dict[str, np.ndarray]) -> list[TensorSpec]:
        return [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in feeds.items()]

    def payload(self, feeds: dict[str, np.ndarray] | None = None) -> bytes:
        feeds = self.feeds if feeds is None else feeds
        return codec.encode(feeds, self._specs(feeds), VALID_CODEC)

    def _sealed(self, payload: bytes, cut: str | None = None, **head: str) -> tuple[pb.Frame, ...]:
        pending = self.edge.request(self.feeds, cut or self.cut, payload=payload, **head)
        return tuple(pending.frames)

    def _one(self, category: str, recipe: str, frames: tuple[pb.Frame, ...], *allowed: str) -> Hostile:
        return Hostile(category, recipe, frames, frozenset(allowed), frames[0].request_id)

    def _lying_payload(self, tensors: dict[str, np.ndarray], scheme: str = "int8") -> bytes:
        spec = codec.CodecSpec(scheme, zstd_level=3)
        return codec.encode(tensors, self._specs(tensors), spec)

    def _flip(self, data: bytes, lo: int = 0, hi: int | None = None) -> tuple[bytes, int]:
        hi = len(data) if hi is None else min(hi, len(data))
        bit = self.rng.randrange(lo * 8, hi * 8)
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out), bit

    # ------------------------------------------------------------ categories

    def valid(self) -> Hostile:
        frames = self._sealed(self.payload())
        self._fresh.append(frames)
        return self._one("valid", "a correct frame (control)", frames, OK)

    def random(self) -> Hostile:
        kind = self.rng.choice(("bytes", "zeros", "ones", "tiny"))
        n = {"tiny": self.rng.randrange(0, 80)}.get(kind, self.rng.randrange(80, 8192))
        body = {"bytes": os.urandom(n), "zeros": bytes(n), "ones": b"\xff" * n, "tiny": os.urandom(n)}[kind]
        frame = pb.Frame(
            request_id=uuid.uuid4().hex,
            model=self.edge.manifest.model,
            version=self.edge.manifest.version,
            cut=self.cut,
            chunk_count=1,
            total_bytes=len(body),
            sealed=body,
        )
        return self._one("random", f"sealed = {kind} x {n}", (frame,), SEAL, INVALID)

    def bitflip_head(self) -> Hostile:
        (frame,) = self._sealed(self.payload())
        which = self.rng.choice(
            ("request_id", "model", "version", "cut", "total_bytes", "deadline_ms", "sent_at_ms")
        )
        if which in ("request_id", "model", "version", "cut"):
            text = getattr(frame, which).encode()
            i = self.rng.randrange(len(text))
            flipped = text[:i] + bytes([text[i] ^ (1 << self.rng.randrange(7)) or 0x41]) + text[i + 1 :]
            setattr(frame, which, flipped.decode())
            recipe, allowed = f"{which} byte {i} bit-flipped", (SEAL, NOT_FOUND, INVALID)
        else:
            bit = self.rng.randrange(64 if which != "total_bytes" else 40)
            setattr(frame, which, getattr(frame, which) ^ (1 << bit))
            recipe = f"{which} bit {bit} flipped"
            # deadline_ms and sent_at_ms are bound into the seal's HPKE info: a flip must not open
            allowed = (INVALID, TOO_BIG) if which == "total_bytes" else (SEAL,)
        return self._one("bitflip_head", recipe, (frame,), *allowed)

    def bitflip_payload(self) -> Hostile:
        payload = self.payload()
        header = codec.header_of(payload)
        where = self.rng.choice(("codec header", "codec body"))
        lo, hi = (0, header.header_bytes) if where == "codec header" else (header.header_bytes, None)
        flipped, bit = self._flip(payload, lo, hi)
        recipe = f"payload bit {bit} ({where}) flipped before sealing"
        return self._one("bitflip_payload", recipe, self._sealed(flipped), OK, INVALID, TOO_BIG)

    def bitflip_ciphertext(self) -> Hostile:
        (frame,) = self._sealed(self.payload())
        where = self.rng.choice(("enc", "ciphertext", "tag"))
        n = len(frame.sealed)
        lo, hi = {"enc": (0, 32), "ciphertext": (32, n - 16), "tag": (n - 16, n)}[where]
        frame.sealed, bit = self._flip(frame.sealed, lo, hi)
        return self._one("bitflip_ciphertext", f"sealed bit {bit} ({where}) flipped", (frame,), SEAL)

    def wrong_target(self) -> Hostile:
        m = self.edge.manifest
        kind = self.rng.choice(("model", "version", "cut", "frame-vs-seal", "tensors-of-another-cut"))
        if kind == "model":
            frames = self._sealed(self.payload(), model="no-such-model")
            return self._one("wrong_target", "unknown model, sealed for it", frames, NOT_FOUND)
        if kind == "version":
            frames = self._sealed(self.payload(), version=m.version + "-nope")
            return self._one("wrong_target", "unknown version, sealed for it", frames, NOT_FOUND)
        if kind == "cut":
            frames = self._sealed(self.payload(), cut="c99")
            return self._one("wrong_target", "unknown cut, sealed for it", frames, NOT_FOUND)
        if kind == "frame-vs-seal":
            (frame,) = self._sealed(self.payload())
            frame.cut = self.other_cut
            return self._one("wrong_target", "frame names another cut than the seal", (frame,), SEAL, INVALID)
        frames = self._sealed(self.payload(self.other_feeds))
        return self._one("wrong_target", f"{self.other_cut} tensors sent to {self.cut}", frames, INVALID)

    def shape_lie(self) -> Hostile:
        name, x = next(iter(self.feeds.items()))
        kind = self.rng.choice(("channels", "spatial", "rank", "name", "extra", "missing"))
        if kind == "channels":
            tensors = {name: np.zeros((1, x.shape[1] + 1, *x.shape[2:]), x.dtype)}
        elif kind == "spatial":
            tensors = {name: np.zeros((1, x.shape[1], x.shape[2] * 2, *x.shape[3:]), x.dtype)}
        elif kind == "rank":
            tensors = {name: np.zeros((1, *x.shape[1:], 1), x.dtype)}
        elif kind == "name":
            tensors = {name + "_": x}
        elif kind == "extra":
            tensors = {name: x, "extra": np.zeros((1, 4), np.float32)}
        else:
            tensors = {"nothing": np.zeros((1,), np.float32)}
        payload = self._lying_payload(tensors)
        return self._one("shape_lie", f"frontier {kind} lie", self._sealed(payload), INVALID)

    def dtype_lie(self) -> Hostile:
        name, x = next(iter(self.feeds.items()))
        dtype = self.rng.choice(("float16", "int64", "int32", "int8", "uint8", "bool"))
        tensors = {name: np.zeros(x.shape, dtype)}
        payload = self._lying_payload(tensors, "fp16" if dtype == "float16" else "int8")
        return self._one("dtype_lie", f"frontier sent as {dtype}", self._sealed(payload), INVALID)

    def truncated(self) -> Hostile:
        kind = self.rng.choice(("sealed-consistent", "sealed-announced", "payload"))
        if kind == "payload":
            payload = self.payload()
            cut_at = self.rng.randrange(0, len(payload))
            frames = self._sealed(payload[:cut_at])
            return self._one("truncated", f"codec payload cut at {cut_at}", frames, INVALID)
        (frame,) = self._sealed(self.payload())
        cut_at = self.rng.randrange(0, len(frame.sealed))
        frame.sealed = frame.sealed[:cut_at]
        if kind == "sealed-consistent":
            frame.total_bytes = cut_at
            return self._one("truncated", f"sealed cut at {cut_at}, total_bytes too", (frame,), SEAL, INVALID)
        return self._one("truncated", f"sealed cut at {cut_at}, full total_bytes", (frame,), INVALID)

    def oversized(self) -> Hostile:
        kind = self.rng.choice(("announced", "decoded", "decoded", "message"))
        if kind == "announced":
            (frame,) = self._sealed(self.payload())
            frame.total_bytes = 1 << self.rng.randrange(27, 63)
            frame.chunk_count = 2
            return self._one("oversized", f"announces {frame.total_bytes} bytes", (frame,), TOO_BIG)
        if kind == "decoded":
            payload = self._claim_shape(rows=1, scale_hw=self.rng.choice((64, 256, 4096)))
            return self._one(
                "oversized",
                "header claims a frontier over the decoded limit",
                self._sealed(payload),
                TOO_BIG,
                INVALID,
            )
        chunks = self._sealed(os.urandom(GRPC_LIMIT_BYTES + 1024))
        frame = pb.Frame()
        frame.CopyFrom(chunks[0])
        frame.sealed, frame.chunk_count = b"".join(c.sealed for c in chunks), 1
        hostile = self._one("oversized", "one gRPC message over the 8 MiB limit", (frame,), TOO_BIG)
        return Hostile(**{**hostile.__dict__, "own_stream": True})

    def _claim_shape(self, rows: int, scale_hw: int) -> bytes:
        """A header claiming rows × (C·scale) frontier of float32, with a tiny body: a bomb."""
        name, x = next(iter(self.feeds.items()))
        shape = (rows, x.shape[1] * scale_hw, *x.shape[2:])
        fixed = struct.pack("<4sBBBBIH", codec.MAGIC, codec.VERSION, 0, 0, 1, 0, 1)
        nbytes = int(np.prod(shape)) * 4
        raw = name.encode()
        tensor = struct.pack("<B", len(raw)) + raw + struct.pack("<BB", 0, len(shape))
        tensor += struct.pack(f"<{len(shape)}I", *shape) + struct.pack("<I", nbytes)
        body = zstandard.ZstdCompressor(level=1).compress(bytes(min(nbytes, 1 << 20)))
        return fixed + tensor + body

    def decompression_bomb(self) -> Hostile:
        name, x = next(iter(self.feeds.items()))
        nbytes = x.size * 4
        kind = self.rng.choice(("no-content-size", "more-than-promised", "corrupt-stream", "over-limit"))
        head = struct.pack("<4sBBBBIH", codec.MAGIC, codec.VERSION, 0, 0, 1, 0, 1)
        raw = name.encode()
        tensor = struct.pack("<B", len(raw)) + raw + struct.pack("<BB", 0, x.ndim)
        tensor += struct.pack(f"<{x.ndim}I", *x.shape) + struct.pack("<I", nbytes)
        if kind == "no-content-size":
            body = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(nbytes))
        elif kind == "more-than-promised":
            body = zstandard.ZstdCompressor().compress(bytes(nbytes * 100))
        elif kind == "corrupt-stream":
            good = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(nbytes))
            body, _ = self._flip(good, 8)  # past the frame header: the checksum catches the rest
        else:
            return self._one(
                "decompression_bomb",
                "zeros claiming over the limit",
                self._sealed(self._claim_shape(1, 4096)),
                TOO_BIG,
                INVALID,
            )
        return self._one(
            "decompression_bomb", f"zstd body: {kind}", self._sealed(head + tensor + body), INVALID, TOO_BIG
        )

    def row_bomb(self) -> Hostile:
        """Many rows claimed (zeros, compressing ~1000×): one small frame, N times the compute."""
        rows = self.rng.choice((2, 8, 32, 111))
        tensors = {k: np.zeros((rows, *v.shape[1:]), v.dtype) for k, v in self.feeds.items()}
        payload = codec.encode(tensors, self._specs(tensors), VALID_CODEC)
        return self._one(
            "row_bomb", f"{rows} zero rows in {len(payload)} bytes", self._sealed(payload), INVALID, TOO_BIG
        )

    def replay(self) -> Hostile:
        if not self._replayable:
            return self.valid()
        original = self._replayable.pop(self.rng.randrange(len(self._replayable)))
        if self.rng.random() < 0.5:
            return self._one("replay", "an answered valid frame sent again", original, SEAL)
        frame = pb.Frame()
        frame.CopyFrom(original[0])
        frame.request_id = uuid.uuid4().hex
        return self._one("replay", "an answered frame under a fresh request id", (frame,), SEAL)

    def wrong_key(self) -> Hostile:
        frames = tuple(self.edge.request(self.feeds, self.cut, public=self.stranger).frames)
        return self._one("wrong_key", "sealed to another service key", frames, SEAL)

    def settle(self) -> None:
        """Everything sent so far was answered: its valid frames may now be replayed."""
        self._replayable += self._fresh
        self._fresh.clear()
        del self._replayable[:-256]

    def make(self, category: str) -> Hostile:
        return getattr(self, category)()  # type: ignore[no-any-return]


def generate(factory: FrameFactory, n: int, categories: tuple[str, ...] = CATEGORIES) -> Iterator[Hostile]:
    """`n` hostile requests, round-robin over `categories` (replays only of already-made valid ones)."""
    for i in range(n):
        yield factory.make(categories[i % len(categories)])
