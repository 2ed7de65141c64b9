"""A loop's habits inside a window: leftover zero_grad or step, optimizers stepped in backward.

Each mistake raises before anything more changes (params, grads, optimizer state, the
accumulator's state), the same with and without ``accum_dtype``; the loop without it is
exact, and the guard costs no host sync on a micro-step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import accumfn
from accumfn import CallOrderError, ConfigError
from tests.support import HostSyncCounter, data, large_batch_run, max_param_diff, mlp, mse, same

STEPS, MICRO = 4, 3


def _micro(seed: int, windows: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(seed, STEPS * MICRO * windows)
    return list(zip(x.split(MICRO), y.split(MICRO), strict=True))


def _windows(
    micro: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The large batches: each window's micro-batches in one."""
    return [
        (torch.cat([x for x, _ in micro[i:][:STEPS]]), torch.cat([y for _, y in micro[i:][:STEPS]]))
        for i in range(0, len(micro), STEPS)
    ]


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, holder: Any) -> dict[str, Any]:
    """Everything a refused call must leave as it was."""
    state = holder.state if isinstance(holder, accumfn.GradientAccumulator) else holder[0]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "state": state.to_dict(),
    }


class _Loop:
    """The object or the functional API, one micro-batch at a time."""

    def __init__(self, api: str, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        self.api, self.optimizer = api, optimizer
        self.accumulator = accumfn.GradientAccumulator(optimizer, STEPS, **kwargs)
        self.holder: Any = self.accumulator if api == "object" else [accumfn.init(STEPS, **kwargs)]

    def accumulate(self, loss: torch.Tensor, model: nn.Module) -> bool:
        if self.api == "object":
            return self.accumulator.accumulate(loss, model)
        state, stepped = accumfn.accumulate(self.holder[0], loss, model)
        if stepped:
            state = accumfn.apply_step(state, self.optimizer, model)
        self.holder[0] = state
        return stepped


WIDE = [None, torch.float64]


@pytest.mark.parametrize("accum_dtype", WIDE, ids=["plain", "accum_dtype"])
@pytest.mark.parametrize("api", ["object", "functional"])
def test_zero_grad_left_at_the_top_of_each_micro_step_is_refused(
    api: str, accum_dtype: torch.dtype | None
) -> None:
    model = mlp(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loop = _Loop(api, optimizer, max_grad_norm=None, accum_dtype=accum_dtype)
    micro = _micro(1)
    optimizer.zero_grad()
    loop.accumulate(mse(model, *micro[0]), model)
    optimizer.zero_grad()  # the line left over from the old loop
    loss = mse(model, *micro[1])
    before = _snapshot(model, optimizer, loop.holder)
    with pytest.raises(CallOrderError, match=r"optimizer\.zero_grad\(\).*inside an open window"):
        loop.accumulate(loss, model)
    assert same(before, _snapshot(model, optimizer, loop.holder)), "the refusal changed something"


@pytest.mark.parametrize("accum_dtype", WIDE, ids=["plain", "accum_dtype"])
@pytest.mark.parametrize("api", ["object", "functional"])
def test_step_and_zero_grad_left_after_each_micro_batch_are_refused(
    api: str, accum_dtype: torch.dtype | None
) -> None:
    model = mlp(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loop = _Loop(api, optimizer, max_grad_norm=None, accum_dtype=accum_dtype)
    micro = _micro(2)
    if api == "functional":  # the functional API learns the optimizer at a window's step
        for batch in micro[:STEPS]:
            loop.accumulate(mse(model, *batch), model)
        micro = micro[STEPS:]
    loop.accumulate(mse(model, *micro[0]), model)
    before = _snapshot(model, optimizer, loop.holder)
    with pytest.raises(CallOrderError, match=r"optimizer\.step\(\) \(AdamW\).*did not run"):
        optimizer.step()  # the leftover line, right after accumulate
    assert same(before, _snapshot(model, optimizer, loop.holder)), "the refusal changed something"


def test_functional_first_window_catches_the_zero_grad_after_a_leftover_step() -> None:
    """Before its first step the functional API does not know the optimizer: the leftover
    ``step()`` runs there, and its ``zero_grad()`` is refused at the next micro-step."""
    model = mlp(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = accumfn.init(STEPS, max_grad_norm=None)
    micro = _micro(3)
    state, _ = accumfn.accumulate(state, mse(model, *micro[0]), model)
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(CallOrderError, match=r"optimizer\.zero_grad\(\)"):
        accumfn.accumulate(state, mse(model, *micro[1]), model)


@pytest.mark.parametrize(
    "touch",
    [
        pytest.param(lambda m: nn.utils.clip_grad_norm_(m.parameters(), 1e-3), id="clip"),
        pytest.param(lambda m: [p.grad.zero_() for p in m.parameters()], id="zero_in_place"),
        pytest.param(
            lambda m: [setattr(p, "grad", p.grad.clone()) for p in m.parameters()], id="replace"
        ),
    ],
)
def test_other_writes_to_an_open_windows_gradients_are_refused(
    touch: Callable[[nn.Module], object],
) -> None:
    model = mlp(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=None)
    micro = _micro(4)
    accumulator.accumulate(mse(model, *micro[0]), model)
    touch(model)
    before = _snapshot(model, optimizer, accumulator)
    with pytest.raises(CallOrderError, match="inside an open window"):
        accumulator.accumulate(mse(model, *micro[1]), model)
    assert same(before, _snapshot(model, optimizer, accumulator))


def test_caller_closed_windows_are_counted_without_a_planned_size() -> None:
    model = mlp(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = accumfn.GradientAccumulator(optimizer, None, max_grad_norm=None)
    micro = _micro(6)
    accumulator.accumulate(mse(model, *micro[0]), model)
    accumulator.accumulate(mse(model, *micro[1]), model)
    with pytest.raises(CallOrderError, match=r"\(2 micro-batches accumulated\)"):
        optimizer.step()


@pytest.mark.parametrize("accum_dtype", WIDE, ids=["plain", "accum_dtype"])
@pytest.mark.parametrize("api", ["object", "functional"])
def test_the_loop_without_the_leftovers_equals_the_large_batch(
    api: str, accum_dtype: torch.dtype | None
) -> None:
    model = mlp(5)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loop = _Loop(api, optimizer, max_grad_norm=None, accum_dtype=accum_dtype)
    micro = _micro(5, windows=3)
    for batch in micro:
        loop.accumulate(mse(model, *batch), model)
    large_batch_run(
        reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), _windows(micro), None
    )
    assert max_param_diff(model, reference) < 1e-6


@pytest.mark.parametrize("accum_dtype", WIDE, ids=["plain", "accum_dtype"])
def test_the_guard_reads_nothing_back_from_the_device(accum_dtype: torch.dtype | None) -> None:
    model = mlp(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = accumfn.GradientAccumulator(
        optimizer, STEPS, max_grad_norm=None, accum_dtype=accum_dtype
    )
    micro = _micro(6)
    accumulator.accumulate(mse(model, *micro[0]), model)
    losses = [mse(model, *batch) for batch in micro[1 : STEPS - 1]]
    with HostSyncCounter() as counter:
        for loss in losses:  # micro-steps that do not close the window
            accumulator.accumulate(loss, model)
    assert counter.calls == []


def _in_backward(seed: int) -> tuple[nn.Module, dict[torch.Tensor, torch.optim.Optimizer]]:
    """torchtune's optimizer in backward: an optimizer per parameter, stepped by a hook."""
    model = mlp(seed)
    optimizers = {p: torch.optim.AdamW([p], lr=1e-2) for p in model.parameters()}

    def step(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad()

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(step)
    return model, optimizers


@pytest.mark.parametrize("api", ["object", "functional"])
def test_optimizers_stepped_inside_backward_are_refused_with_nothing_changed(api: str) -> None:
    model, optimizers = _in_backward(7)
    opts = list(optimizers.values())
    micro = _micro(7)
    accumulator = accumfn.GradientAccumulator(opts, STEPS, max_grad_norm=None)
    state = accumfn.init(STEPS, max_grad_norm=None)
    before = {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "optimizers": [copy.deepcopy(o.state_dict()) for o in opts],
        "state": (accumulator.state if api == "object" else state).to_dict(),
    }
    with pytest.raises(ConfigError, match="stepped inside accumfn's backward") as info:
        if api == "object":
            accumulator.accumulate(mse(model, *micro[0]), model)
        else:
            accumfn.accumulate(state, mse(model, *micro[0]), model)
    assert "Nothing changed" in str(info.value)
    after = {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "optimizers": [copy.deepcopy(o.state_dict()) for o in opts],
        "state": (accumulator.state if api == "object" else state).to_dict(),
    }
    assert same(before, after), "the refusal changed something"


def test_other_post_accumulate_grad_hooks_are_left_to_run() -> None:
    """A hook that only looks at the gradient (a norm logger) is not a step: exact."""
    model = mlp(8).double()
    reference = copy.deepcopy(model)
    seen: list[int] = []
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(lambda p: seen.append(p.numel()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=None)
    micro = [(x.double(), y.double()) for x, y in _micro(8)]
    for batch in micro:
        accumulator.accumulate(mse(model, *batch), model)
    large_batch_run(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), _windows(micro), None
    )
    assert seen and max_param_diff(model, reference) < 1e-12


def test_a_fresh_state_on_the_same_model_starts_its_own_window() -> None:
    """Dropping a functional state (and zeroing its gradients) is not a leftover zero_grad."""
    model = mlp(9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    micro = _micro(9)
    state, _ = accumfn.accumulate(accumfn.init(STEPS), mse(model, *micro[0]), model)
    optimizer.zero_grad()
    optimizer.step()  # nothing left to guard: the window's gradients are gone
    state, _ = accumfn.accumulate(accumfn.init(STEPS), mse(model, *micro[1]), model)
    assert state.micro_step == 1
