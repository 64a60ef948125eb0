"""The tail's times as this agent's own requests saw them; they replace the server's start figures.

ServerInfo's tail profile is timed when the server loads the bundle, on one synthetic input and
an idle CPU, and its decode figure is per cut, for whichever codec was served there. Decoding a
PCA or PNG frame costs several times what int8 costs at the same cut. Every answer reports the
server's decode and compute time for that request. So once this agent has used an option, the
option is planned with those times: decode per (cut, codec), tail compute per cut. Without this,
an option whose decode the server under-reports keeps being chosen, because nothing the agent
measures ever reaches the cost table.

The cuts it has not used yet keep the server's tail figures × how much slower (or faster) the
tail has run than those figures at the cuts it has used: the sum of measured over the sum of
start figures, so that the large tails weigh most and a 1 ms tail's fixed overhead does not set
the ratio. A tail service that runs twice as slow as its warm-up said (a busy host) is twice as
slow at every cut, and without the ratio the agent would try each of them once to find out.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from edgecut.edge.session import ServerTimings
from edgecut.link import Ewma
from edgecut.planner import CutCost

ALPHA = 0.2  # weight of a new answer in the running averages


class ServedTimes:
    """Running averages of the server's own timings for this agent's requests (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decode: dict[tuple[str, str], Ewma] = {}
        self._compute: dict[str, Ewma] = {}
        self.observations = 0  # answers folded in so far
        self.new_figures = 0  # (cut, codec) options that got their first figure

    def observe(self, cut: str, codec: str, timings: ServerTimings) -> None:
        """One answer for (cut, codec). An answer from a server that reports no timings is skipped."""
        if timings.decode_ms <= 0 and timings.compute_ms <= 0:
            return
        with self._lock:
            if (cut, codec) not in self._decode:
                self.new_figures += 1
            self._decode.setdefault((cut, codec), Ewma(ALPHA)).add(timings.decode_ms)
            self._compute.setdefault(cut, Ewma(ALPHA)).add(timings.compute_ms)
            self.observations += 1

    def apply(self, costs: Sequence[CutCost]) -> list[CutCost]:
        """`costs` with the decode and tail times this agent measured where it has them."""
        with self._lock:
            decode = {k: e.value for k, e in self._decode.items() if e.value is not None}
            compute = {k: e.value for k, e in self._compute.items() if e.value is not None}
        ratio = _ratio(costs, compute)
        out = []
        for c in costs:
            if not c.edge_only:
                c = dataclasses.replace(
                    c,
                    decode_ms=decode.get((c.cut, c.codec), c.decode_ms),
                    cloud_ms=compute.get(c.cut, c.cloud_ms * ratio),
                )
            out.append(c)
        return out


def _ratio(costs: Sequence[CutCost], measured: dict[str, float]) -> float:
    """Measured tail time ÷ the start figures, over the cuts measured (1 when none)."""
    start = {c.cut: c.cloud_ms for c in costs if not c.edge_only and c.cut in measured}
    expected = sum(start.values())
    return sum(measured[cut] for cut in start) / expected if expected > 0 else 1.0
