"""Estimating the link from real transfers and probes: bandwidth each way, RTT, queue delay.

Split out of `edgecut.planner`, which stays pure math over a given `LinkEstimate`; this module is
the stateful side that produces one. The planner re-exports these names, so
`from edgecut.planner import LinkEstimator` keeps working. Like the planner, the edge agent imports
it, so it must stay free of torch and onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecut.errors import UsageError


@dataclass(frozen=True)
class LinkEstimate:
    """What the network and the tail service look like right now."""

    up_bps: float  # edge → cloud bandwidth, bit/s
    down_bps: float  # cloud → edge bandwidth, bit/s
    rtt_ms: float  # round-trip time of an empty message
    queue_ms: float = 0.0  # time a request waits in the tail service's queue

    def __post_init__(self) -> None:
        if not (self.up_bps > 0 and self.down_bps > 0):
            raise UsageError(f"bandwidth must be positive, got up={self.up_bps} down={self.down_bps}")
        if not (self.rtt_ms >= 0 and self.queue_ms >= 0):
            raise UsageError(f"rtt and queue must be >= 0 ms, got {self.rtt_ms}, {self.queue_ms}")

    def __str__(self) -> str:
        """One line for logs and tables."""
        return (
            f"up {self.up_bps / 1e6:.2f} Mbit/s, down {self.down_bps / 1e6:.2f} Mbit/s, "
            f"rtt {self.rtt_ms:.1f} ms, queue {self.queue_ms:.1f} ms"
        )


class Ewma:
    """Exponentially weighted moving average; the first sample is taken as is."""

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise UsageError(f"EWMA alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha  # weight of the newest sample
        self.value: float | None = None  # None until the first sample

    def add(self, value: float) -> float:
        """Fold in one sample and return the new average."""
        if self.value is None:
            self.value = value
        else:
            self.value += self.alpha * (value - self.value)
        return self.value


DEFAULT_PRIOR = LinkEstimate(up_bps=10e6, down_bps=10e6, rtt_ms=50.0)


class LinkEstimator:
    """Up/down bandwidth, RTT and server queue delay, estimated from real traffic.

    Model of one request's wire time: `wire_ms ≈ rtt + bits_up/up_bps + bits_down/down_bps`.
    One sample cannot separate three unknowns, so RTT comes from small messages (`observe_rtt`:
    Probe replies), the direction that carried fewer bytes is charged at its current estimate,
    and the rest of the time is attributed to the bigger direction (the request frame, in split
    inference). Bandwidth is the ratio of EWMAs of bits and of milliseconds, not an EWMA of
    per-sample rates: timing noise is additive, and a small transfer with a few ms of jitter
    would otherwise swing the estimate wildly. A sample whose transfer time comes out zero or
    negative (RTT estimate too high, clock trouble) carries no bandwidth information and is
    ignored. Until something is observed, `prior` fills in.
    """

    def __init__(self, prior: LinkEstimate = DEFAULT_PRIOR, alpha: float = 0.3) -> None:
        self.prior = prior  # used for every quantity not yet observed
        self._rtt_ms, self._queue_ms = Ewma(alpha), Ewma(alpha)
        self._up_bits, self._up_ms = Ewma(alpha), Ewma(alpha)
        self._down_bits, self._down_ms = Ewma(alpha), Ewma(alpha)

    def observe_transfer(self, bytes_up: int, bytes_down: int, wire_ms: float) -> None:
        """One finished request: bytes each way and wire time (total minus edge and server time)."""
        now = self.estimate()
        transfer_ms = wire_ms - now.rtt_ms
        if bytes_up >= bytes_down:
            down_ms = bytes_down * 8 / now.down_bps * 1000
            _fold(self._up_bits, self._up_ms, bytes_up * 8, transfer_ms - down_ms)
        else:
            up_ms = bytes_up * 8 / now.up_bps * 1000
            _fold(self._down_bits, self._down_ms, bytes_down * 8, transfer_ms - up_ms)

    def restart_uplink(self) -> None:
        """Forget the uplink history (the prior stands in until the next sample): for when probes
        show the link has changed by far more than the averages could follow quickly."""
        self._up_bits, self._up_ms = Ewma(self._up_bits.alpha), Ewma(self._up_ms.alpha)

    def observe_rtt(self, rtt_ms: float) -> None:
        """Round trip of a message small enough that its transfer time is negligible."""
        if rtt_ms >= 0:
            self._rtt_ms.add(rtt_ms)

    def observe_queue(self, queue_ms: float) -> None:
        """Queue delay the tail service reported with an answer or in ServerInfo."""
        if queue_ms >= 0:
            self._queue_ms.add(queue_ms)

    def estimate(self) -> LinkEstimate:
        """Current estimate; the prior stands in for anything not yet observed."""
        return LinkEstimate(
            up_bps=_rate_bps(self._up_bits, self._up_ms, self.prior.up_bps),
            down_bps=_rate_bps(self._down_bits, self._down_ms, self.prior.down_bps),
            rtt_ms=_or(self._rtt_ms.value, self.prior.rtt_ms),
            queue_ms=_or(self._queue_ms.value, self.prior.queue_ms),
        )


def _fold(bits: Ewma, ms: Ewma, n_bits: int, transfer_ms: float) -> None:
    if n_bits > 0 and transfer_ms > 0:
        bits.add(n_bits)
        ms.add(transfer_ms)


def _rate_bps(bits: Ewma, ms: Ewma, prior_bps: float) -> float:
    if bits.value is None or ms.value is None:
        return prior_bps
    return bits.value / ms.value * 1000


def _or(value: float | None, prior: float) -> float:
    return prior if value is None else value
