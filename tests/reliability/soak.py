"""Soak: many long-lived streams of valid requests; errors, latency and the server's vitals.

Each stream is one `Infer` call on its own channel (its own TCP connection), kept open for the whole
run, one request in flight at a time, as a fleet of devices would hold them. Vitals are sampled from
/proc; growth is judged from the end of the warm-up (the first quarter) to the end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from relkit import CALM_CUT, Vitals, VitalsSampler, percentile, vitals
from support import EdgeClient, Stream

from edgecut import framing
from edgecut.v1 import edgecut_pb2_grpc

WARMUP_FRACTION = 0.25


@dataclass
class SoakRun:
    streams: int
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[float, Vitals]] = field(default_factory=list)
    warm: Vitals | None = None  # at the end of the warm-up
    end: Vitals | None = None  # just before the streams close

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + len(self.errors)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def rss_growth(self) -> float:
        """Largest RSS after the warm-up over the RSS at its end, minus one."""
        assert self.warm is not None
        t_warm = self.duration_s * WARMUP_FRACTION
        later = [v.rss_kb for t, v in self.samples if t >= t_warm]
        return max(later, default=self.warm.rss_kb) / self.warm.rss_kb - 1


def run_soak(
    address: str, pid: int, edge: EdgeClient, feeds: dict[str, np.ndarray], streams: int, duration_s: float
) -> SoakRun:
    run = SoakRun(streams, duration_s)
    stop = threading.Event()
    lock = threading.Lock()
    opened = threading.Barrier(streams + 1)

    def device() -> None:
        own_connection = [*framing.grpc_options(), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(address, options=own_connection) as channel:
            stream = Stream(edgecut_pb2_grpc.TailServiceStub(channel))
            first = True
            while first or not stop.is_set():
                pending = edge.request(feeds, CALM_CUT)
                t0 = time.perf_counter()
                try:
                    stream.send(pending)
                    answer = stream.recv(pending.binding.request_id)
                    edge.result(answer, pending)
                    ms, error = (time.perf_counter() - t0) * 1e3, None
                except (AssertionError, grpc.RpcError) as exc:
                    ms, error = 0.0, f"{type(exc).__name__}: {exc}"[:300]
                with lock:
                    (run.errors.append(error) if error else run.latencies_ms.append(ms))
                if first:
                    first = False
                    opened.wait(120)
            stream.close()

    threads = [threading.Thread(target=device, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    opened.wait(120)  # every stream is open and has been answered once
    with VitalsSampler(pid, period_s=0.25) as sampler:
        stop.wait(duration_s * WARMUP_FRACTION)
        run.warm = vitals(pid)
        stop.wait(duration_s * (1 - WARMUP_FRACTION))
        run.end = vitals(pid)
    stop.set()
    for t in threads:
        t.join(60)
    run.samples = sampler.samples
    return run
