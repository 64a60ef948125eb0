"""Helpers for tests against a real tail service: a background server and an edge-side client.

`running_server` runs `create_server` on its own event loop in a background thread, so the tests
talk to it with the ordinary (sync) gRPC client exactly as a device would. `EdgeClient` builds
frames the way the edge agent does: head segments → codec → HPKE seal → chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import shutil
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgecut import codec, framing, sealing
from edgecut.bundle import Bundle, TensorSpec, load_bundle, write_manifest
from edgecut.cloud.config import ServeConfig
from edgecut.cloud.service import TailServer, create_server
from edgecut.images import prepare
from edgecut.keys import KeyPaths, ServicePublicKey
from edgecut.runtime import OrtOptions, SegmentChain
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

EXACT = codec.CodecSpec("none", zstd_level=1)


@dataclass
class ServerHandle:
    """A running server: its port, the server object and a way to run coroutines on its loop."""

    port: int
    server: TailServer
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.port}", options=framing.grpc_options())

    def stub(self, channel: grpc.Channel) -> edgecut_pb2_grpc.TailServiceStub:
        return edgecut_pb2_grpc.TailServiceStub(channel)


def serve_config(bundles: Path, keys: KeyPaths, **overrides: Any) -> ServeConfig:
    defaults: dict[str, Any] = {"port": 0, "threads": 1, "warmup_runs": 1, "poll_interval_s": 0}
    return ServeConfig(bundles=bundles, key=keys.service_key, **{**defaults, **overrides})


@contextmanager
def running_server(config: ServeConfig, executor: Any = None) -> Iterator[ServerHandle]:
    """Start a tail service on 127.0.0.1:0 in a background thread; stop it on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[TailServer, int]:
        server, port = await create_server(config, executor=executor)
        await server.start()
        return server, port

    try:
        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        handle = ServerHandle(port, server, loop)
        try:
            yield handle
        finally:
            handle.call(server.stop(1.0))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass(frozen=True)
class Pending:
    """A request as sent: its frames and what is needed to open its answer."""

    frames: list[pb.Frame]
    binding: sealing.Binding
    response_key: bytes


class EdgeClient:
    """Builds frames exactly as an edge would, and opens answers."""

    def __init__(self, bundle: Bundle, public: ServicePublicKey) -> None:
        self.bundle, self.public = bundle, public
        self.manifest = bundle.manifest
        self._chains: dict[str, SegmentChain] = {}

    def frontier(self, image: np.ndarray, cut: str) -> dict[str, np.ndarray]:
        """The head's output at `cut` for a raw photo (the model input itself at "input")."""
        x = {self.manifest.inputs[0].name: prepare(image, self.manifest.preprocess)}
        if cut not in self._chains:
            files = [self.bundle.path(s.file) for s in self.manifest.head(cut)]
            self._chains[cut] = SegmentChain.from_files(files, OrtOptions(threads=1))
        return self._chains[cut].run(x) if self._chains[cut].sessions else x

    def logits(self, image: np.ndarray) -> np.ndarray:
        """The unsplit model's output, for comparison."""
        return self.frontier(image, "output")[self.manifest.outputs[0].name]

    def request(
        self,
        feeds: dict[str, np.ndarray],
        cut: str,
        *,
        spec: codec.CodecSpec = EXACT,
        request_id: str | None = None,
        deadline_ms: int = 0,
        payload: bytes | None = None,
        public: ServicePublicKey | None = None,
        **head: Any,
    ) -> Pending:
        """Frames for one request; `head` overrides model/version in the frame and the seal."""
        m = self.manifest
        fields = {"model": m.model, "version": m.version, "cut": cut, **head}
        norm = (m.preprocess.mean, m.preprocess.std)
        specs = [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in feeds.items()]
        if payload is None:
            payload = codec.encode(feeds, specs, spec, image_norm=norm)
        request = framing.build_request(
            public or self.public,
            payload=payload,
            request_id=request_id,
            deadline_ms=deadline_ms,
            **fields,
        )
        return Pending(request.frames, request.binding, request.response_key)

    def result(self, answer: pb.Answer, pending: Pending) -> dict[str, np.ndarray]:
        assert answer.code == 0, f"code {answer.code}: {answer.message}"
        meta = framing.answer_meta(answer)
        payload = sealing.open_response(pending.response_key, pending.binding, answer.sealed, meta)
        return codec.decode(payload, self.manifest.outputs)


class Stream:
    """One `Infer` stream driven synchronously: `send` frames, `recv` answers by request id."""

    def __init__(self, stub: edgecut_pb2_grpc.TailServiceStub, metadata: Any = None) -> None:
        self._out: queue.Queue[pb.Frame | None] = queue.Queue()
        self._answers = stub.Infer(iter(self._out.get, None), metadata=metadata)
        self._early: dict[str, pb.Answer] = {}

    def send(self, pending: Pending | list[pb.Frame]) -> None:
        # Duck-typed: the test module may see this conftest imported under a second name.
        for frame in pending if isinstance(pending, list) else pending.frames:
            self._out.put(frame)

    def recv(self, request_id: str | None = None) -> pb.Answer:
        """The next answer, or the answer for `request_id` (others are kept for later)."""
        if request_id is None and self._early:
            return self._early.pop(next(iter(self._early)))
        if request_id in self._early:
            return self._early.pop(request_id)
        for answer in self._answers:
            if request_id is None or answer.request_id == request_id:
                return answer
            self._early[answer.request_id] = answer
        raise AssertionError(f"stream ended without an answer for {request_id}")

    def close(self) -> list[pb.Answer]:
        """Half-close and collect the remaining answers."""
        self._out.put(None)
        rest = list(self._early.values()) + list(self._answers)
        self._early.clear()
        return rest

    def cancel(self) -> None:
        self._answers.cancel()  # type: ignore[attr-defined]


def with_version(bundle_dir: Path, target: Path, version: str) -> Path:
    """A copy of a bundle served as another version: same files, rewritten manifest."""
    staging = target.parent / f".{target.name}.tmp"
    shutil.copytree(bundle_dir, staging)
    manifest = load_bundle(staging).manifest
    write_manifest(staging, dataclasses.replace(manifest, version=version))
    staging.rename(target)
    return target
