"""Background link probes for `--cut auto`: off the input path, sized to the link, a small share of it.

While the agent offloads, real transfers keep the link estimate fresh and no probe is sent. While
it runs everything on the device (or the service is down) nothing else measures the link, so a
thread probes: one empty round trip for the RTT, then an upload sized to take `TARGET_MS` at the
current estimate, spaced so probes use at most `SHARE` of it. A probe that times out still says
something (the link is slower than its size over its timeout) and is counted as such, so a link
much slower than the estimate is found instead of looking unmeasurable. The thread also reconnects
a session that has no stream (the service was down at start, or went away) and, after
`FAILURES_TO_DROP` failed rounds, drops a connection that no longer answers probes.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from edgecut.edge.session import TailSession
from edgecut.errors import DeadlineError, EdgecutError
from edgecut.link import LinkEstimate

log = logging.getLogger(__name__)

SHARE = 0.05  # of the estimated uplink that probes may use
TARGET_MS = 100.0  # a probe's upload time at the estimated rate
MIN_BYTES, MAX_BYTES = 16 << 10, 1 << 20  # probe upload size bounds (small ones drown in RTT jitter)
MIN_PERIOD_S = 1.0  # never probe more often than this
MAX_TIMEOUT_MS = 10_000.0
FAILURES_TO_DROP = 2


class ProbeSink(Protocol):
    """What the probes feed: the auto cut's link estimate and cost refresh."""

    def link_estimate(self) -> LinkEstimate: ...
    def seconds_since_transfer(self) -> float: ...
    def probed(self, rtt_ms: float | None, bytes_up: int, wire_ms: float) -> None: ...
    def refresh(self) -> None: ...


def probe_plan(estimate: LinkEstimate) -> tuple[int, float, float]:
    """(upload bytes, timeout ms, period s) of the next probe for the current estimate."""
    size = int(min(MAX_BYTES, max(MIN_BYTES, estimate.up_bps / 8 * TARGET_MS / 1e3)))
    transfer_ms = size * 8 / estimate.up_bps * 1e3
    timeout_ms = min(MAX_TIMEOUT_MS, 4 * (transfer_ms + estimate.rtt_ms) + 500)
    period_s = max(MIN_PERIOD_S, size * 8 / (SHARE * estimate.up_bps))
    return size, timeout_ms, period_s


class LinkProber:
    """A daemon thread probing the link and reconnecting the session; `close` stops it."""

    def __init__(self, session: TailSession, sink: ProbeSink) -> None:
        self.session, self.sink = session, sink
        self._stop = threading.Event()
        self._failures = 0
        self._thread = threading.Thread(target=self._loop, name="edgecut-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(MAX_TIMEOUT_MS / 1e3)

    def _loop(self) -> None:
        period_s = MIN_PERIOD_S
        while not self._stop.wait(period_s):
            try:
                period_s = self.round()
            except Exception:  # the prober must outlive any surprise; the agent runs without it
                log.exception("link probe round failed")
                period_s = MIN_PERIOD_S * 5

    def round(self) -> float:
        """One probe round; returns the seconds until the next one."""
        size, timeout_ms, period_s = probe_plan(self.sink.link_estimate())
        if not self.session.reconnect():
            return MIN_PERIOD_S
        self.sink.refresh()
        if self.sink.seconds_since_transfer() < period_s:
            return period_s  # real traffic measured the link more recently than a probe would
        rtt_ms: float | None = None
        try:
            rtt_ms = self.session.probe(timeout_ms=timeout_ms)
            wire_ms = self.session.probe(size, timeout_ms=timeout_ms)
        except DeadlineError:
            wire_ms = timeout_ms  # slower than this: an upper bound on the bandwidth is news too
            log.info("link probe of %d B took over %.0f ms", size, timeout_ms)
        except EdgecutError as exc:
            self._failed(str(exc))
            return MIN_PERIOD_S
        else:
            self._failures = 0
        self.sink.probed(rtt_ms, size, wire_ms)
        return period_s

    def _failed(self, why: str) -> None:
        """A probe the service did not answer at all: after a few, reconnect (ServerInfo again)."""
        self._failures += 1
        log.info("link probe: %s", why)
        if self._failures >= FAILURES_TO_DROP:
            self._failures = 0
            self.session.drop(f"{FAILURES_TO_DROP} probe rounds in a row failed ({why})")
