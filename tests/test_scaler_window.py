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


def _other_scaler(used: bool) -> torch.amp.GradScaler:
    """A GradScaler that did not scale the window: fresh, or used elsewhere (its scale made)."""
    other = torch.amp.GradScaler("cpu", init_scale=2.0)
    if used:
        other.scale(torch.zeros(()))
    return other


def _both(model: nn.Module, optimizer: torch.optim.Optimizer, *scalers: object) -> object:
    return [_snapshot(model, optimizer, scaler) for scaler in scalers]


@pytest.mark.parametrize("used", [False, True], ids=["fresh", "used"])
@pytest.mark.parametrize("where", ["accumulate", "flush", "step"])
def test_another_grad_scaler_than_the_windows_is_refused_then_the_right_one_is_exact(
    where: str, used: bool
) -> None:
    """The window remembers which GradScaler scaled it: another one on a later micro-batch,
    at ``flush`` or at the step is a ConfigError that changes nothing (a fresh one used to
    fail inside the step and close the window as skipped; a used one to step silently
    wrong); the window's own GradScaler then gives the large batch's update."""
    model, ref, optimizer, x, y = _setup(6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    other = _other_scaler(used)
    micro = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    state = accumfn.init(None if where == "flush" else STEPS, max_grad_norm=None)
    for w in range(2):
        batches = micro[w * STEPS : (w + 1) * STEPS]
        for i, (xb, yb) in enumerate(batches):
            if where == "accumulate" and i == 2:
                before = _both(model, optimizer, scaler, other)
                with pytest.raises(ConfigError, match="micro-batch was given another GradScaler"):
                    accumfn.accumulate(state, mse(model, xb, yb), model, scaler=other)
                assert same(before, _both(model, optimizer, scaler, other))
            last = where != "flush" and i == len(batches) - 1
            state, stepped = accumfn.accumulate(
                state, mse(model, xb, yb), model, scaler=scaler, is_final_batch=last
            )
        if where == "flush":
            before = _both(model, optimizer, scaler, other)
            with pytest.raises(ConfigError, match="flush was given another GradScaler"):
                accumfn.flush(state, model, scaler=other)
            assert same(before, _both(model, optimizer, scaler, other))
            state, stepped = accumfn.flush(state, model, scaler=scaler)
        assert stepped
        if where == "step":
            before = _both(model, optimizer, scaler, other)
            with pytest.raises(ConfigError, match="step was given another GradScaler"):
                accumfn.apply_step(state, optimizer, model, scaler=other)
            assert same(before, _both(model, optimizer, scaler, other))
        state = accumfn.apply_step(state, optimizer, model, scaler=scaler)
    assert state.optimizer_steps == 2
    assert max_param_diff(model, ref) < 1e-6


def test_gradient_accumulator_refuses_a_scaler_assigned_inside_a_window() -> None:
    """``acc.scaler = other`` between two micro-batches of a window is refused at the next
    micro-batch (and before the boundary's backward), changing nothing; assigned back, the
    window finishes as the large batch does. Between windows it may change."""
    model, ref, optimizer, x, y = _setup(7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    acc = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=None, scaler=scaler)
    micro = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    for index, (xb, yb) in enumerate(micro):
        if index in (1, STEPS - 1):  # inside the first window, and before its boundary
            acc.scaler = _other_scaler(used=True)
            before, state = _snapshot(model, optimizer, scaler), acc.state
            with pytest.raises(ConfigError, match="another GradScaler"):
                acc.accumulate(mse(model, xb, yb), model)
            assert same(before, _snapshot(model, optimizer, scaler)) and acc.state == state
            acc.scaler = scaler
        acc.accumulate(mse(model, xb, yb), model)
    assert acc.state.optimizer_steps == 2
    assert max_param_diff(model, ref) < 1e-6


def test_after_a_resume_the_restored_grad_scaler_steps_the_window() -> None:
    """A checkpoint records no GradScaler object: the one the resumed run passes (a new
    object holding the saved scaler state) continues the window, exactly."""
    model, ref, optimizer, x, y = _setup(8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    micro = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    state = accumfn.init(STEPS, max_grad_norm=None)
    for xb, yb in micro[:6]:
        state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model, scaler=scaler)
        if stepped:
            state = accumfn.apply_step(state, optimizer, model, scaler=scaler)
    saved = accumfn.checkpoint.capture(state, optimizer, scaler)
    resumed_scaler = torch.amp.GradScaler("cpu")
    state = accumfn.checkpoint.restore(
        saved, accumfn.init(STEPS, max_grad_norm=None), optimizer, resumed_scaler, model=model
    )
    for xb, yb in micro[6:]:
        state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model, scaler=resumed_scaler)
    state = accumfn.apply_step(state, optimizer, model, scaler=resumed_scaler)
    assert state.optimizer_steps == 2
    assert max_param_diff(model, ref) < 1e-6


@pytest.mark.parametrize("call", ["apply_step", "step_window"])
def test_a_closed_state_steps_once(call: str) -> None:
    """Stepping the same closed state again would count its window twice (its gradients
    were applied and zeroed): refused with CallOrderError, nothing changed."""
    model, ref, optimizer, x, y = _setup(9)
    step = accumfn.apply_step if call == "apply_step" else accumfn.step_window
    state = accumfn.init(STEPS, max_grad_norm=None)
    closed = _accumulate_window(state, model, x[: STEPS * MICRO], y[: STEPS * MICRO], None)
    after = step(closed, optimizer, model)
    before = _snapshot(model, optimizer, None)
    with pytest.raises(accumfn.CallOrderError, match="already stepped"):
        step(closed, optimizer, model)
    assert same(before, _snapshot(model, optimizer, None))
    state = after if isinstance(after, accumfn.AccumState) else after.state
    assert (state.optimizer_steps, state.effective_step) == (1, 1)
    closed = _accumulate_window(state, model, x[STEPS * MICRO :], y[STEPS * MICRO :], None)
    accumfn.apply_step(closed, optimizer, model)
    assert max_param_diff(model, ref) < 1e-6
