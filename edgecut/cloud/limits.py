"""Server-wide limits: what one device, one peer or all callers together may hold at once.

Per-stream caps alone multiply by the number of streams a client opens, so the service also caps
streams and in-flight requests per authenticated device (callers without a token or certificate
share the one "anonymous" identity: give devices tokens to keep them apart), the decoded frontier
bytes held by all requests together, and the Probe bytes a device or peer address may ask for per
second. Everything here is used from the server's event loop only, so nothing takes a lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from edgecut.errors import OverloadedError

MAX_TRACKED_KEYS = 10_000  # rate-limited peers remembered; the least recently seen are forgotten


class PerKeyCap:
    """Counts per key (device identity) against one cap; refuses with OverloadedError."""

    def __init__(self, cap: int, what: str) -> None:
        self.cap, self.what = cap, what
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> None:
        held = self._counts.get(key, 0)
        if held >= self.cap:
            raise OverloadedError(
                f"device {key!r} already holds {held} {self.what}; at most {self.cap}",
                hint="close idle streams or wait for answers before sending more",
            )
        self._counts[key] = held + 1

    def release(self, key: str) -> None:
        held = self._counts.get(key, 0) - 1
        if held > 0:
            self._counts[key] = held
        else:
            self._counts.pop(key, None)

    def held(self, key: str) -> int:
        return self._counts.get(key, 0)


class ByteBudget:
    """Bytes held by all requests together (decoded frontiers); refuses past `capacity`."""

    def __init__(self, capacity: int, what: str) -> None:
        self.capacity, self.what = capacity, what
        self.held = 0

    def acquire(self, n: int) -> None:
        if self.held + n > self.capacity:
            raise OverloadedError(
                f"{self.what}: {self.held} bytes held by requests in progress, this one needs {n}; "
                f"at most {self.capacity} in all",
                hint="back off, or run the tail on the device",
            )
        self.held += n

    def release(self, n: int) -> None:
        self.held = max(0, self.held - n)


class RateLimiter:
    """A token bucket per key: `rate` units per second, bursts up to `burst` units."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (level, at)

    def allow(self, key: str, cost: float) -> bool:
        """Take `cost` units from `key`'s bucket; False (nothing taken) when it holds too few."""
        now = self._clock()
        level, at = self._buckets.pop(key, (self.burst, now))
        level = min(self.burst, level + (now - at) * self.rate)
        allowed = level >= cost
        self._buckets[key] = (level - cost if allowed else level, now)
        while len(self._buckets) > MAX_TRACKED_KEYS:
            self._buckets.popitem(last=False)
        return allowed


class LogLimiter:
    """At most one line per key per `interval_s`; counts what it held back in between."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self._clock = interval_s, clock
        self._last: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None: stay quiet. Otherwise log now; the value is how many were held back since."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held_back.pop(key, 0)
