"""``before_step`` sees the gradients large-batch training would see; ``clip_value`` clips
them by value there. Each against a hand-written large-batch loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import accumfn

from .support import data, mlp

WINDOW = 4
LENGTHS = (4, 4, 3)  # the last window is short


def _windows(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(seed, 4 * sum(LENGTHS))
    out, start = [], 0
    for length in LENGTHS:
        out.append((x[start : start + 4 * length], y[start : start + 4 * length]))
        start += 4 * length
    return out


def _large_batch(
    seed: int, clip_value: float | None
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    model = mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []
    for x, y in _windows(seed):
        nn.functional.mse_loss(model(x), y).backward()
        seen.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], seen


def _accumulated(
    seed: int, api: str, clip_value: float | None, scaler: torch.amp.GradScaler | None
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    model = mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen: list[list[torch.Tensor]] = []

    def before_step(opt: torch.optim.Optimizer) -> None:
        assert opt is optimizer
        seen.append([p.grad.clone() for p in model.parameters() if p.grad is not None])

    accumulator = accumfn.GradientAccumulator(
        optimizer,
        WINDOW,
        max_grad_norm=None,
        scaler=scaler,
        before_step=before_step,
        clip_value=clip_value,
    )
    state = accumfn.init(WINDOW, max_grad_norm=None)
    for w, (x, y) in enumerate(_windows(seed)):
        micro = list(zip(x.split(4), y.split(4), strict=True))
        for m, (xb, yb) in enumerate(micro):
            final = w == len(LENGTHS) - 1 and m == len(micro) - 1
            loss = nn.functional.mse_loss(model(xb), yb)
            if api == "object":
                accumulator.accumulate(loss, model, is_final_batch=final)
                continue
            state, stepped = accumfn.accumulate(
                state, loss, model, is_final_batch=final, scaler=scaler
            )
            if stepped:
                state = accumfn.apply_step(
                    state,
                    optimizer,
                    model,
                    scaler=scaler,
                    before_step=before_step,
                    clip_value=clip_value,
                )
    return [p.detach().clone() for p in model.parameters()], seen


@pytest.mark.parametrize("api", ["functional", "object"])
@pytest.mark.parametrize("clip_value", [None, 0.05])
@pytest.mark.parametrize("with_scaler", [False, True], ids=["no-scaler", "grad-scaler"])
def test_before_step_sees_the_large_batch_gradient_and_clip_value_clips_it(
    api: str, clip_value: float | None, with_scaler: bool
) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if with_scaler else None
    params, seen = _accumulated(1, api, clip_value, scaler)
    expected_params, expected_seen = _large_batch(1, clip_value)
    assert len(seen) == len(LENGTHS)  # once per window
    for got, want in zip(seen, expected_seen, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(params, expected_params, rtol=1e-5, atol=1e-7)
    if clip_value is not None:  # the clip did bite
        assert max(float(g.abs().max()) for g in expected_seen[0]) > clip_value


def test_before_step_may_edit_the_gradients() -> None:
    """Zeroing the first layer's gradients there keeps it where it was."""
    model = mlp(2)
    first = [p.detach().clone() for p in model[0].parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def freeze_first(_: torch.optim.Optimizer) -> None:
        for p in model[0].parameters():
            p.grad = None

    accumulator = accumfn.GradientAccumulator(optimizer, 2, before_step=freeze_first)
    x, y = data(2, 8)
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        accumulator.accumulate(nn.functional.mse_loss(model(xb), yb), model)
    assert accumulator.stats.optimizer_steps == 1
    torch.testing.assert_close([p.detach() for p in model[0].parameters()], first)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"before_step": 3}, "before_step must be a function"),
        ({"clip_value": 0}, "clip_value must be a finite number > 0"),
        ({"clip_value": "1"}, "clip_value must be a positive number"),
    ],
)
def test_bad_hooks_are_refused_and_change_nothing(kwargs: dict[str, object], message: str) -> None:
    model = mlp(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(accumfn.ConfigError, match=message):
        accumfn.GradientAccumulator(optimizer, 2, **kwargs)  # type: ignore[arg-type]
    state = accumfn.init(1, max_grad_norm=None)
    x, y = data(3, 4)
    state, stepped = accumfn.accumulate(state, nn.functional.mse_loss(model(x), y), model)
    assert stepped
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(accumfn.ConfigError, match=message):
        accumfn.apply_step(state, optimizer, model, **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close([p.detach() for p in model.parameters()], before, rtol=0, atol=0)
    torch.testing.assert_close([p.grad for p in model.parameters()], grads, rtol=0, atol=0)
    assert accumfn.apply_step(state, optimizer, model).optimizer_steps == 1


def test_clip_value_does_not_hide_a_non_finite_gradient_from_the_skip() -> None:
    """Clamping would turn inf into +-clip_value: the window must still be skipped whole."""
    model = mlp(4)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    accumulator = accumfn.GradientAccumulator(
        optimizer, 1, max_grad_norm=None, skip_nonfinite=True, clip_value=0.5
    )
    x, y = data(4, 4)
    loss = nn.functional.mse_loss(model(x), y) * torch.tensor(float("inf"))
    accumulator.accumulate(loss, model)
    assert accumulator.stats.skipped_steps == 1
    torch.testing.assert_close([p.detach() for p in model.parameters()], before, rtol=0, atol=0)


def test_a_failed_before_step_does_not_grow_the_grad_scaler() -> None:
    model = mlp(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)

    def fail(_: torch.optim.Optimizer) -> None:
        raise RuntimeError("boom")

    accumulator = accumfn.GradientAccumulator(optimizer, 1, scaler=scaler, before_step=fail)
    x, y = data(5, 4)
    with pytest.raises(accumfn.StepError, match="before_step"):
        accumulator.accumulate(nn.functional.mse_loss(model(x), y), model)
    assert scaler.get_scale() == 8.0
    assert accumulator.stats.skipped_steps == 1
