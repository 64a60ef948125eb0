"""Cut selection keeps only servable positions: batch on axis 0, as the tail service reads it."""

from __future__ import annotations

from edgecut.bundle import TensorSpec
from edgecut.partition.cuts import select_positions
from edgecut.partition.graph import Position


def pos(index: int, *shape: int) -> Position:
    return Position(index, (TensorSpec(f"t{index}", shape, "float32"),))


def test_equal_size_run_keeps_the_batch_first_position_not_the_transposed_one() -> None:
    positions = [
        pos(-1, 1, 3, 64, 64),
        pos(0, 1, 64, 8, 8),
        pos(1, 1, 64, 5, 5),  # MaxPool
        pos(2, 5, 5, 1, 64),  # Transpose after it: same bytes, batch on axis 2
        pos(3, 1, 10),
    ]
    kept = [p.index for p in select_positions(positions)]
    assert 1 in kept and 2 not in kept


def test_no_inner_position_without_the_batch_on_axis_0_even_when_all_are_kept() -> None:
    positions = [pos(-1, 1, 3, 8, 8), pos(0, 3, 1, 8, 8), pos(1, 1, 4, 4, 4), pos(2, 1, 10)]  # 0: batch on 1
    assert [p.index for p in select_positions(positions, mode="all")] == [-1, 1, 2]
