"""Server-wide limits: per-device caps, the shared byte budget, per-peer rate limits, quiet logs."""

from __future__ import annotations

import pytest

from edgecut.cloud.limits import ByteBudget, LogLimiter, PerKeyCap, RateLimiter
from edgecut.errors import OverloadedError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_per_key_cap_counts_each_device_apart() -> None:
    cap = PerKeyCap(2, "open streams")
    cap.acquire("a")
    cap.acquire("a")
    cap.acquire("b")  # another device is not held back by "a"
    with pytest.raises(OverloadedError, match="device 'a' already holds 2 open streams; at most 2"):
        cap.acquire("a")
    cap.release("a")
    cap.acquire("a")
    assert (cap.held("a"), cap.held("b")) == (2, 1)


def test_byte_budget_is_shared_and_released() -> None:
    budget = ByteBudget(100, "decoded-bytes budget")
    budget.acquire(60)
    with pytest.raises(OverloadedError, match=r"60 bytes held .* this one needs 50; at most 100"):
        budget.acquire(50)
    budget.release(60)
    budget.acquire(100)
    assert budget.held == 100


def test_rate_limiter_refills_over_time_per_key() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10, burst=20, clock=clock)
    assert limiter.allow("p", 15) and not limiter.allow("p", 15)
    assert limiter.allow("q", 15)  # its own bucket
    clock.now = 1.0  # 5 left + 10 refilled
    assert limiter.allow("p", 15) and not limiter.allow("p", 1)


def test_log_limiter_says_how_much_it_held_back() -> None:
    clock = Clock()
    logs = LogLimiter(10.0, clock)
    assert logs.admit("INVALID_ARGUMENT") == 0
    assert [logs.admit("INVALID_ARGUMENT") for _ in range(3)] == [None] * 3
    assert logs.admit("UNAUTHENTICATED") == 0
    clock.now = 10.0
    assert logs.admit("INVALID_ARGUMENT") == 3
