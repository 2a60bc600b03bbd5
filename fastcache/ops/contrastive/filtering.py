"""The gradient filter's tile counts (ContrastiveOptions.filter_eps): how many backward tiles the strategies skipped.

Every strategy that filters adds its (skipped, all) tiles of a call to each :func:`count_filtered_tiles` block
open at the time; nothing is counted (and the tiled strategy reads nothing back from the device) outside one.
The benchmarks report the hit rate from it. Imports nothing of the op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class FilteredTiles:
    """Backward tiles of the calls made inside one :func:`count_filtered_tiles` block: skipped, and all."""

    skipped: int = 0
    total: int = 0

    @property
    def hit_rate(self) -> float:
        """The share of tiles skipped (0.0 before any tile)."""
        return self.skipped / self.total if self.total else 0.0


_OPEN: list[FilteredTiles] = []


@contextlib.contextmanager
def count_filtered_tiles() -> Iterator[FilteredTiles]:
    """``with count_filtered_tiles() as tiles: loss.backward()``: tiles.skipped and tiles.total then count the
    filtered calls made inside."""
    tiles = FilteredTiles()
    _OPEN.append(tiles)
    try:
        yield tiles
    finally:
        _OPEN.remove(tiles)


def counting() -> bool:
    """Whether a :func:`count_filtered_tiles` block is open (a strategy then reads its counts back)."""
    return bool(_OPEN)


def record_filtered_tiles(skipped: int, total: int) -> None:
    """Add a call's tile counts to every open :func:`count_filtered_tiles` block."""
    for tiles in _OPEN:
        tiles.skipped += int(skipped)
        tiles.total += int(total)
