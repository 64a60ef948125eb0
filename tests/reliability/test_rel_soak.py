"""Short soak (the benchmark runs 60 s): 32 long-lived streams, no errors, bounded RSS, no fd or
thread growth in the server process after the warm-up."""

from __future__ import annotations

import numpy as np
import pytest
from relkit import Service, percentile
from soak import run_soak
from support import EdgeClient

STREAMS, DURATION_S = 32, 10.0
RSS_GROWTH = 0.05


def test_soak_32_streams(
    service: Service,
    rel_edge: EdgeClient,
    calm_feeds: dict[str, np.ndarray],
    record_property: pytest.RecordProperty,
) -> None:
    run = run_soak(service.address, service.pid, rel_edge, calm_feeds, STREAMS, DURATION_S)
    record_property("p99_ms", round(run.p99_ms, 1))
    record_property("p50_ms", round(percentile(run.latencies_ms, 50), 1))
    assert run.errors == [], run.errors[:5]
    assert run.requests >= 2 * STREAMS
    assert run.warm is not None and run.end is not None
    assert run.warm.fds >= STREAMS, "each stream should hold its own connection"
    assert run.rss_growth <= RSS_GROWTH, f"RSS grew {run.rss_growth:.1%} after warm-up"
    assert run.end.fds <= run.warm.fds, (run.warm, run.end)
    assert run.end.threads <= run.warm.threads, (run.warm, run.end)
