"""What the window step resolves once (parameter sets, checks) is resolved again when it changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import accumfn
from accumfn import GradientAccumulator
from accumfn.errors import ConfigError

from .support import data, max_param_diff, mse, same, twin


def _model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("api", ["functional", "object"])
def test_a_param_group_added_mid_run_joins_the_window(api: str) -> None:
    """The head trains first; the body is unfrozen and added to the optimizer after two
    windows: from then on it is clipped, stepped and zeroed with the head."""
    model = _model()
    ref = twin(model)
    x, y = data(7, 4 * 3 * 5)
    windows = [(x[i : i + 12], y[i : i + 12]) for i in range(0, len(x), 12)]

    def start(m: nn.Module) -> torch.optim.Optimizer:
        m[0].requires_grad_(False)
        return torch.optim.SGD(m[2].parameters(), lr=0.1)

    def add_body(m: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        m[0].requires_grad_(True)
        optimizer.add_param_group({"params": list(m[0].parameters()), "lr": 0.05})

    ref_opt = start(ref)
    for w, (xw, yw) in enumerate(windows):
        if w == 2:
            add_body(ref, ref_opt)
        ref_opt.zero_grad(set_to_none=True)
        mse(ref, xw, yw).backward()
        torch.nn.utils.clip_grad_norm_([p for g in ref_opt.param_groups for p in g["params"]], 0.1)
        ref_opt.step()

    optimizer = start(model)
    state = accumfn.init(3, max_grad_norm=0.1)
    accumulator = GradientAccumulator(optimizer, 3, max_grad_norm=0.1)
    for w, (xw, yw) in enumerate(windows):
        if w == 2:
            add_body(model, optimizer)
        for xb, yb in zip(xw.split(4), yw.split(4), strict=True):
            loss = mse(model, xb, yb)
            if api == "object":
                accumulator.accumulate(loss, model)
                continue
            state, stepped = accumfn.accumulate(state, loss, model)
            if stepped:
                state = accumfn.step_window(state, optimizer, model).state
    assert max_param_diff(model, ref) < 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_checks_run_again_for_a_new_optimizer_or_model() -> None:
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    state, stepped = accumfn.accumulate(accumfn.init(1), mse(model, *data(8, 4)), model)
    assert stepped
    state = accumfn.step_window(state, sgd, model).state  # checked once, remembered
    state, _ = accumfn.accumulate(state, mse(model, *data(9, 4)), model)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    params = [p.detach().clone() for p in model.parameters()]
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ConfigError, match=r"LBFGS.step\(\) needs closure"):
        accumfn.step_window(state, lbfgs, model)
    with pytest.raises(ConfigError, match=r"model must be a torch\.nn\.Module, got list"):
        accumfn.step_window(state, sgd, [model])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"optimizer\[1\] must be a torch.optim.Optimizer"):
        accumfn.step_window(state, [sgd, "sgd"], model)  # type: ignore[list-item]
    assert same(grads, [p.grad for p in model.parameters() if p.grad is not None])
    assert same(params, [p.detach() for p in model.parameters()])
    assert accumfn.step_window(state, sgd, model).applied


def test_hooks_are_checked_on_every_window_after_the_checks_are_remembered() -> None:
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    state, _ = accumfn.accumulate(accumfn.init(1), mse(model, *data(8, 4)), model)
    state = accumfn.step_window(state, sgd, model).state  # checked once, remembered
    state, _ = accumfn.accumulate(state, mse(model, *data(9, 4)), model)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"clip_value must be"):
        accumfn.step_window(state, sgd, model, clip_value=-1.0)
    with pytest.raises(ConfigError, match=r"before_step must be a function"):
        accumfn.step_window(state, sgd, model, before_step="log")  # type: ignore[arg-type]
    assert same(grads, [p.grad for p in model.parameters() if p.grad is not None])
    assert same(params, [p.detach() for p in model.parameters()])
    seen: list[object] = []
    report = accumfn.step_window(state, sgd, model, before_step=seen.append, clip_value=1e-3)
    assert seen == [sgd] and report.applied


@pytest.mark.parametrize("api", ["functional", "object"])
def test_a_tensor_swapped_inside_a_param_group_is_covered(api: str) -> None:
    """Model surgery: after two windows the head's weight becomes a new Parameter, put in
    the optimizer's group list in place of the old one (same list, same length). From then
    on the new weight is clipped with the rest, as in the large-batch loop."""
    model = _model()
    ref = twin(model)
    x, y = data(8, 4 * 3 * 5)
    windows = [(x[i : i + 12], y[i : i + 12]) for i in range(0, len(x), 12)]

    def swap(m: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = optimizer.param_groups[0]["params"]
        index = next(i for i, p in enumerate(params) if p is m[2].weight)
        m[2].weight = nn.Parameter(m[2].weight.detach().clone())
        params[index] = m[2].weight

    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for w, (xw, yw) in enumerate(windows):
        if w == 2:
            swap(ref, ref_opt)
        ref_opt.zero_grad(set_to_none=True)
        mse(ref, xw, yw).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = accumfn.init(3, max_grad_norm=0.1)
    accumulator = GradientAccumulator(optimizer, 3, max_grad_norm=0.1)
    for w, (xw, yw) in enumerate(windows):
        if w == 2:
            swap(model, optimizer)
        for xb, yb in zip(xw.split(4), yw.split(4), strict=True):
            loss = mse(model, xb, yb)
            if api == "object":
                accumulator.accumulate(loss, model)
                continue
            state, stepped = accumfn.accumulate(state, loss, model)
            if stepped:
                state = accumfn.step_window(state, optimizer, model).state
    assert max_param_diff(model, ref) < 1e-6
    assert all(p.grad is None for p in model.parameters())
