"""LR schedulers step once per applied optimizer step, never on a skipped (non-finite) one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import accumfn
from accumfn import GradientAccumulator

from .support import data, mlp, mse

GAMMA = 0.5
LR = 0.1


def _micro_batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(seed, 4 * count)
    return list(zip(x.split(4), y.split(4), strict=True))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, poison: bool) -> torch.Tensor:
    loss = mse(model, x, y)
    if poison:  # an inf gradient in the first layer, as an fp16 overflow would give
        first = next(model.parameters())
        loss = loss + first.sum() * torch.tensor(float("inf"))
    return loss


def _windows(count: int, window: int) -> list[int]:
    """The window index of each of ``count`` micro-batches (last window may be short)."""
    return [index // window for index in range(count)]


POISONED = [set(), {0}, {1, 2}, {3}, {0, 1, 2, 3}]


@pytest.mark.parametrize("poisoned", POISONED, ids=str)
def test_apply_step_with_grad_scaler_skips_the_scheduler_on_skipped_windows(
    poisoned: set[int],
) -> None:
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    batches = _micro_batches(0, 11)  # windows of 3: 3 | 3 | 3 | 2
    windows = _windows(len(batches), 3)
    state = accumfn.init(3, max_grad_norm=1.0)
    lrs_used, params_moved = [], []
    for index, (x, y) in enumerate(batches):
        poison = windows[index] in poisoned
        state, stepped = accumfn.accumulate(
            state,
            _loss(model, x, y, poison),
            model,
            scaler=scaler,
            is_final_batch=index == len(batches) - 1,
        )
        if stepped:
            before = [p.detach().clone() for p in model.parameters()]
            lrs_used.append(optimizer.param_groups[0]["lr"])
            state = accumfn.apply_step(state, optimizer, model, scaler=scaler, scheduler=scheduler)
            moved = any(
                not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
            )
            params_moved.append(moved)
    applied = 4 - len(poisoned)
    assert (state.effective_step, state.optimizer_steps, state.skipped_steps) == (
        4,
        applied,
        len(poisoned),
    )
    assert params_moved == [w not in poisoned for w in range(4)]
    assert scheduler.last_epoch == state.optimizer_steps == applied
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * GAMMA**applied)
    # the LR a window used is set by the applied windows before it, not the skipped ones
    expected, done = [], 0
    for w in range(4):
        expected.append(LR * GAMMA**done)
        done += w not in poisoned
    assert lrs_used == pytest.approx(expected)


@pytest.mark.parametrize("poisoned", POISONED, ids=str)
def test_accumulator_with_skip_nonfinite_steps_the_scheduler_per_applied_step(
    poisoned: set[int],
) -> None:
    model = mlp(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    accumulator = GradientAccumulator(
        optimizer, 4, max_grad_norm=None, scheduler=scheduler, skip_nonfinite=True
    )
    batches = _micro_batches(1, 14)  # windows of 4: 4 | 4 | 4 | 2
    windows = _windows(len(batches), 4)
    for index, (x, y) in enumerate(batches):
        poison = windows[index] in poisoned
        accumulator.accumulate(
            _loss(model, x, y, poison), model, is_final_batch=index == len(batches) - 1
        )
    stats = accumulator.stats
    assert accumulator.effective_step == 4
    assert stats.optimizer_steps == 4 - len(poisoned) and stats.skipped_steps == len(poisoned)
    assert scheduler.last_epoch == stats.optimizer_steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / (1 + stats.optimizer_steps))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accumulator_with_grad_scaler_and_scheduler() -> None:
    model = mlp(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    accumulator = GradientAccumulator(optimizer, 2, scaler=scaler, scheduler=scheduler)
    for index, (x, y) in enumerate(_micro_batches(2, 8)):  # windows 0..3, window 2 poisoned
        accumulator.accumulate(_loss(model, x, y, poison=index == 5), model)
    assert (accumulator.stats.optimizer_steps, accumulator.stats.skipped_steps) == (3, 1)
    assert scheduler.last_epoch == 3
    assert scaler.get_scale() < 2.0**8  # the skipped step backed the scale off


def test_without_a_scheduler_nothing_else_changes() -> None:
    model = mlp(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    state = accumfn.init(2, max_grad_norm=None)
    for x, y in _micro_batches(3, 4):
        state, stepped = accumfn.accumulate(state, mse(model, x, y), model)
        if stepped:
            state = accumfn.apply_step(state, optimizer, model)
    assert state.optimizer_steps == 2 and optimizer.param_groups[0]["lr"] == LR
