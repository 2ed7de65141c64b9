"""A GradScaler must scale every micro-batch of a window and unscale its step, or none of it.

A window accumulated with ``accumulate(..., scaler=s)`` and stepped without ``s`` steps on
gradients still multiplied by the loss scale; one accumulated without and stepped with
``s`` divides plain gradients by it. Both are refused with a clear error that changes
nothing; the same call with the right scaler then gives the large-batch update.
"""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
from torch import nn

import accumfn
from accumfn.errors import ConfigError

from .support import data, large_batch_run, max_param_diff, mlp, mse, same, twin, windows_of

STEPS, MICRO = 4, 3


Setup = tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]


def _setup(seed: int) -> Setup:
    """A model, its large-batch reference trained on two windows (SGD), an optimizer, data."""
    model = mlp(seed)
    ref = twin(model)
    x, y = data(seed, STEPS * MICRO * 2)
    large_batch_run(
        ref, torch.optim.SGD(ref.parameters(), lr=0.1), windows_of(x, y, MICRO, STEPS), None
    )
    return model, ref, torch.optim.SGD(model.parameters(), lr=0.1), x, y


def _snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: object
) -> dict[str, object]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scaler": None if scaler is None else scaler.state_dict(),  # type: ignore[attr-defined]
    }


def _accumulate_window(
    state: accumfn.AccumState,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    scaler: torch.amp.GradScaler | None,
) -> accumfn.AccumState:
    stepped = False
    for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
        state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model, scaler=scaler)
    assert stepped
    return state


@pytest.mark.parametrize("given_to", ["accumulate", "step"])
def test_scaler_on_one_side_only_is_refused_then_the_right_call_is_exact(given_to: str) -> None:
    model, ref, optimizer, x, y = _setup(1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    state = accumfn.init(STEPS, max_grad_norm=None)
    for w in range(2):
        xs, ys = x[w * STEPS * MICRO :][: STEPS * MICRO], y[w * STEPS * MICRO :][: STEPS * MICRO]
        with_scaler = given_to == "accumulate"  # else the window is plain and the step errs
        closed = _accumulate_window(state, model, xs, ys, scaler if with_scaler else None)
        assert closed.window_scaled is with_scaler
        before = _snapshot(model, optimizer, scaler)
        wrong = None if with_scaler else scaler
        with pytest.raises(ConfigError, match="GradScaler") as info:
            accumfn.apply_step(closed, optimizer, model, scaler=wrong)
        assert "scaler" in str(info.value)
        assert same(before, _snapshot(model, optimizer, scaler)), (
            "the refused step changed something"
        )
        state = accumfn.apply_step(closed, optimizer, model, scaler=scaler if with_scaler else None)
        assert state.window_scaled is None
    assert max_param_diff(model, ref) < 1e-6


def test_mixing_scaled_and_unscaled_micro_batches_in_a_window_is_refused() -> None:
    model, _, optimizer, x, y = _setup(2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for first, second in [(scaler, None), (None, scaler)]:
        state, _ = accumfn.accumulate(
            accumfn.init(STEPS, max_grad_norm=None), mse(model, x[:3], y[:3]), model, scaler=first
        )
        before = _snapshot(model, optimizer, scaler)
        with pytest.raises(ConfigError, match="every micro-batch of a window"):
            accumfn.accumulate(state, mse(model, x[3:6], y[3:6]), model, scaler=second)
        assert same(before, _snapshot(model, optimizer, scaler))
        optimizer.zero_grad(set_to_none=True)


def test_a_disabled_scaler_counts_as_none_on_either_side() -> None:
    model, ref, optimizer, x, y = _setup(3)
    off = torch.amp.GradScaler("cpu", enabled=False)
    state = accumfn.init(STEPS, max_grad_norm=None)
    for w, (acc_scaler, step_scaler) in enumerate([(off, None), (None, off)]):
        xs, ys = x[w * STEPS * MICRO :][: STEPS * MICRO], y[w * STEPS * MICRO :][: STEPS * MICRO]
        closed = _accumulate_window(state, model, xs, ys, acc_scaler)
        assert closed.window_scaled is False
        state = accumfn.apply_step(closed, optimizer, model, scaler=step_scaler)
    assert max_param_diff(model, ref) < 1e-6


def test_window_scaled_survives_to_dict_and_a_state_saved_without_it_is_not_checked() -> None:
    model, ref, optimizer, x, y = _setup(4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    state = accumfn.init(STEPS, max_grad_norm=None)
    state, _ = accumfn.accumulate(state, mse(model, x[:3], y[:3]), model, scaler=scaler)
    saved = state.to_dict()
    assert saved["window_scaled"] is True
    assert accumfn.AccumState.from_dict(saved) == state
    old = {k: v for k, v in saved.items() if k != "window_scaled"}  # written before the key
    state = accumfn.AccumState.from_dict(old)
    assert state.window_scaled is None
    for i in range(1, STEPS):
        xb, yb = x[i * MICRO : (i + 1) * MICRO], y[i * MICRO : (i + 1) * MICRO]
        state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model, scaler=scaler)
    assert stepped and state.window_scaled is True  # recorded again from the next micro-batch
    state = accumfn.apply_step(state, optimizer, model, scaler=scaler)
    closed = _accumulate_window(state, model, x[STEPS * MICRO :], y[STEPS * MICRO :], scaler)
    accumfn.apply_step(closed, optimizer, model, scaler=scaler)
    assert max_param_diff(model, ref) < 1e-6


def test_gradient_accumulator_checkpoint_keeps_the_window_scaled() -> None:
    model, ref, optimizer, x, y = _setup(5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    acc = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=None, scaler=scaler)
    micro = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    for xb, yb in micro[:6]:
        acc.accumulate(mse(model, xb, yb), model)
    saved = acc.state_dict()
    resumed = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=None, scaler=scaler)
    resumed.load_state_dict(saved)
    assert resumed.state.window_scaled is True and resumed.state == acc.state
    for xb, yb in micro[6:]:
        resumed.accumulate(mse(model, xb, yb), model)
    assert resumed.state.optimizer_steps == 2
    assert max_param_diff(model, ref) < 1e-6


def test_window_scaled_must_be_none_while_the_window_is_empty() -> None:
    with pytest.raises(ConfigError, match="window_scaled must be None"):
        attrs.evolve(accumfn.init(2), window_scaled=True)
    with pytest.raises(ConfigError, match="window_scaled must be True, False or None"):
        attrs.evolve(accumfn.init(2), window_scaled=1)


def test_micro_step_takes_scaled_as_a_bool_only() -> None:
    state = accumfn.init(2, max_grad_norm=None)
    with pytest.raises(ConfigError, match="scaled must be True or False, got 1"):
        accumfn.core.micro_step(state, scaled=1)  # type: ignore[arg-type]
    assert accumfn.core.micro_step(state, scaled=True)[0].window_scaled is True
