"""What the window step resolves once (parameter sets, checks) is resolved again when it changes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

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


def _train(
    api: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: list[tuple[torch.Tensor, torch.Tensor]],
    change: Callable[[], None],
) -> None:
    """Windows of 3 micro-batches of 4, clipped at 0.1, through ``api``; ``change`` runs
    before the third window."""
    state = accumfn.init(3, max_grad_norm=0.1)
    accumulator = GradientAccumulator(optimizer, 3, max_grad_norm=0.1)
    for w, (xw, yw) in enumerate(windows):
        if w == 2:
            change()
        for xb, yb in zip(xw.split(4), yw.split(4), strict=True):
            loss = mse(model, xb, yb)
            if api == "object":
                accumulator.accumulate(loss, model)
                continue
            state, stepped = accumfn.accumulate(state, loss, model)
            if stepped:
                state = accumfn.step_window(state, optimizer, model).state


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
    _train(api, model, optimizer, windows, lambda: add_body(model, optimizer))
    assert max_param_diff(model, ref) < 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_checks_run_again_for_a_new_optimizer_or_model() -> None:
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    state, stepped = accumfn.accumulate(
        accumfn.init(1, max_grad_norm=None), mse(model, *data(8, 4)), model
    )
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
    state, _ = accumfn.accumulate(
        accumfn.init(1, max_grad_norm=None), mse(model, *data(8, 4)), model
    )
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
    _train(api, model, optimizer, windows, lambda: swap(model, optimizer))
    assert max_param_diff(model, ref) < 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_a_param_group_added_during_the_boundary_backward_joins_the_window() -> None:
    """GradientAccumulator checks the step before the boundary's backward; a gradient hook
    that adds the head to the optimizer during that backward is still clipped with the
    rest, as in the large-batch loop that adds it before its step."""
    model, ref = _model(), twin(_model())
    x, y = data(9, 8)
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    accumulator = GradientAccumulator(optimizer, 2, max_grad_norm=0.05)
    added: list[bool] = []

    def add_head(grad: torch.Tensor) -> torch.Tensor:
        if not added:
            optimizer.add_param_group({"params": list(model[2].parameters())})
            added.append(True)
        return grad

    accumulator.accumulate(mse(model, x[:4], y[:4]), model)
    model[2].weight.register_hook(add_head)
    assert accumulator.accumulate(mse(model, x[4:], y[4:]), model)

    ref_opt = torch.optim.SGD(ref[0].parameters(), lr=0.1)
    ref_opt.add_param_group({"params": list(ref[2].parameters())})
    mse(ref, x, y).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    ref_opt.step()
    assert max_param_diff(model, ref) < 1e-7
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:.*in no optimizer given to accumfn")
def test_before_step_changing_the_param_groups_is_a_clear_error() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    state = accumfn.init(2, max_grad_norm=0.05)
    x, y = data(10, 8)
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model)
    assert stepped
    params = [p.detach().clone() for p in model.parameters()]

    def add_head(_: object) -> None:
        optimizer.add_param_group({"params": list(model[2].parameters())})

    with pytest.raises(accumfn.StepError, match="before_step changed the optimizer's param"):
        accumfn.step_window(state, optimizer, model, before_step=add_head)
    assert same(params, [p.detach() for p in model.parameters()])  # nothing was stepped


def test_complex_parameters_keep_their_imaginary_part_in_a_short_window() -> None:
    torch.manual_seed(11)
    weight = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    ref_weight = nn.Parameter(weight.detach().clone())
    x = torch.randn(8, 4, dtype=torch.complex64)

    def loss(w: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return (xb @ w.T).abs().pow(2).mean()

    optimizer = torch.optim.SGD([weight], lr=0.1)
    state = accumfn.init(4, max_grad_norm=None)
    for index, xb in enumerate(x.split(4)):  # 2 of a window of 4: rescaled by 4/2
        state, stepped = accumfn.accumulate(
            state, loss(weight, xb), nn.Module(), is_final_batch=index == 1
        )
    assert stepped
    accumfn.step_window(state, optimizer, nn.Module())
    ref_opt = torch.optim.SGD([ref_weight], lr=0.1)
    loss(ref_weight, x).backward()
    ref_opt.step()
    assert (weight.detach() - ref_weight.detach()).abs().max() < 1e-6
    assert (weight.detach().imag - ref_weight.detach().imag).abs().max() < 1e-6


@pytest.mark.parametrize("bad", [None, "optimizer"])
def test_accumulate_refuses_a_model_that_is_not_a_module(bad: str | None) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    given = optimizer if bad == "optimizer" else None
    state = accumfn.init(2, max_grad_norm=None)
    state, _ = accumfn.accumulate(state, mse(model, *data(12, 4)), model)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    del model  # the model seen last is gone: no cache may stand in for it
    gc.collect()
    other = _model()
    with pytest.raises(ConfigError, match=r"model must be a torch\.nn\.Module"):
        accumfn.accumulate(state, mse(other, *data(13, 4)), given)  # type: ignore[arg-type]
    assert all(p.grad is None for p in other.parameters())  # no backward ran
    assert len(grads) == 4 and state.micro_step == 1


def test_a_model_used_with_accumfn_is_freed_when_the_user_drops_it() -> None:
    refs = []
    for seed in range(3):
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = accumfn.init(1, max_grad_norm=None)
        state, _ = accumfn.accumulate(state, mse(model, *data(seed, 4)), model)
        accumfn.step_window(state, optimizer, model)
        accumulator = GradientAccumulator(optimizer, 1)
        accumulator.accumulate(mse(model, *data(seed, 4)), model)
        refs.append(weakref.ref(model))
        del model, optimizer, accumulator, state
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
