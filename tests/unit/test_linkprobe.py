"""Background probes are sized to the link estimate and use a small share of it."""

from __future__ import annotations

import pytest

from edgecut.edge.linkprobe import MAX_BYTES, MIN_BYTES, MIN_PERIOD_S, SHARE, probe_plan
from edgecut.link import LinkEstimate


@pytest.mark.parametrize("mbit", [0.05, 0.5, 1, 8, 100, 1000])
def test_probe_is_sized_to_the_estimate_and_its_share(mbit: float) -> None:
    estimate = LinkEstimate(mbit * 1e6, mbit * 1e6, 20.0)
    size, timeout_ms, period_s = probe_plan(estimate)
    assert MIN_BYTES <= size <= MAX_BYTES
    transfer_ms = size * 8 / estimate.up_bps * 1e3
    assert timeout_ms > transfer_ms + estimate.rtt_ms or timeout_ms == 10_000
    assert period_s >= MIN_PERIOD_S
    assert size * 8 / period_s <= SHARE * estimate.up_bps * 1.0001  # at most its share of the link


def test_a_slow_link_gets_a_small_probe() -> None:
    slow, fast = (probe_plan(LinkEstimate(b, b, 20.0))[0] for b in (1e6, 100e6))
    assert slow < fast and slow <= 16 << 10
