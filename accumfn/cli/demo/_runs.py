"""The demo's runs: each window trained as one large batch, as accumulated micro-batches,
and by the naive loop (each micro-batch's mean loss / window size).

The three go in lockstep, window by window, so the parameter differences are known after
every optimizer step. Everything here uses only the public API.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from ...core import DEFAULT_MAX_GRAD_NORM, init
from ...step import accumulate, apply_step
from ._data import IGNORE, mlp, ragged_tokens, regression, token_model

__all__ = ["DemoSettings", "StepRecord", "epoch_windows", "regression_steps", "token_steps"]

MicroHook = Callable[[str, int, torch.Tensor], None]


@attrs.frozen
class DemoSettings:
    """Sizes of the demo runs."""

    window: int = 4
    micro_batch: int = 8
    steps: int = 12
    """Optimizer steps per epoch; the last window of each epoch is short."""
    epochs: int = 2
    lr: float = 1e-2
    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM
    """The clipping of all three runs, as accumfn's default (None: no clipping)."""
    seed: int = 0

    @property
    def short_window(self) -> int:
        return max(1, self.window // 2) if self.window > 1 else 1

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.window * (self.steps - 1) + self.short_window


@attrs.frozen
class StepRecord:
    """What one optimizer step of one workload looked like."""

    workload: str
    step: int
    """The effective step of this window, from 0: ``effective_step`` while it was open, the
    step its metrics are logged at (``_step`` in metrics.jsonl)."""
    epoch: int
    micro_batches: int
    short: bool
    """Whether this is the short final window of its epoch."""
    large_loss: float
    accumulated_loss: float
    max_param_diff: float
    """Largest |parameter difference| between the accumulated and the large-batch model."""
    naive_max_param_diff: float
    """The same for the naive loop: each micro-batch's mean loss divided by the window size."""


def epoch_windows(micro_batches: int, window: int) -> list[range]:
    """Consecutive micro-batch indices per window; the last one may be short."""
    return [range(i, min(i + window, micro_batches)) for i in range(0, micro_batches, window)]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        return max(
            float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
        )


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _large_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_norm: float | None
) -> None:
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    if max_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()


def _micro(data: Sequence[torch.Tensor], size: int, index: int) -> list[torch.Tensor]:
    return [t[index * size : (index + 1) * size] for t in data]


def _batches(
    settings: DemoSettings, data: Sequence[torch.Tensor]
) -> Iterator[tuple[int, range, bool]]:
    """(epoch, window, is last window of the epoch) in training order."""
    for epoch in range(settings.epochs):
        windows = epoch_windows(settings.micro_batches_per_epoch, settings.window)
        for i, window in enumerate(windows):
            yield epoch, window, i == len(windows) - 1


def _naive_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    if max_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def regression_steps(settings: DemoSettings, on_micro: MicroHook) -> Iterator[StepRecord]:
    """A regression MLP: large batch vs accumulated (and naive) mean-reduced micro-batches.

    Yields one record per window, after the window's optimizer steps.
    """
    b = settings.micro_batch
    data = regression(settings.seed, b * settings.micro_batches_per_epoch)
    large = mlp(settings.seed)
    accumulated, naive = copy.deepcopy(large), copy.deepcopy(large)
    large_opt = _adamw(large, settings.lr)
    accum_opt, naive_opt = _adamw(accumulated, settings.lr), _adamw(naive, settings.lr)
    state = init(steps=settings.window, max_grad_norm=settings.max_grad_norm, batch_size=b)
    for epoch, window, last in _batches(settings, data):
        step = state.effective_step
        x, y = (t[window.start * b : window.stop * b] for t in data)
        large_loss = F.mse_loss(large(x), y)
        _large_step(large, large_opt, large_loss, settings.max_grad_norm)
        losses = []
        for j in window:
            xm, ym = _micro(data, b, j)
            loss = F.mse_loss(accumulated(xm), ym)
            on_micro("regression", step, loss.detach())
            losses.append(loss.detach())
            state, stepped = accumulate(
                state, loss, accumulated, is_final_batch=last and j == window.stop - 1
            )
            if stepped:
                state = apply_step(state, accum_opt, accumulated)
            torch.autograd.backward(F.mse_loss(naive(xm), ym) / settings.window)
        _naive_step(naive, naive_opt, settings.max_grad_norm)
        yield StepRecord(
            workload="regression",
            step=step,
            epoch=epoch,
            micro_batches=len(window),
            short=len(window) < settings.window,
            large_loss=float(large_loss.detach()),
            accumulated_loss=float(torch.stack(losses).mean()),
            max_param_diff=_max_diff(large, accumulated),
            naive_max_param_diff=_max_diff(large, naive),
        )


def _token_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def token_steps(settings: DemoSettings, on_micro: MicroHook) -> Iterator[StepRecord]:
    """A token model on ragged sequences: the token-mean loss of each window.

    ``accumulate(..., num_items=tokens)`` is compared with the large batch and with the
    naive loop that averages each micro-batch and divides by the window size. Yields one
    record per window, after the window's optimizer steps.
    """
    b = settings.micro_batch
    data = ragged_tokens(settings.seed + 1, b * settings.micro_batches_per_epoch)
    large = token_model(settings.seed)
    accumulated, naive = copy.deepcopy(large), copy.deepcopy(large)
    large_opt = _adamw(large, settings.lr)
    accum_opt, naive_opt = _adamw(accumulated, settings.lr), _adamw(naive, settings.lr)
    state = init(steps=settings.window, max_grad_norm=settings.max_grad_norm, batch_size=b)
    for epoch, window, last in _batches(settings, data):
        step = state.effective_step
        tokens, labels = (t[window.start * b : window.stop * b] for t in data)
        large_loss = _token_loss(large, tokens, labels) / (labels != IGNORE).sum()
        _large_step(large, large_opt, large_loss, settings.max_grad_norm)
        total, count = torch.zeros(()), 0
        for j in window:
            tm, lm = _micro(data, b, j)
            items = int((lm != IGNORE).sum())
            loss = _token_loss(accumulated, tm, lm)
            on_micro("tokens", step, loss.detach() / max(items, 1))
            total, count = total + loss.detach(), count + items
            state, stepped = accumulate(
                state,
                loss,
                accumulated,
                num_items=items,
                is_final_batch=last and j == window.stop - 1,
            )
            if stepped:
                state = apply_step(state, accum_opt, accumulated)
            naive_loss = _token_loss(naive, tm, lm) / max(items, 1) / settings.window
            torch.autograd.backward(naive_loss)
        _naive_step(naive, naive_opt, settings.max_grad_norm)
        yield StepRecord(
            workload="tokens",
            step=step,
            epoch=epoch,
            micro_batches=len(window),
            short=len(window) < settings.window,
            large_loss=float(large_loss.detach()),
            accumulated_loss=float(total / count),
            max_param_diff=_max_diff(large, accumulated),
            naive_max_param_diff=_max_diff(large, naive),
        )
