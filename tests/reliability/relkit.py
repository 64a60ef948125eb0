"""Reliability harness: a tail service in its own process, its /proc vitals, a well-behaved client.

Shared by the short profile (tests/reliability, in CI) and the long one (benchmarks/reliability.py):
both drive the public surface only, `edgecut cloud serve` as a subprocess and the gRPC contract,
so the same checks hold whatever the service does inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from frames import Hostile
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import EdgeClient

from edgecut import framing
from edgecut.cloud.spawn import stop_process
from edgecut.v1 import edgecut_pb2 as pb
from edgecut.v1 import edgecut_pb2_grpc

SHORT, LONG = "short", "long"
FORBIDDEN = frozenset({"UNKNOWN", "INTERNAL"})  # a status that names nothing the client did
CALM_CUT = "c11"  # a deep cut: valid traffic that costs the server little compute


@dataclass
class Service:
    """A running `edgecut cloud serve` child: its process, address and log file."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=framing.grpc_options())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def service_config(path: Path, **fields: object) -> Path:
    """A serve TOML with the reliability defaults (one ORT thread, one warm-up run) plus `fields`."""
    values = {"threads": 1, "warmup_runs": 1, **fields}
    lines = [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def spawned_service(
    bundles: Path, key: Path, workdir: Path, *extra: str, port: int = 0, **config: object
) -> Iterator[Service]:
    """Run `edgecut cloud serve` as a child with its log in a file (read for key material later).

    Not `spawn.tail_service`: that leaves the child's stderr on a pipe nobody reads, and the server
    logs one INFO line per refused frame, so a hostile stream fills the pipe and blocks the server.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    toml = service_config(workdir / f"serve-{time.monotonic_ns()}.toml", **config)
    log_path = workdir / f"serve-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "edgecut.cli", "cloud", "serve", "--config", str(toml)]
    cmd += ["--bundles", str(bundles), "--service-key", str(key), "--port", str(port)]
    cmd += ["--poll-interval-s", "0"]
    cmd += ["--grace-s", "1", *extra]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file)
    try:
        yield Service(proc, _wait_listening(proc, log_path), log_path)
    finally:
        stop_process(proc)  # type: ignore[arg-type]
        if proc.stdout:
            proc.stdout.close()


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 180) -> str:
    lines: list[str] = []
    done = threading.Event()

    def pump() -> None:
        for raw in proc.stdout or ():
            lines.append(raw.decode().strip())
            if lines[-1].startswith("listening "):
                done.set()
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    done.wait(timeout_s)
    for line in lines:
        if line.startswith("listening "):
            return line.split()[1]
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError(f"tail service did not start: {tail}")


# ---------------------------------------------------------------- /proc vitals


@dataclass(frozen=True)
class Vitals:
    rss_kb: int
    fds: int
    threads: int


def vitals(pid: int) -> Vitals:
    """RSS, open descriptors and threads of a process, straight from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Vitals(rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")))


class VitalsSampler:
    """Samples a process's vitals on a thread: (seconds since start, Vitals)."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, Vitals]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> VitalsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - self._t0, vitals(self.pid)))
            if self._stop.wait(self.period_s):
                return

    def peak_rss_kb(self) -> int:
        return max((v.rss_kb for _, v in self.samples), default=0)


# ---------------------------------------------------------------- a well-behaved client


def serving(channel: grpc.Channel) -> bool:
    """The standard health check on the whole server ("" service)."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class WellBehaved:
    """One device doing everything right: a valid request at a time, answer opened and checked.

    Runs on its own thread while hostile traffic goes on; latencies and failures are recorded.
    """

    def __init__(self, edge: EdgeClient, feeds: dict[str, np.ndarray], address: str) -> None:
        self.edge, self.feeds, self.address = edge, feeds, address
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def one(self, stub: edgecut_pb2_grpc.TailServiceStub) -> float:
        """Round-trip ms of one request; raises AssertionError on a wrong or missing answer."""
        pending = self.edge.request(self.feeds, CALM_CUT)
        t0 = time.perf_counter()
        answers = list(stub.Infer(iter(pending.frames), timeout=60))
        ms = (time.perf_counter() - t0) * 1e3
        assert len(answers) == 1, f"{len(answers)} answers to one request"
        outputs = self.edge.result(answers[0], pending)
        assert all(np.isfinite(v).all() for v in outputs.values())
        return ms

    def baseline(self, n: int = 20) -> list[float]:
        with grpc.insecure_channel(self.address, options=framing.grpc_options()) as ch:
            stub = edgecut_pb2_grpc.TailServiceStub(ch)
            self.one(stub)  # first call sets up the channel
            return [self.one(stub) for _ in range(n)]

    def __enter__(self) -> WellBehaved:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address, options=framing.grpc_options()) as ch:
            stub = edgecut_pb2_grpc.TailServiceStub(ch)
            while not self._stop.is_set():
                try:
                    self.latencies_ms.append(self.one(stub))
                except (AssertionError, grpc.RpcError) as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                self._stop.wait(0.05)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Tally:
    """Per-category counts of the statuses seen."""

    by_category: dict[str, dict[str, int]] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # recipe: what was seen, for each unexpected one

    def add(self, category: str, status: str) -> None:
        counts = self.by_category.setdefault(category, {})
        counts[status] = counts.get(status, 0) + 1

    @property
    def frames(self) -> int:
        return sum(sum(c.values()) for c in self.by_category.values())


def status_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return f"CODE_{code}"


def infer_all(
    stub: edgecut_pb2_grpc.TailServiceStub, frames: list[pb.Frame], timeout_s: float = 120
) -> tuple[list[pb.Answer], str | None]:
    """Send frames on one stream, half-close, collect every answer; the RPC's own error if any."""
    answers: list[pb.Answer] = []
    try:
        for answer in stub.Infer(iter(frames), timeout=timeout_s):
            answers.append(answer)
    except grpc.RpcError as exc:
        return answers, str(exc.code().name)  # type: ignore[attr-defined]
    return answers, None


def run_campaign(
    address: str,
    hostiles: Iterator[Hostile],
    *,
    batch_size: int = 64,
    streams: int = 4,
    settle: Callable[[], None] = lambda: None,
    tally: Tally | None = None,
) -> Tally:
    """Send hostile requests in batches over `streams` concurrent streams; tally every answer.

    A batch is answered in full before the next is made (`settle` is then called), so a replay
    always follows its original's answer.
    """
    tally = tally or Tally()
    with (
        grpc.insecure_channel(address, options=framing.grpc_options()) as channel,
        ThreadPoolExecutor(streams) as pool,
    ):
        stub = edgecut_pb2_grpc.TailServiceStub(channel)
        while batch := list(itertools.islice(hostiles, batch_size)):
            shared = [h for h in batch if not h.own_stream]
            parts = [shared[i::streams] for i in range(streams) if shared[i::streams]]
            sent = pool.map(lambda part: infer_all(stub, [f for h in part for f in h.frames]), parts)
            for part, (answers, rpc_error) in zip(parts, sent, strict=True):
                _score(tally, part, answers, rpc_error)
            for h in batch:
                if h.own_stream:
                    _score(tally, [h], *infer_all(stub, list(h.frames)))
            settle()
    return tally


def _score(tally: Tally, part: list[Hostile], answers: list[pb.Answer], rpc_error: str | None) -> None:
    by_id: dict[str, list[pb.Answer]] = {}
    for answer in answers:
        by_id.setdefault(answer.request_id, []).append(answer)
    for h in part:
        got = by_id.pop(h.request_id, [])
        if len(got) == 1:
            status, message = status_name(got[0].code), got[0].message
        elif got:
            status, message = "DUPLICATE", f"{len(got)} answers"
        elif h.own_stream and rpc_error:
            status, message = rpc_error, "the RPC ended"
        else:
            status, message = "NO_ANSWER", f"stream ended with {rpc_error or 'OK'}"
        tally.add(h.category, status)
        if status not in h.allowed:
            tally.bad.append(f"{h.category}: {h.recipe}: got {status} ({message[:160]})")
    for rid, extra in by_id.items():
        tally.add("stray", "STRAY")
        tally.bad.append(f"answer for unknown request id {rid!r} ({len(extra)})")


class Tap:
    """A plain TCP relay on 127.0.0.1 that keeps a copy of every byte it forwards, each way.

    Put behind the link emulator (edge → emulator → tap → service), it records exactly what the
    emulator put on the wire.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = bytearray()
        self.down = bytearray()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> tuple[str, int]:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        )
        self._server = future.result(10)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, copy: bytearray) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    copy += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, self.up), pump(up_reader, writer, self.down))


def contains_any_window(haystack: bytes, needle: bytes, window: int = 24, samples: int = 16) -> bool:
    """Whether any of `samples` evenly spaced `window`-byte slices of `needle` occurs in `haystack`."""
    if len(needle) <= window:
        return needle in haystack
    step = max(1, (len(needle) - window) // samples)
    return any(needle[i : i + window] in haystack for i in range(0, len(needle) - window + 1, step))
