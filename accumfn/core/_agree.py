"""What the ranks of a data-parallel group must agree on when a window closes (no torch).

Each rank contributes one header (``window_header``); the shell sums the headers over the
group and ``agree`` decides from the sums: the window's size and item count over all ranks,
whether the gradients still need the fallback reduction, or that the ranks cannot be
reconciled, which every rank learns from the same sums and so raises together.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ..errors import RankMismatchError
from ._state import AccumState, Normalization

__all__ = ["WindowTotals", "agree", "window_header"]


def window_header(state: AccumState, *, final: bool, reduces: bool) -> list[int]:
    """This rank's view of its closing window, as the integers the group sums."""
    return [
        1,
        int(state.micro_step > 0),
        state.micro_step,
        state.window_items,
        int(state.window_norm is Normalization.ITEMS),
        int(final),
        int(reduces),
        int(state.window_scaled is True),
    ]


@attrs.frozen
class WindowTotals:
    """The headers of all ranks, summed."""

    ranks: int
    open: int
    """Ranks whose window holds micro-steps (all of them, except at ``flush``)."""
    micro_steps: int
    """Micro-batches in this window over all ranks."""
    items: int
    """Items (``num_items``) in this window over all ranks."""
    item_mode: int
    """Ranks whose window is in item mode."""
    final: int
    """Ranks that closed this window with ``is_final_batch``."""
    reduces: int
    """Ranks whose boundary backward reduces gradients by itself."""
    scaled: int
    """Ranks whose window's losses were scaled by a GradScaler."""

    @classmethod
    def from_sums(cls, sums: Sequence[int]) -> WindowTotals:
        return cls(*(int(value) for value in sums))

    @classmethod
    def of(cls, headers: Sequence[Sequence[int]]) -> WindowTotals:
        return cls.from_sums([sum(column) for column in zip(*headers, strict=True)])


def _some(count: int, ranks: int) -> bool:
    return 0 < count < ranks


def agree(totals: WindowTotals) -> bool:
    """Check that the ranks can close this window together; return whether the gradients
    need the fallback reduction (no rank's backward reduced them).

    Raises ``RankMismatchError`` when only some ranks are in item mode, only some scaled
    their losses with a GradScaler, only some ended
    their data (``is_final_batch``), or only some ran a reducing backward (a full window on
    one rank, a short final window on another): those ranks would otherwise wait on
    collectives the others never issue, or average different things.
    """
    ranks = totals.ranks
    if _some(totals.open, ranks):
        raise RankMismatchError(
            f"{totals.open} of {ranks} ranks have an open window at flush and the others do "
            f"not: the ranks ran different numbers of micro-batches. Give every rank the same "
            f"number of micro-batches (DistributedSampler with drop_last=True)."
        )
    if _some(totals.item_mode, ranks):
        raise RankMismatchError(
            f"{totals.item_mode} of {ranks} ranks passed num_items in this window and the "
            f"others did not: pass num_items on every rank, or on none."
        )
    if _some(totals.scaled, ranks):
        raise RankMismatchError(
            f"{totals.scaled} of {ranks} ranks scaled this window's losses with a GradScaler "
            f"and the others did not: their gradients would be averaged at different scales. "
            f"Pass the same scaler= to accumulate and the step on every rank, or on none."
        )
    if _some(totals.final, ranks):
        raise RankMismatchError(
            f"{totals.final} of {ranks} ranks ended their data (is_final_batch=True) at this "
            f"window and the others did not: the ranks have different numbers of "
            f"micro-batches, so the others would wait for collectives that never come. Give "
            f"every rank the same number of micro-batches (DistributedSampler with "
            f"drop_last=True, or torch.utils.data's equal-length sharding)."
        )
    if _some(totals.reduces, ranks):
        raise RankMismatchError(
            f"{totals.reduces} of {ranks} ranks closed this window with a backward that "
            f"reduces gradients (a full window) while the others closed it early (a short "
            f"final window, is_final_batch=True): the ranks have different numbers of "
            f"micro-batches in their last window. Give every rank the same number of "
            f"micro-batches (DistributedSampler with drop_last=True)."
        )
    return totals.reduces == 0
