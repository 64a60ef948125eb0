"""A slow link between edge and cloud, emulated by a user-space TCP proxy.

Linux netem is not available everywhere we test (it is not here), and tests must run without root,
so the link is a transparent asyncio proxy: every byte from the edge goes through a token bucket
(bandwidth) and waits one-way delay (RTT/2) before it is written to the cloud, and the same on the
way back. It never parses what it carries, so gRPC's HTTP/2 stream passes untouched.

Delay and bandwidth compose like a real link: a byte arrives when it has finished serialising
plus the one-way delay, so a 2 MB transfer at 8 Mbit/s and 40 ms RTT takes 2 s + 20 ms, not
2 s plus 20 ms per chunk. Loss is a connection reset (TCP retransmission is not worth
emulating; a reset is what the edge agent has to survive).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import re
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from edgecut.errors import UsageError

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Address = tuple[str, int]

_BANDWIDTH_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_BANDWIDTH_WORDS = {"bit": "bits", "kbit": "kilobits", "mbit": "megabits", "gbit": "gigabits"}
_DURATION_UNITS = {"": 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"

_UNLIMITED_READ_BYTES = 64 * 1024  # big reads when nothing paces them
_MIN_CHUNK_BYTES = 1500  # one Ethernet MTU: slicing finer only costs CPU
_CHUNK_SECONDS = 0.004  # a paced chunk takes about this long to serialise
_QUEUE_CHUNKS = 256  # chunks in flight per direction: with 4 ms chunks, ~1 s of one-way delay


@dataclass(frozen=True)
class LinkConfig:
    """The emulated link; the same object can be swapped in while connections are open."""

    up_bps: float | None = None  # edge→cloud bandwidth, bits/s; None = unlimited
    down_bps: float | None = None  # cloud→edge bandwidth, bits/s; None = unlimited
    rtt_ms: float = 0.0  # round-trip time added, ms (half each way)
    reset_prob: float = 0.0  # probability per forwarded chunk of resetting the connection, 0..1
    burst_bytes: int = 16384  # token bucket depth, bytes: what passes at once after a pause

    def __post_init__(self) -> None:
        for name in ("up_bps", "down_bps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"link {name}={value}: bandwidth must be a positive number")
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise UsageError(f"link rtt_ms={self.rtt_ms}: must be zero or more")
        if not 0.0 <= self.reset_prob <= 1.0:
            raise UsageError(f"link reset_prob={self.reset_prob}: must be between 0 and 1")
        if self.burst_bytes < 1:
            raise UsageError(f"link burst_bytes={self.burst_bytes}: must be at least 1")

    @classmethod
    def parse(cls, bandwidth: str | None, rtt: str | None = None) -> LinkConfig:
        """Build a symmetric link from CLI strings such as ("8mbit", "40ms")."""
        bps = None if bandwidth is None else parse_bandwidth(bandwidth)
        rtt_ms = 0.0 if rtt is None else parse_duration_ms(rtt)
        return cls(up_bps=bps, down_bps=bps, rtt_ms=rtt_ms)


PACED_BURST_S = 0.004  # default bucket depth: this long at the link rate (one paced chunk)


def paced_burst_bytes(bandwidth_bps: float | None) -> int:
    """The bucket depth `edgecut netem` and the sweep use: one paced chunk, never below one MTU.

    A deep bucket lets every frame smaller than it cross at once after a pause, whatever its
    size; one chunk keeps a frame's time close to its bytes over the bandwidth.
    """
    if bandwidth_bps is None:
        return LinkConfig.burst_bytes
    return max(_MIN_CHUNK_BYTES, int(bandwidth_bps / 8 * PACED_BURST_S))


def parse_bandwidth(text: str) -> float:
    """'8mbit' → 8e6 bits/s. Units are tc's: bit, kbit, mbit, gbit (powers of 1000)."""
    accepted = "a number and one of bit, kbit, mbit, gbit (e.g. 8mbit, 0.5mbit, 512kbit)"
    match = re.fullmatch(_NUMBER + r"\s*([a-z/]*)", text.strip().lower())
    if match is None:
        raise UsageError(f"bandwidth {text!r} not understood: give {accepted}")
    number, unit = float(match[1]), match[2].removesuffix("/s")
    if unit not in _BANDWIDTH_UNITS:
        raise UsageError(
            f"bandwidth {text!r}: unknown unit {unit!r}; give {accepted}",
            hint=_unit_hint(unit, match[1]),
        )
    if number <= 0:
        raise UsageError(f"bandwidth {text!r}: must be more than zero")
    return number * _BANDWIDTH_UNITS[unit]


def _unit_hint(unit: str, number: str) -> str:
    """Point 'mbps' or 'MB' (bytes, or ambiguous) at the bit unit the user most likely meant."""
    prefix = unit[:1] if unit[:1] in "kmg" else ""
    bit_unit = prefix + "bit"
    return f"use {bit_unit} ({_BANDWIDTH_WORDS[bit_unit]} per second), e.g. {number}{bit_unit}"


def parse_duration_ms(text: str) -> float:
    """'40ms', '0.04s', '40' (bare numbers are ms) → 40.0 ms."""
    match = re.fullmatch(_NUMBER + r"\s*([a-z]*)", text.strip().lower())
    if match is None or match[2] not in _DURATION_UNITS:
        raise UsageError(
            f"duration {text!r} not understood: give a number of ms, or a number "
            "followed by ms, s or us (e.g. 40ms, 0.04s, 40)"
        )
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_address(text: str) -> Address:
    """'127.0.0.1:8080' or '[::1]:8080' → (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"address {text!r} not understood: give host:port, e.g. 127.0.0.1:50051")
    return host, int(port)


@dataclass(frozen=True)
class LinkStats:
    """Counters since start; bytes are counted when delivered to the far side."""

    bytes_up: int = 0  # bytes delivered edge→cloud
    bytes_down: int = 0  # bytes delivered cloud→edge
    connections: int = 0  # connections accepted
    resets: int = 0  # connections the emulator reset (random loss or reset_all)
    active: int = 0  # connections open now


class _Bucket:
    """A token bucket kept as a virtual clock: when the link finishes sending all it accepted.

    Deadlines from a clock do not drift the way accumulated sleeps do, and late timer wake-ups
    cost nothing as long as the lateness fits in the bucket's depth.
    """

    def __init__(self, rate_bps: float | None, burst_bytes: int) -> None:
        self.bytes_per_s = None if rate_bps is None else rate_bps / 8
        self.burst_bytes = burst_bytes
        self.free_at = -math.inf  # loop time when the link is idle again; -inf = bucket full

    def reserve(self, nbytes: int, now: float) -> float:
        """Put `nbytes` on the wire; return when its last byte has been serialised."""
        if self.bytes_per_s is None:
            return now
        start = max(self.free_at, now - self.burst_bytes / self.bytes_per_s)
        self.free_at = start + nbytes / self.bytes_per_s
        return max(self.free_at, now)

    def retune(self, rate_bps: float | None, burst_bytes: int, now: float) -> None:
        """Change rate for bytes not yet accepted; bytes already on the wire keep their schedule."""
        old_bytes_per_s = self.bytes_per_s
        self.bytes_per_s = None if rate_bps is None else rate_bps / 8
        self.burst_bytes = burst_bytes
        if self.bytes_per_s is None or (old_bytes_per_s is not None and self.free_at >= now):
            return
        # An idle link keeps its saved-up tokens (in bytes), now spent at the new rate.
        credit_bytes = float(burst_bytes)
        if old_bytes_per_s is not None:
            credit_bytes = min(burst_bytes, (now - self.free_at) * old_bytes_per_s)
        self.free_at = now - credit_bytes / self.bytes_per_s

    def read_size(self) -> int:
        """Slice paced reads so each chunk takes ~4 ms: the receiver sees a smooth rate."""
        if self.bytes_per_s is None:
            return _UNLIMITED_READ_BYTES
        chunk = max(_MIN_CHUNK_BYTES, int(self.bytes_per_s * _CHUNK_SECONDS))
        return min(chunk, self.burst_bytes)


class _LinkReset(Exception):
    """The emulated link dropped this connection."""


async def _sleep_until(deadline: float) -> None:
    loop = asyncio.get_running_loop()
    delay = deadline - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _abort(writers: list[asyncio.StreamWriter]) -> None:
    """Close so the peers see a reset, not an orderly EOF: zero linger makes close() send RST."""
    for writer in writers:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


_Queue = asyncio.Queue[tuple[float, bytes] | None]  # (arrival time, chunk); None = end of stream


async def _first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run all until all finish; the first exception cancels the rest and is raised."""
    tasks = [asyncio.create_task(coro) for coro in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (error := task.exception()) is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LinkEmulator:
    """The proxy on the running event loop: listen, forward to `target` through the link.

    Bandwidth belongs to the link, not to a connection: all connections share each direction's
    bucket, as they would share a real uplink.
    """

    def __init__(self, target: Address, config: LinkConfig, listen: Address = ("127.0.0.1", 0)) -> None:
        self.target = target
        self.listen = listen
        self.config = config
        self._up = _Bucket(config.up_bps, config.burst_bytes)
        self._down = _Bucket(config.down_bps, config.burst_bytes)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._counts = {"bytes_up": 0, "bytes_down": 0, "connections": 0, "resets": 0}
        self._rng = random.Random()

    async def start(self) -> Address:
        """Listen; return the bound address (port 0 is replaced by the real port)."""
        self._server = await asyncio.start_server(self._handle, *self.listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        log.info("link emulator %s:%d → %s:%d, %s", host, port, *self.target, self.config)
        return host, port

    async def stop(self) -> None:
        """Stop listening and reset every open connection; returns when all tasks have ended."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task, writers in list(self._connections.items()):
            _abort(writers)
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def set_config(self, config: LinkConfig) -> None:
        """Swap the link; applies to bytes not yet sent, on open connections too."""
        now = asyncio.get_running_loop().time()
        self._up.retune(config.up_bps, config.burst_bytes, now)
        self._down.retune(config.down_bps, config.burst_bytes, now)
        self.config = config

    def reset_all(self) -> None:
        """Reset every open connection, as when the cloud becomes unreachable."""
        for task, writers in list(self._connections.items()):
            if not task.done():
                _abort(writers)
                task.cancel()
                self._counts["resets"] += 1

    @property
    def stats(self) -> LinkStats:
        return LinkStats(**self._counts, active=len(self._connections))

    async def _handle(self, edge_reader: asyncio.StreamReader, edge_writer: asyncio.StreamWriter) -> None:
        """One accepted connection, registered at once so that stop() can end it at any point."""
        task = asyncio.current_task()
        assert task is not None  # a stream handler always runs in a task
        writers = [edge_writer]
        self._connections[task] = writers
        self._counts["connections"] += 1
        try:
            await self._forward(edge_reader, writers)
        except _LinkReset:
            _abort(writers)
            self._counts["resets"] += 1
        except OSError:
            _abort(writers)  # a peer reset us or the target is unreachable: pass it on
        except asyncio.CancelledError:
            pass  # reset_all or stop has already aborted the sockets
        finally:
            del self._connections[task]
            for writer in writers:
                writer.close()

    async def _forward(self, edge_reader: asyncio.StreamReader, writers: list[asyncio.StreamWriter]) -> None:
        """Connect to the target, then run both directions until both have ended."""
        try:
            cloud_reader, cloud_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.warning("link emulator: cannot reach %s:%d (%s)", *self.target, exc)
            raise
        writers.append(cloud_writer)
        up: _Queue = asyncio.Queue(_QUEUE_CHUNKS)
        down: _Queue = asyncio.Queue(_QUEUE_CHUNKS)
        await _first_failure(
            self._pace(edge_reader, self._up, up),
            self._deliver(up, cloud_writer, "bytes_up"),
            self._pace(cloud_reader, self._down, down),
            self._deliver(down, writers[0], "bytes_down"),
        )

    async def _pace(self, reader: asyncio.StreamReader, bucket: _Bucket, queue: _Queue) -> None:
        """Read no faster than the link sends, stamping each chunk with its arrival time."""
        loop = asyncio.get_running_loop()
        while data := await reader.read(bucket.read_size()):
            if self._rng.random() < self.config.reset_prob:
                raise _LinkReset
            sent_at = bucket.reserve(len(data), loop.time())
            await queue.put((sent_at + self.config.rtt_ms / 2000, data))
            await _sleep_until(sent_at)
        await queue.put(None)

    async def _deliver(self, queue: _Queue, writer: asyncio.StreamWriter, counter: str) -> None:
        """Write each chunk when it arrives; pass on a half-close once everything is flushed."""
        while (item := await queue.get()) is not None:
            arrive_at, data = item
            await _sleep_until(arrive_at)
            writer.write(data)
            await writer.drain()
            self._counts[counter] += len(data)
        if writer.can_write_eof():
            writer.write_eof()


class ThreadedLinkEmulator:
    """A `LinkEmulator` on its own event loop in a daemon thread, for sync code and tests.

    `with ThreadedLinkEmulator(target, config) as (host, port): ...`
    """

    def __init__(self, target: Address, config: LinkConfig, listen: Address = ("127.0.0.1", 0)) -> None:
        self.emulator = LinkEmulator(target, config, listen)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Address:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="netem", daemon=True)
        self._thread.start()
        self._loop = loop
        return self._run(self.emulator.start())

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._run(self.emulator.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    def set_config(self, config: LinkConfig) -> None:
        self._call(lambda: self.emulator.set_config(config))

    def reset_all(self) -> None:
        self._call(self.emulator.reset_all)

    @property
    def stats(self) -> LinkStats:
        return self._call(lambda: self.emulator.stats)

    def __enter__(self) -> Address:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("ThreadedLinkEmulator is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the emulator's loop: its state belongs to that thread."""

        async def call() -> _T:
            return fn()

        return self._run(call())


def run_netem(
    listen: str, to: str, bandwidth: str | None, rtt: str | None, burst_bytes: int | None = None
) -> None:
    """CLI body: proxy until Ctrl-C (which propagates, so the CLI exits 130 as every verb does);
    the first stdout line is 'listening HOST:PORT'.

    `burst_bytes` None = `paced_burst_bytes` of the bandwidth (what the sweep uses)."""
    link = LinkConfig.parse(bandwidth, rtt)
    burst = paced_burst_bytes(link.up_bps) if burst_bytes is None else burst_bytes
    link = dataclasses.replace(link, burst_bytes=burst)
    emulator = LinkEmulator(parse_address(to), link, parse_address(listen))

    async def serve() -> None:
        host, port = await emulator.start()
        print(f"listening {host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await emulator.stop()

    asyncio.run(serve())
