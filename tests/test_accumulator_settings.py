"""``GradientAccumulator``'s step settings: checked before every boundary's backward, so a
setting that would make the step fail is refused with nothing changed."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from accumfn import GradientAccumulator
from accumfn.errors import ConfigError

from .support import data, max_param_diff, mlp, mse, same, twin

STEPS = 3
MICRO = 4
CLIP = 1.0


def _windows(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(11, MICRO * STEPS * count)
    size = MICRO * STEPS
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _micro(window: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    return list(zip(window[0].split(MICRO), window[1].split(MICRO), strict=True))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _reference(
    model: nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]], with_scheduler: bool
) -> nn.Module:
    """One step per window on the whole window, clipped; StepLR halving after each step."""
    optimizer = _sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    for x, y in windows:
        optimizer.zero_grad(set_to_none=True)
        mse(model, x, y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if with_scheduler:
            scheduler.step()
    return model


def _snapshot(acc: GradientAccumulator, model: nn.Module) -> dict[str, Any]:
    optimizer = acc.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "state": acc.state.to_dict(),
    }


def _bad_scheduler(acc: GradientAccumulator) -> object:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(acc.optimizer)  # type: ignore[arg-type]


def _bad_optimizer(acc: GradientAccumulator) -> object:
    optimizer = acc.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    return torch.optim.LBFGS(optimizer.param_groups[0]["params"])


SETTINGS: dict[str, tuple[Callable[[GradientAccumulator], object], str]] = {
    "scheduler": (_bad_scheduler, "needs metrics"),
    "optimizer": (_bad_optimizer, "closure"),
    "before_step": (lambda acc: 3, "before_step"),
    "clip_value": (lambda acc: -1.0, "clip_value"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_setting_assigned_later_is_checked_before_the_backward(name: str) -> None:
    """After a window has stepped (its checks passed), a bad value assigned to a setting
    is refused at the next boundary before its backward: nothing changes. With the good
    value back the same loss goes through and training matches the large batch."""
    windows = _windows(3)
    model = mlp(3)
    reference = _reference(twin(model), windows, with_scheduler=False)
    acc = GradientAccumulator(_sgd(model), STEPS, max_grad_norm=CLIP)
    make_bad, message = SETTINGS[name]
    for w, window in enumerate(windows):
        for i, (x, y) in enumerate(_micro(window)):
            loss = mse(model, x, y)
            if w == 1 and i == STEPS - 1:
                good = getattr(acc, name)
                setattr(acc, name, make_bad(acc))
                before = _snapshot(acc, model)
                with pytest.raises(ConfigError, match=message):
                    acc.accumulate(loss, model)
                assert same(_snapshot(acc, model), before)
                setattr(acc, name, good)
            assert acc.accumulate(loss, model) == (i == STEPS - 1)
    assert acc.state.optimizer_steps == len(windows)
    assert max_param_diff(model, reference) < 1e-6


def test_a_list_of_schedulers_changed_in_place_is_checked_before_the_backward() -> None:
    windows = _windows(2)
    model = mlp(4)
    optimizer = _sgd(model)
    schedulers: list[object] = [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]
    acc = GradientAccumulator(optimizer, STEPS, max_grad_norm=CLIP, scheduler=schedulers)
    micro = _micro(windows[0]) + _micro(windows[1])
    for x, y in micro[: 2 * STEPS - 1]:
        acc.accumulate(mse(model, x, y), model)
    schedulers.append(torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))
    before = _snapshot(acc, model)
    with pytest.raises(ConfigError, match="needs metrics"):
        acc.accumulate(mse(model, *micro[-1]), model)
    assert same(_snapshot(acc, model), before)


def test_a_scheduler_changed_in_place_is_checked_before_the_backward() -> None:
    """The step's checks passed with this scheduler; its ``step`` is then replaced in place
    by one that needs an argument, which no assignment reveals. Every boundary runs the
    checks before its backward, so the next one refuses it and changes nothing; with the
    class's ``step`` back, the same loss goes through and training matches the large batch."""
    windows = _windows(3)
    model = mlp(5)
    reference = _reference(twin(model), windows, with_scheduler=True)
    optimizer = _sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    acc = GradientAccumulator(optimizer, STEPS, max_grad_norm=CLIP, scheduler=scheduler)
    micro = [m for window in windows for m in _micro(window)]
    for x, y in micro[: 2 * STEPS - 1]:
        acc.accumulate(mse(model, x, y), model)
    scheduler.step = lambda metrics: None  # type: ignore[assignment,method-assign,misc]
    loss = mse(model, *micro[2 * STEPS - 1])
    before = _snapshot(acc, model)
    with pytest.raises(ConfigError, match="needs metrics"):
        acc.accumulate(loss, model)
    assert same(_snapshot(acc, model), before)
    del scheduler.step  # the class's step again
    assert acc.accumulate(loss, model) is True
    for x, y in micro[2 * STEPS :]:
        acc.accumulate(mse(model, x, y), model)
    assert acc.state.optimizer_steps == 3 and scheduler.last_epoch == 3
    assert max_param_diff(model, reference) < 1e-6


def test_untracked_parameters_of_an_assigned_optimizer_are_warned_about_after_the_step() -> None:
    """An optimizer assigned over part of the model: the warning about the rest comes
    once, after the window's step, so with warnings as errors nothing is left half done."""
    windows = _windows(3)
    model = mlp(7)
    acc = GradientAccumulator(_sgd(model), STEPS, max_grad_norm=CLIP)
    micro = [m for window in windows for m in _micro(window)]
    for x, y in micro[:STEPS]:
        acc.accumulate(mse(model, x, y), model)
    acc.optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in micro[STEPS : 2 * STEPS - 1]:
            acc.accumulate(mse(model, x, y), model)
        with pytest.raises(UserWarning, match=r"2 trainable parameter tensor\(s\)"):
            acc.accumulate(mse(model, *micro[2 * STEPS - 1]), model)
        assert acc.state.optimizer_steps == 2 and not acc.state.closed
        for x, y in micro[2 * STEPS :]:  # once only: the next window steps quietly
            acc.accumulate(mse(model, x, y), model)
    assert acc.state.optimizer_steps == 3


def test_an_accumulator_pickled_between_windows_resumes_exactly() -> None:
    """Pickled with its model after a step (pickle keeps no ``.grad``: mid-window, use
    ``state_dict``): the copy checks its settings again and trains on exactly."""
    windows = _windows(2)
    model = mlp(8)
    reference = _reference(twin(model), windows, with_scheduler=False)
    acc = GradientAccumulator(_sgd(model), STEPS, max_grad_norm=CLIP)
    micro = _micro(windows[0]) + _micro(windows[1])
    for x, y in micro[:STEPS]:
        acc.accumulate(mse(model, x, y), model)
    model, acc = pickle.loads(pickle.dumps((model, acc)))
    for x, y in micro[STEPS:]:
        acc.accumulate(mse(model, x, y), model)
    assert acc.state.optimizer_steps == 2
    assert max_param_diff(model, reference) < 1e-6
