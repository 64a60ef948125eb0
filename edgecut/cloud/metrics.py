"""Prometheus metrics of one tail service, on their own registry.

A per-server `CollectorRegistry` (not prometheus_client's global one) lets tests and benchmarks run
several servers in one process without "duplicated timeseries" errors, and keeps the endpoint free
of unrelated process metrics. Labels are bounded: model names come from served bundles, and status
is a gRPC status name, so a hostile client cannot grow the label space.

The `nv_inference_*` series repeat the figures under the names NVIDIA Triton exports, so Triton
dashboards and alerts work unchanged (labels `model`, `version`; durations cumulative, in µs).
They are gauges only so that the names come out exactly as Triton's: prometheus_client appends
`_total` to every counter. They only ever go up, so `rate()` applies as to Triton's.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Counters and histograms the service updates; `serve_http` exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgecut_requests", "Requests answered, by model and status", ["model", "status"], registry=r
        )
        self.queue_seconds = Histogram(
            "edgecut_queue_seconds",
            "Time waiting for a batch slot",
            ["model"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "edgecut_compute_seconds",
            "Tail compute time per batch",
            ["model"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edgecut_batch_size", "Requests per batch", ["model", "mode"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.bytes_in = Counter("edgecut_bytes_in", "Sealed request bytes received", ["model"], registry=r)
        self.bytes_out = Counter("edgecut_bytes_out", "Sealed answer bytes sent", ["model"], registry=r)
        self.queue_delay_ms = Gauge("edgecut_queue_delay_ms", "Live queue delay estimate (EWMA)", registry=r)
        self.triton = TritonMetrics(r)
        self._http: WSGIServer | None = None

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class TritonMetrics:
    """Triton's per-model series: requests, inferences (rows), executions and their durations."""

    def __init__(self, r: CollectorRegistry) -> None:
        def series(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model", "version"], registry=r)

        self.success = series("nv_inference_request_success", "Successful inference requests")
        self.failure = series("nv_inference_request_failure", "Failed inference requests")
        self.count = series("nv_inference_count", "Inferences performed (a request of N rows counts N)")
        self.exec_count = series("nv_inference_exec_count", "Model executions (a batch counts once)")
        self.request_us = series("nv_inference_request_duration_us", "Cumulative request duration, us")
        self.queue_us = series("nv_inference_queue_duration_us", "Cumulative time requests queued, us")
        self.compute_us = series(
            "nv_inference_compute_infer_duration_us", "Cumulative compute time of requests' batches, us"
        )

    def request(self, model: str, version: str, ok: bool, seconds: float) -> None:
        (self.success if ok else self.failure).labels(model, version).inc()
        if ok:
            self.request_us.labels(model, version).inc(seconds * 1e6)
