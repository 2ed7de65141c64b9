"""Property: accumulation schedules change the window only at a boundary, and survive a save.

A schedule is an int, a mapping {epoch: steps} (Lightning's GradientAccumulationScheduler
semantics: the last key <= epoch wins, 1 before the first key) or a callable of the
effective (optimizer) step (as optax's every_k_schedule). Windows are observed from real
GradientAccumulator runs over epochs whose lengths are not multiples of the window.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from accumfn import AccumState, GradientAccumulator, StateFormatError

from .conftest import record


@dataclass(frozen=True)
class Piecewise:
    """steps(effective_step): the last row whose start <= step; 1 before the first."""

    rows: tuple[tuple[int, int], ...]

    def __call__(self, step: int) -> int:
        steps = 1
        for start, size in self.rows:
            if step >= start:
                steps = size
        return steps


def expected_window(spec: Any, epoch: int, effective_step: int) -> int:
    """The schedule as documented, evaluated when a window opens."""
    if isinstance(spec, int):
        return spec
    if isinstance(spec, Mapping):
        keys = [key for key in spec if key <= epoch]
        return spec[max(keys)] if keys else 1
    return int(spec(effective_step))


sizes = st.integers(1, 6)
specs = st.one_of(
    sizes,
    st.dictionaries(st.integers(0, 4), sizes, min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 12), sizes), min_size=1, max_size=3).map(
        lambda rows: Piecewise(tuple(sorted(rows)))
    ),
)


@dataclass
class Window:
    epoch: int
    start_step: int
    size: int
    taken: int
    closed_by_final_batch: bool


def run(
    spec: Any, epochs: list[int], *, resume_at: int | None = None
) -> tuple[list[Window], GradientAccumulator, nn.Module]:
    """Train over ``epochs`` (micro-batches per epoch); optionally save and reload mid-run."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = GradientAccumulator(optimizer, spec, max_grad_norm=None)
    windows: list[Window] = []
    micro_index = 0
    for epoch, length in enumerate(epochs):
        for index in range(length):
            if micro_index == resume_at:
                saved = json.loads(json.dumps(acc.state_dict()["accumfn"]))
                checkpoint = {**acc.state_dict(), "accumfn": saved}
                acc = GradientAccumulator(optimizer, spec, max_grad_norm=None)
                acc.load_state_dict(checkpoint)
            micro_index += 1
            if not acc.state.is_accumulating:
                windows.append(Window(epoch, acc.effective_step, acc.accumulation_steps, 0, False))
            assert acc.accumulation_steps == windows[-1].size  # fixed inside a window
            x = torch.full((1, 2), float(micro_index % 5))
            last = index == length - 1
            stepped = acc.accumulate(model(x).pow(2).mean(), model, is_final_batch=last)
            windows[-1].taken += 1
            if stepped:
                windows[-1].closed_by_final_batch = last and windows[-1].taken < windows[-1].size
        acc.reset_epoch()
    return windows, acc, model


@settings(max_examples=150, deadline=None)
@given(
    spec=specs,
    epochs=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    resume=st.floats(0, 1),
)
def test_windows_follow_the_schedule_and_change_only_at_boundaries(
    spec: Any, epochs: list[int], resume: float
) -> None:
    windows, acc, model = run(spec, epochs)
    for window in windows:
        assert window.size == expected_window(spec, window.epoch, window.start_step)
        if window.closed_by_final_batch:
            assert window.taken < window.size
        else:
            assert window.taken == window.size
    assert [w.start_step for w in windows] == list(range(len(windows)))
    assert acc.effective_step == len(windows)
    assert acc.stats.total_steps == sum(epochs)
    assert acc.state.dropped_micro_steps == 0

    # save and reload at any micro-step (mid-window included): nothing changes
    resume_at = int(resume * (sum(epochs) - 1))
    resumed, resumed_acc, resumed_model = run(spec, epochs, resume_at=resume_at)
    assert [(w.epoch, w.start_step, w.size, w.taken) for w in resumed] == [
        (w.epoch, w.start_step, w.size, w.taken) for w in windows
    ]
    assert resumed_acc.state == acc.state
    diff = max(
        float((p - q).detach().abs().max())
        for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True)
    )
    assert diff == 0.0
    record(
        "schedule windows (resumed run == uninterrupted run)",
        diff,
        quantity="|param - uninterrupted param|",
    )


@settings(max_examples=100, deadline=None)
@given(spec=specs, epochs=st.lists(st.integers(1, 12), min_size=1, max_size=3))
def test_state_round_trips_and_a_callable_must_be_passed_again(
    spec: Any, epochs: list[int]
) -> None:
    _, acc, _ = run(spec, epochs)
    data = json.loads(json.dumps(acc.state.to_dict()))
    if isinstance(spec, Piecewise):
        with pytest.raises(
            StateFormatError, match=r"callable accumulation schedule.*pass it again"
        ):
            AccumState.from_dict(data)
        restored = AccumState.from_dict(data, schedule=spec)
    else:
        restored = AccumState.from_dict(data)
        with pytest.raises(StateFormatError, match="only for states saved with a callable"):
            AccumState.from_dict(data, schedule=Piecewise(((0, 2),)))
    assert restored == acc.state
    record("schedule to_dict/from_dict round trips", 0.0, quantity="state difference")
