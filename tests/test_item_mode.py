"""Item mode (``num_items=``): bad counts and mixed modes are refused and change nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import accumfn
from accumfn import ConfigError, LossError, Normalization

from .support import data, large_batch_run, max_param_diff, mlp, twin


def _sum_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the rows (the items) of each row's mean squared error."""
    return nn.functional.mse_loss(model(x), y, reduction="none").mean(dim=1).sum()


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _assert_grads_equal(model: nn.Module, before: list[torch.Tensor | None]) -> None:
    for p, g in zip(model.parameters(), before, strict=True):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is not None
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


BAD_COUNTS: list[tuple[Any, str]] = [
    (-1, "must be >= 0, got -1"),
    (-4, "must be >= 0, got -4"),
    (2.5, "got 2.5 of type float"),
    (3.0, "got 3.0 of type float"),
    ("3", "got '3' of type str"),
    (True, "got True of type bool"),
    (False, "got False of type bool"),
    (torch.tensor(3.0), "got a torch.float32 tensor"),
    (torch.tensor(True), "got a torch.bool tensor"),
    (torch.tensor([3]), "tensor of shape (1,)"),
    (torch.tensor([[3, 4]]), "tensor of shape (1, 2)"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_COUNTS, ids=[repr(b) for b, _ in BAD_COUNTS])
def test_bad_num_items_is_refused_and_changes_nothing(bad: Any, message: str) -> None:
    model = mlp(0)
    x, y = data(0, 8)
    state = accumfn.init(steps=3, max_grad_norm=None)
    state, _ = accumfn.accumulate(state, _sum_loss(model, x[:4], y[:4]), model, num_items=4)
    grads = _grads(model)
    with pytest.raises(ConfigError, match="num_items") as error:
        accumfn.accumulate(state, _sum_loss(model, x[4:], y[4:]), model, num_items=bad)
    assert message in str(error.value)
    _assert_grads_equal(model, grads)  # no backward ran


def test_non_integer_message_says_how_to_count() -> None:
    model = mlp(0)
    x, y = data(0, 4)
    with pytest.raises(ConfigError, match=r"0-dim integer tensor .*\(labels != -100\)\.sum\(\)"):
        accumfn.accumulate(accumfn.init(2), _sum_loss(model, x, y), model, num_items=4.0)


@pytest.mark.parametrize("first_items", [True, False], ids=["items-then-mean", "mean-then-items"])
def test_mixing_modes_in_one_window_is_refused_and_changes_nothing(first_items: bool) -> None:
    model = mlp(1)
    x, y = data(1, 8)
    state = accumfn.init(steps=3, max_grad_norm=None)
    if first_items:
        first, second = _sum_loss(model, x[:4], y[:4]), nn.functional.mse_loss(model(x[4:]), y[4:])
        state, _ = accumfn.accumulate(state, first, model, num_items=4)
        expected = "opened in items mode but this micro-batch came without num_items"
        second_items = None
    else:
        first, second = nn.functional.mse_loss(model(x[:4]), y[:4]), _sum_loss(model, x[4:], y[4:])
        state, _ = accumfn.accumulate(state, first, model)
        expected = "opened in mean mode but this micro-batch came with num_items=4"
        second_items = 4
    grads = _grads(model)
    with pytest.raises(ConfigError, match="pass num_items on every micro-batch") as error:
        accumfn.accumulate(state, second, model, num_items=second_items)
    assert expected in str(error.value)
    _assert_grads_equal(model, grads)


def test_accumulator_keeps_its_state_after_a_refused_micro_batch() -> None:
    """After the error the window goes on and the update still equals the token mean."""
    model = mlp(2)
    ref = twin(model)
    x, y = data(2, 9)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    acc = accumfn.GradientAccumulator(opt, 2, max_grad_norm=None)
    assert not acc.accumulate(_sum_loss(model, x[:4], y[:4]), model, num_items=4)
    before = acc.state
    for bad in (None, -1, 1.5):
        with pytest.raises(ConfigError):
            acc.accumulate(_sum_loss(model, x[4:], y[4:]), model, num_items=bad)
    assert acc.state == before and acc.state.window_norm is Normalization.ITEMS
    assert acc.accumulate(_sum_loss(model, x[4:], y[4:]), model, num_items=5)
    large_batch_run(ref, torch.optim.SGD(ref.parameters(), lr=0.2), [(x, y)], None)
    assert max_param_diff(model, ref) < 1e-6


def test_numpy_integer_counts_are_accepted() -> None:
    model, ref = mlp(3), mlp(3)
    x, y = data(3, 6)
    for m, count in ((model, np.int64(6)), (ref, 6)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        state, stepped = accumfn.accumulate(
            accumfn.init(1, max_grad_norm=None), _sum_loss(m, x, y), m, num_items=count
        )
        assert stepped and state.window_items == 6
        accumfn.apply_step(state, opt, m)
    assert max_param_diff(model, ref) == 0


def test_mode_may_change_between_windows() -> None:
    """The mode belongs to a window: item mode, then mean mode, each equals its large batch."""
    model = mlp(4)
    ref = twin(model)
    x, y = data(4, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    state = accumfn.init(steps=2, max_grad_norm=None)
    state, _ = accumfn.accumulate(state, _sum_loss(model, x[:2], y[:2]), model, num_items=2)
    state, stepped = accumfn.accumulate(state, _sum_loss(model, x[2:6], y[2:6]), model, num_items=4)
    assert stepped
    state = accumfn.apply_step(state, opt, model)
    assert state.window_norm is None
    for xb, yb in ((x[6:8], y[6:8]), (x[8:], y[8:])):
        state, stepped = accumfn.accumulate(state, nn.functional.mse_loss(model(xb), yb), model)
    assert stepped
    accumfn.apply_step(state, opt, model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    large_batch_run(ref, ref_opt, [(x[:6], y[:6]), (x[6:], y[6:])], None)
    assert max_param_diff(model, ref) < 1e-6


def test_unreduced_item_loss_is_refused() -> None:
    model = mlp(5)
    x, y = data(5, 4)
    per_item = nn.functional.mse_loss(model(x), y, reduction="none").sum(dim=1)
    state = accumfn.init(2, max_grad_norm=None)
    with pytest.raises(LossError, match=r"loss\.sum\(\) with num_items"):
        accumfn.accumulate(state, per_item, model, num_items=4)
    assert all(p.grad is None for p in model.parameters())
