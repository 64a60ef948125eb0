"""Which candidate positions become cuts in the bundle.

A position is *useful* when no earlier position sends fewer bytes: an earlier cut with no more
bytes does less edge work for the same link cost, so the later one only wins when the tail is
slower than the edge. Useful positions are the prefix minima of frontier bytes along depth.
Within a run of adjacent positions crossing the same bytes, the last *batch-first* one is kept
(after the activation, whose bounded range quantizes better than the pre-activation; but a layout
op such as a Transpose after a pooling crosses the same bytes with the batch moved off axis 0).

Every kept cut must be servable: the tail service reads axis 0 of every frontier tensor as the
batch, so a position whose frontier does not carry the model input's batch on axis 0 is never kept
(a transposed `[5, 5, 1, 256]` frontier would be refused as "5 items"). `build.verify_cuts` then
checks each kept cut through the real encode → decode → tail path.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgecut.errors import UsageError
from edgecut.partition.graph import Position

DEFAULT_MAX_CUTS = 16
MAX_FRONTIER_TENSORS = 8  # more tensors than this per cut is a sign of a pathological order


def select_positions(
    positions: Sequence[Position], max_cuts: int = DEFAULT_MAX_CUTS, mode: str = "useful"
) -> list[Position]:
    """Kept positions, in order, including the input (index -1) and the last node (output).

    `max_cuts` counts every cut, input and output included. `mode="all"` keeps every position
    (for tests and exhaustive sweeps) up to `max_cuts`.
    """
    if max_cuts < 2:
        raise UsageError(f"--max-cuts must be at least 2 (input and output), got {max_cuts}")
    first, last = positions[0], positions[-1]
    batch = _batch(first)
    inner = [p for p in positions[1:-1] if batch_first(p, batch)]
    if mode == "all":
        chosen = inner
    elif mode == "useful":
        chosen = _drop_runs(_prefix_minima(inner, first.bytes_fp32))
    else:
        raise UsageError(f"unknown cut selection '{mode}' (use 'useful' or 'all')")
    chosen = [p for p in chosen if 0 < len(p.frontier) <= MAX_FRONTIER_TENSORS]
    return [first, *_thin(chosen, max_cuts - 2), last]


def batch_first(position: Position, batch: int | None) -> bool:
    """Whether every frontier tensor carries the model input's batch on axis 0 (None: unknown
    batch, nothing is proven, so no inner position is)."""
    return batch is not None and all(t.shape and t.shape[0] == batch for t in position.frontier)


def _batch(first: Position) -> int | None:
    sizes = {t.shape[0] for t in first.frontier if t.shape}
    return sizes.pop() if len(sizes) == 1 else None


def _prefix_minima(inner: Sequence[Position], input_bytes: int) -> list[Position]:
    best = input_bytes
    kept = []
    for p in inner:
        if p.bytes_fp32 <= best:
            kept.append(p)
            best = p.bytes_fp32
    return kept


def _drop_runs(kept: list[Position]) -> list[Position]:
    out: list[Position] = []
    for p in kept:
        if out and out[-1].index == p.index - 1 and out[-1].bytes_fp32 == p.bytes_fp32:
            out[-1] = p
        else:
            out.append(p)
    return out


def _thin(chosen: list[Position], budget: int) -> list[Position]:
    """Keep `budget` positions spread evenly over depth, always including the smallest."""
    if len(chosen) <= budget:
        return chosen
    if budget <= 0:
        return []
    smallest = min(chosen, key=lambda p: (p.bytes_fp32, -p.index))
    step = len(chosen) / budget
    picked = {chosen[min(len(chosen) - 1, int((i + 1) * step) - 1)].index for i in range(budget)}
    if smallest.index not in picked:
        picked.discard(min(picked, key=lambda i: abs(i - smallest.index)))
        picked.add(smallest.index)
    return [p for p in chosen if p.index in picked][:budget]
