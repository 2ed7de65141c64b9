"""Runs over token windows for the tests of counts on the device and the window's loss.

``data[w][m][r]`` (``_dist_utils.make_windows``): micro-batch ``m`` of window ``w`` on rank
``r``. The reference is one large batch per window over every rank's micro-batches; the
accumulated run gives each micro-batch's count as an int, a tensor, or alternately both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import accumfn
from accumfn.testing import HostSyncCounter

from ._dist_utils import Batch, token_loss

__all__ = ["accumulated_run", "count_of", "large_batch_losses", "schedule_of"]

LR = 0.3


class _Lengths:
    """A schedule (a picklable callable of the effective step) of the given window sizes."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = list(lengths)

    def __call__(self, step: int) -> int:
        return self.lengths[min(step, len(self.lengths) - 1)]


def schedule_of(lengths: Sequence[int]) -> Any:
    """A schedule whose windows are ``lengths``, except the last, planned one micro-batch
    longer than the longest: ``is_final_batch`` closes it as a short final window."""
    return _Lengths([*lengths[:-1], max(lengths) + 1])


def count_of(batch: Batch, how: str | None, index: int) -> int | torch.Tensor | None:
    """The micro-batch's item count: None (mean mode), an int, a tensor, or (``mixed``)
    a tensor on even micro-batches and an int on odd ones."""
    if how is None:
        return None
    count = (batch[1] != -100).sum()
    if how == "tensor" or (how == "mixed" and index % 2 == 0):
        return count
    return int(count)


def large_batch_losses(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Sequence[Sequence[Sequence[Batch]]],
    *,
    item_mode: bool,
) -> list[float]:
    """One step per window on all of its micro-batches (every rank's) as one batch; the
    loss of each: the token mean (item mode) or the mean of the micro-batch means."""
    losses = []
    for window in data:
        batches = [batch for ranks in window for batch in ranks]
        if item_mode:
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            loss = token_loss(model, (x, y), "mean")
        else:
            loss = torch.stack([token_loss(model, b, "mean") for b in batches]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def accumulated_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Sequence[Sequence[Sequence[Batch]]],
    *,
    rank: int = 0,
    how: str | None,
    api: str = "functional",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Accumulate this rank's micro-batches; each window is closed by the schedule, the
    last by ``is_final_batch``. Returns the window losses (floats, read after the run) and
    the host reads of every micro-step (``(closed a window, reads)``)."""
    lengths = [len(window) for window in data]
    losses: list[torch.Tensor] = []
    reads: list[tuple[bool, list[str]]] = []
    reduction = "mean" if how is None else "sum"
    accumulator = None
    state = accumfn.init(schedule_of(lengths), max_grad_norm=None)
    if api == "object":
        accumulator = accumfn.GradientAccumulator(
            optimizer, schedule_of(lengths), max_grad_norm=None, scaler=scaler
        )
        accumulator.prepare(model)
    else:
        accumfn.prepare_forward(state, model)
    index = 0
    for w, window in enumerate(data):
        for m, ranks in enumerate(window):
            batch = ranks[rank]
            final = w == len(data) - 1 and m == len(window) - 1
            loss = token_loss(model, batch, reduction)
            count = count_of(batch, how, index)
            index += 1
            with HostSyncCounter() as counter:
                if accumulator is not None:
                    stepped = accumulator.accumulate(
                        loss, model, is_final_batch=final, num_items=count
                    )
                    if stepped:
                        assert accumulator.window_loss is not None
                        losses.append(accumulator.window_loss)
                else:
                    state, stepped = accumfn.accumulate(
                        state, loss, model, is_final_batch=final, num_items=count, scaler=scaler
                    )
                    if stepped:
                        report = accumfn.step_window(state, optimizer, model, scaler=scaler)
                        state = report.state
                        assert report.window_loss is not None
                        losses.append(report.window_loss)
            reads.append((stepped, counter.calls))
    return {
        "losses": [float(loss) for loss in losses],
        "reads": reads,
        "params": [p.detach().clone() for p in model.parameters()],
        "accumulator": accumulator,
        "state": state if accumulator is None else accumulator.state,
    }
