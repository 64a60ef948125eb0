"""Check the link emulator against the numbers it promises, on 127.0.0.1.

Goodput: push N bytes through the proxy to a sink (upload) or pull N bytes from a source
(download) and time it at the receiving end. A token bucket lets its first `burst_bytes` through
at once by design, so goodput is (N - burst_bytes) / (time - added delay); the raw figure,
N / time, is reported beside it. The added delay is RTT/2 for an upload and a full RTT for a
download (its request goes up first): with it subtracted, goodput must not depend on the RTT.
RTT: ping-pong 64 bytes through the proxy to an echo server, median of 50 after 5 warm-ups; the
raw column is the same measured with no added delay (the proxy's own cost).
Needs a quiet machine: with both cores busy elsewhere, timer wake-ups come late.

    python benchmarks/netem_validate.py            # writes benchmarks/results/netem_validation.json
    python benchmarks/netem_validate.py --quick    # smoke test: one setting of each
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecut.netem import LinkConfig, LinkEmulator

RESULTS = Path(__file__).parent / "results" / "netem_validation.json"
GOODPUT_CASES = [  # (bits/s, bytes, rtt ms); the last checks that delay and bandwidth compose
    (8e6, 2_000_000, 0.0),
    (1e6, 200_000, 0.0),
    (100e6, 20_000_000, 0.0),
    (8e6, 2_000_000, 40.0),
]
RTT_CASES_MS = [20.0, 40.0]
PINGS, WARMUP_PINGS, PING_BYTES = 50, 5, 64
GOODPUT_TOLERANCE_PCT, RTT_TOLERANCE_MS = 5.0, 1.0


@dataclass(frozen=True)
class Result:
    """One measured setting of the link."""

    what: str  # "goodput up", "goodput down" or "rtt"
    rtt_ms: float  # RTT set on the link, ms
    set_value: float  # what was set: bits/s for goodput, ms for rtt
    measured: float  # same unit as set_value
    raw: float  # goodput: N / time, bits/s; rtt: the RTT with no delay added, ms
    error_pct: float  # (measured - set) / set, %
    ok: bool  # within the acceptance tolerance (5 % goodput, 1 ms rtt)


async def _serve(handler: Any) -> tuple[asyncio.Server, tuple[str, int]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionResetError):  # the emulator's stop() resets connections
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _read_all(reader: asyncio.StreamReader, nbytes: int) -> None:
    """Read like a real receiver, in socket-sized pieces (readexactly of 20 MB is much slower)."""
    received = 0
    while received < nbytes:
        data = await reader.read(1 << 20)
        if not data:
            raise ConnectionError(f"stream ended after {received} of {nbytes} bytes")
        received += len(data)


async def _goodput(direction: str, bps: float, nbytes: int, rtt_ms: float) -> Result:
    """Time one bulk transfer at the receiver: from the first byte sent to the last received."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    payload = bytes(nbytes)

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_all(reader, nbytes)
        done.set_result(time.perf_counter())
        writer.close()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)  # the client's go signal
        writer.write(payload)
        await writer.drain()
        writer.close()

    server, address = await _serve(sink if direction == "up" else source)
    link = LinkConfig(up_bps=bps, down_bps=bps, rtt_ms=rtt_ms)
    emulator = LinkEmulator(address, link)
    reader, writer = await asyncio.open_connection(*await emulator.start())
    start = time.perf_counter()
    if direction == "up":
        writer.write(payload)
        await writer.drain()
        end = await done
    else:
        writer.write(b"g")
        await _read_all(reader, nbytes)
        end = time.perf_counter()
    writer.close()
    await emulator.stop()
    server.close()
    seconds = end - start
    delay_s = rtt_ms / 2000 * (1 if direction == "up" else 2)
    measured = (nbytes - link.burst_bytes) * 8 / (seconds - delay_s)
    return _result(f"goodput {direction}", rtt_ms, bps, measured, nbytes * 8 / seconds)


async def _rtt(rtt_ms: float) -> Result:
    """Median ping-pong time through the proxy, next to the same without added delay."""
    server, address = await _serve(_echo)
    medians = []
    for added_ms in (0.0, rtt_ms):
        emulator = LinkEmulator(address, LinkConfig(rtt_ms=added_ms))
        reader, writer = await asyncio.open_connection(*await emulator.start())
        samples = []
        for _ in range(WARMUP_PINGS + PINGS):
            start = time.perf_counter()
            writer.write(bytes(PING_BYTES))
            await reader.readexactly(PING_BYTES)
            samples.append((time.perf_counter() - start) * 1e3)
        medians.append(statistics.median(samples[WARMUP_PINGS:]))
        writer.close()
        await emulator.stop()
    server.close()
    return _result("rtt", rtt_ms, rtt_ms, medians[1], medians[0])


def _result(what: str, rtt_ms: float, set_value: float, measured: float, raw: float) -> Result:
    error_pct = (measured - set_value) / set_value * 100
    if what == "rtt":
        ok = abs(measured - set_value) <= RTT_TOLERANCE_MS
    else:
        ok = abs(error_pct) <= GOODPUT_TOLERANCE_PCT
    return Result(what, rtt_ms, set_value, measured, raw, error_pct, ok)


async def _run_all(quick: bool) -> list[Result]:
    results = []
    for bps, nbytes, rtt_ms in GOODPUT_CASES[:1] if quick else GOODPUT_CASES:
        for direction in ("up", "down"):
            results.append(await _goodput(direction, bps, nbytes, rtt_ms))
    for rtt_ms in RTT_CASES_MS[:1] if quick else RTT_CASES_MS:
        results.append(await _rtt(rtt_ms))
    return results


def _print_table(results: list[Result]) -> None:
    print(f"{'what':<13} {'rtt ms':>6} {'set':>15} {'measured':>9} {'raw':>9} {'error':>8}  ok")
    for r in results:
        unit, scale = ("ms", 1.0) if r.what == "rtt" else ("Mbit/s", 1e-6)
        print(
            f"{r.what:<13} {r.rtt_ms:>6.0f} {r.set_value * scale:>8.3f} {unit:<6} "
            f"{r.measured * scale:>9.3f} {r.raw * scale:>9.3f} {r.error_pct:>+7.2f}%  "
            f"{'yes' if r.ok else 'NO'}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one setting each (CI smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    args = parser.parse_args()
    started = time.perf_counter()
    results = asyncio.run(_run_all(args.quick))
    _print_table(results)
    report = {
        "command": "python benchmarks/netem_validate.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "tolerance": {"goodput_pct": GOODPUT_TOLERANCE_PCT, "rtt_ms": RTT_TOLERANCE_MS},
        "runtime_s": round(time.perf_counter() - started, 1),
        "results": [asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
