"""The tail's times as this agent's own requests saw them; they replace the server's start figures.

ServerInfo's tail profile is timed when the server loads the bundle, on one synthetic input and
an idle CPU, and its decode figure is per cut, for whichever codec was served there. Decoding a
PCA or PNG frame costs several times what int8 costs at the same cut. Every answer reports the
server's decode and compute time for that request. So once this agent has used an option, the
option is planned with those times: decode per (cut, codec), tail compute per cut. Options it has
never used keep the server's figures. Without this, an option whose decode the server
under-reports keeps being chosen, because nothing the agent measures ever reaches the cost table.
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
        out = []
        for c in costs:
            if not c.edge_only:
                c = dataclasses.replace(
                    c,
                    decode_ms=decode.get((c.cut, c.codec), c.decode_ms),
                    cloud_ms=compute.get(c.cut, c.cloud_ms),
                )
            out.append(c)
        return out
