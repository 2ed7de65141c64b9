"""Hypothesis strategies for accumulation tests: window sizes, ragged splits, item counts.

Needs ``hypothesis`` (``pip install 'accumfn[testing]'``); ``accumfn.testing`` itself does not.
"""

from __future__ import annotations

import itertools

import attrs

from ..errors import raise_missing
from ._equivalence import plan_windows

try:
    from hypothesis import strategies as st
except ImportError as error:
    raise_missing(
        error, "hypothesis", "testing", "accumfn.testing.strategies",
        "accumfn.testing.assert_equivalent works without it",
    )  # fmt: skip

__all__ = [
    "AccumulationSplit",
    "accumulation_splits",
    "item_counts",
    "micro_batch_sizes",
    "window_sizes",
]


def window_sizes(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[int]:
    """Accumulation window sizes (micro-batches per optimizer step)."""
    return st.integers(min_value=min_size, max_value=max_size)


@st.composite
def micro_batch_sizes(draw: st.DrawFn, total: int, *, max_size: int | None = None) -> list[int]:
    """Sizes >= 1 (at most ``max_size``) that split ``total`` items into micro-batches."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}.")
    limit = total if max_size is None else max_size
    if limit < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}.")
    sizes: list[int] = []
    left = total
    while left:
        size = draw(st.integers(min_value=1, max_value=min(limit, left)))
        sizes.append(size)
        left -= size
    return sizes


@attrs.frozen
class AccumulationSplit:
    """A dataset of ``total`` items split into micro-batches, grouped into windows."""

    window: int
    sizes: tuple[int, ...]
    """Items per micro-batch, in order."""
    windows: tuple[tuple[int, ...], ...]
    """Micro-batch indices of each window; the last window may be short."""

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def slices(self) -> list[slice]:
        """Slices of the dataset, one per micro-batch."""
        bounds = [0, *itertools.accumulate(self.sizes)]
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]


@st.composite
def accumulation_splits(
    draw: st.DrawFn,
    *,
    min_items: int = 1,
    max_items: int = 32,
    max_window: int = 6,
    max_micro_batch: int | None = None,
    ragged: bool = True,
) -> AccumulationSplit:
    """A dataset length, a window size and a split into micro-batches and windows.

    With ``ragged=False`` every micro-batch has the same size except possibly the last.
    """
    total = draw(st.integers(min_value=min_items, max_value=max_items))
    window = draw(window_sizes(1, max_window))
    if ragged:
        sizes = draw(micro_batch_sizes(total, max_size=max_micro_batch))
    else:
        size = draw(st.integers(min_value=1, max_value=min(total, max_micro_batch or total)))
        sizes = [size] * (total // size) + ([total % size] if total % size else [])
    windows = tuple(tuple(w) for w in plan_windows(window, len(sizes)))
    return AccumulationSplit(window=window, sizes=tuple(sizes), windows=windows)


def item_counts(
    micro_batches: int, *, min_items: int = 1, max_items: int = 64
) -> st.SearchStrategy[list[int]]:
    """Ragged ``num_items`` (tokens, samples) for each of ``micro_batches`` micro-batches."""
    return st.lists(
        st.integers(min_value=min_items, max_value=max_items),
        min_size=micro_batches,
        max_size=micro_batches,
    )
