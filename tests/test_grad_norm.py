"""The pre-clip norm: computed when something uses it, equal to the large batch's when it is."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import accumfn
from accumfn import GradientAccumulator
from accumfn.errors import ConfigError

from .support import data, max_param_diff, mlp, mse, same, twin, windows_of

NORM_OPS = ("linalg_vector_norm", "_foreach_norm", "norm")


class _Ops(TorchDispatchMode):
    """Records the names of the aten ops that run (the real ops run unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextmanager
def recording() -> Iterator[_Ops]:
    with _Ops() as ops:
        yield ops


def _norms(ops: _Ops) -> list[str]:
    return [name for name in ops.names if name in NORM_OPS]


def _reference_run(
    model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]], clip: float | None
) -> list[float]:
    """Large batch, SGD lr 0.1: each window's pre-clip gradient norm."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    for x, y in windows:
        optimizer.zero_grad(set_to_none=True)
        mse(model, x, y).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return norms


def _run(grad_norm: bool, max_grad_norm: float | None) -> tuple[list[Any], list[list[str]]]:
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = accumfn.init(3, max_grad_norm=max_grad_norm)
    x, y = data(0, 4 * 6)
    reports, norm_ops = [], []
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model)
        if stepped:
            with recording() as ops:
                report = accumfn.step_window(state, optimizer, model, grad_norm=grad_norm)
            state = report.state
            reports.append(report.grad_norm)
            norm_ops.append(_norms(ops))
    return reports, norm_ops


def test_no_norm_is_computed_when_nothing_uses_it() -> None:
    reports, norm_ops = _run(grad_norm=False, max_grad_norm=None)
    assert reports == [None, None]
    assert norm_ops == [[], []]


def test_step_window_computes_the_norm_when_asked_and_when_clipping() -> None:
    x, y = data(0, 4 * 6)
    expected = _reference_run(mlp(0), windows_of(x, y, 4, 3), None)
    asked, ops = _run(grad_norm=True, max_grad_norm=None)
    assert all(names for names in ops)
    assert [float(n) for n in asked] == pytest.approx(expected, rel=1e-6)
    clipped, ops = _run(grad_norm=False, max_grad_norm=1e6)  # clips nothing, uses the norm
    assert all(names for names in ops)
    assert [float(n) for n in clipped] == pytest.approx(expected, rel=1e-6)


def test_apply_step_always_records_the_norm() -> None:
    model = mlp(1)
    ref = twin(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = accumfn.init(2, max_grad_norm=None)  # no clipping
    x, y = data(1, 4 * 4)
    norms = []
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model)
        if stepped:
            state = accumfn.apply_step(state, optimizer, model)
            norms.append(state.last_grad_norm)
    assert norms == pytest.approx(_reference_run(ref, windows_of(x, y, 4, 2), None), rel=1e-6)
    assert max_param_diff(model, ref) < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_grad_norm": 1.0},  # the guide's default: clipping on
        {"max_grad_norm": None},
        {"max_grad_norm": None, "track_grad_norm": True},
        {"max_grad_norm": None, "skip_nonfinite": True},
    ],
)
def test_accumulator_stats_norm_against_large_batch(kwargs: dict[str, Any]) -> None:
    model = mlp(2)
    ref = twin(model)
    accumulator = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 2, **kwargs)
    x, y = data(2, 4 * 6)
    seen = []
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        if accumulator.accumulate(mse(model, xb, yb), model):
            seen.append(accumulator.stats.last_grad_norm)
    expected = _reference_run(ref, windows_of(x, y, 4, 2), kwargs["max_grad_norm"])
    assert max_param_diff(model, ref) < 1e-6
    if kwargs == {"max_grad_norm": None}:  # nothing uses the norm: none is computed
        assert len(seen) == 3 and all(math.isnan(norm) for norm in seen)
    else:
        assert seen == pytest.approx(expected, rel=1e-6)


def test_track_grad_norm_must_be_a_bool() -> None:
    model = mlp(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="track_grad_norm must be True or False, got 'yes'"):
        GradientAccumulator(optimizer, 2, track_grad_norm="yes")  # type: ignore[arg-type]
    assert same(before, [p.detach().clone() for p in model.parameters()])
