"""The pure core: transitions, invariants and serialization, without torch."""

from __future__ import annotations

import json

import attrs
import pytest

from accumfn import core
from accumfn.errors import CallOrderError, ConfigError, StateFormatError


def run(state: core.AccumState, n: int, **kwargs: object) -> list[bool]:
    boundaries = []
    for _ in range(n):
        state, plan = core.micro_step(state, **kwargs)  # type: ignore[arg-type]
        boundaries.append(plan.boundary)
        if plan.boundary:
            state = core.finish_step(core.close_window(state), applied=True)
    return boundaries


def test_core_does_not_import_torch() -> None:
    import subprocess
    import sys

    # Load accumfn.core without running accumfn/__init__ (which imports the torch layers).
    code = (
        "import importlib.util, sys, types;"
        "spec = importlib.util.find_spec('accumfn');"
        "pkg = types.ModuleType('accumfn'); pkg.__path__ = list(spec.submodule_search_locations);"
        "sys.modules['accumfn'] = pkg;"
        "import accumfn.core; print('torch' in sys.modules, accumfn.core.init(2).window)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False 2"


def test_window_closes_every_n_micro_steps() -> None:
    assert run(core.init(3), 7) == [False, False, True, False, False, True, False]


def test_mean_mode_plan_divides_by_window_and_short_window_is_rescaled() -> None:
    state = core.init(4)
    state, plan = core.micro_step(state)
    assert plan.loss_divisor == 4 and not plan.boundary and not plan.reduce_grads
    state, plan = core.micro_step(state, is_final_batch=True)
    assert plan.boundary and plan.reduce_grads
    closed = core.close_window(state)
    assert closed.closed and closed.grad_scale == pytest.approx(4 / 2)


def test_item_mode_scale_uses_global_items_and_world() -> None:
    state = core.init(2)
    state, plan = core.micro_step(state, num_items=3)
    assert plan.loss_divisor == 1
    state, _ = core.micro_step(state, num_items=5)
    assert state.window_items == 8
    assert core.close_window(state, global_items=20, averaged_over=2).grad_scale == 2 / 20
    assert core.close_window(state).grad_scale == 1 / 8


def test_mixing_modes_in_a_window_is_refused_and_state_unchanged() -> None:
    state, _ = core.micro_step(core.init(4), num_items=3)
    with pytest.raises(ConfigError, match="pass num_items on every micro-batch"):
        core.micro_step(state)
    assert state.micro_step == 1 and state.window_items == 3


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True])
def test_bad_num_items(bad: object) -> None:
    with pytest.raises(ConfigError, match="num_items"):
        core.micro_step(core.init(2), num_items=bad)


def test_a_window_without_items_closes_with_factor_zero() -> None:
    state, _ = core.micro_step(core.init(2), num_items=0)
    state, _ = core.micro_step(state, num_items=0)
    closed = core.close_window(state)
    assert (closed.closed, closed.grad_scale) == (True, 0.0)
    assert core.AccumState.from_dict(closed.to_dict()) == closed
    with pytest.raises(ConfigError, match="grad_scale is 0 only"):
        attrs.evolve(state, grad_scale=0.0)


def test_finish_step_counts_applied_and_skipped() -> None:
    state = core.init(1)
    for applied in (True, False, True):
        state, _ = core.micro_step(state)
        state = core.finish_step(core.close_window(state), applied=applied)
    assert (state.optimizer_steps, state.skipped_steps, state.effective_step) == (2, 1, 3)


def test_next_window_is_decided_before_the_step() -> None:
    """window_after asks the schedule once, before the step; finish_step opens that window."""
    asked: list[int] = []

    def schedule(step: int) -> int:
        asked.append(step)
        return 2 + step

    state = core.init(schedule)
    for final in (False, True):
        assert core.closes_window(state, is_final_batch=final) == final
        state, plan = core.micro_step(state, is_final_batch=final)
        assert plan.boundary == final
    closed = core.close_window(state)
    window = core.window_after(closed)
    assert core.window_after(state) == window == 3
    opened = core.finish_step(closed, applied=False, window=window)
    assert (opened.window, opened.skipped_steps) == (3, 1)
    assert asked == [0, 1, 1]  # init, then one question per window_after call
    with pytest.raises(ConfigError, match="the next window's size"):
        core.finish_step(closed, applied=True, window=0)


def test_call_order_errors() -> None:
    with pytest.raises(CallOrderError, match="closed window"):
        core.finish_step(core.init(2), applied=True)
    state, _ = core.micro_step(core.init(1))
    closed = core.close_window(state)
    with pytest.raises(CallOrderError, match="apply_step"):
        core.micro_step(closed)
    with pytest.raises(CallOrderError, match="apply_step"):
        core.start_epoch(closed)


def test_start_epoch_drops_open_window_and_reopens_by_schedule() -> None:
    state = core.init({0: 2, 1: 5})
    state, _ = core.micro_step(state)
    state, dropped = core.start_epoch(state)
    assert dropped == 1 and state.dropped_micro_steps == 1
    assert (state.epoch, state.window, state.micro_step, state.window_norm) == (1, 5, 0, None)


def test_sync_next_forward() -> None:
    state = core.init(3)
    syncs = []
    for _ in range(3):
        syncs.append(core.sync_next_forward(state))
        state, _ = core.micro_step(state)
    assert syncs == [False, False, True]
    assert core.sync_next_forward(core.init(3, sync_every_micro_step=True))
    assert core.sync_next_forward(core.init(1))


def test_round_trip_is_json_and_identical() -> None:
    state = core.init({0: 3, 2: 1}, max_grad_norm=0.5, batch_size=4)
    state, _ = core.micro_step(state, num_items=7)
    data = json.loads(json.dumps(state.to_dict()))
    assert core.AccumState.from_dict(data) == state


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("epoch"), "missing"),
        (lambda d: d.update(extra=1), "unexpected"),
        (lambda d: d.update(epoch="1"), "must be int"),
        (lambda d: d.update(closed=1), "must be bool"),
        (lambda d: d.update(format=99), "format 99 is not supported"),
        (lambda d: d["config"].update(batch_size=True), "must be int"),
        (lambda d: d.update(micro_step=9), "exceeds the window"),
        (lambda d: d.update(window_norm="median"), "inconsistent"),
    ],
)
def test_from_dict_is_strict(change: object, match: str) -> None:
    data = core.init(4).to_dict()
    change(data)  # type: ignore[operator]
    with pytest.raises(StateFormatError, match=match):
        core.AccumState.from_dict(data)


def test_callable_schedule_must_be_given_again() -> None:
    def schedule(step: int) -> int:
        return 2 if step < 3 else 4

    data = core.init(schedule).to_dict()
    with pytest.raises(StateFormatError, match="pass it again"):
        core.AccumState.from_dict(data)
    assert core.AccumState.from_dict(data, schedule=schedule).window == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 2.0}, "steps must be an int"),
        ({"steps": "4"}, "steps must be an int"),
        ({"steps": True}, "steps must be an int"),
        ({"steps": 2, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"steps": 2, "max_grad_norm": -1.0}, "max_grad_norm"),
        ({"steps": 2, "max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"steps": 2, "batch_size": 0}, "batch_size must be >= 1"),
        ({"steps": {}}, "non-empty mapping"),
        ({"steps": {0: 0}}, "schedule steps must be >= 1"),
    ],
)
def test_bad_config(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        core.init(**kwargs)  # type: ignore[arg-type]


def test_callable_schedule_bad_value() -> None:
    with pytest.raises(ConfigError, match="returned 0 for effective step 0"):
        core.init(lambda step: 0)


def test_transitions_return_frozen_states_of_the_real_class() -> None:
    import pickle

    import attrs

    state = core.init(2, max_grad_norm=1.0)
    states = [state]
    for _ in range(2):
        state, _ = core.micro_step(state)
        states.append(state)
    state = core.close_window(state)
    states.append(state)
    states.append(core.finish_step(state, applied=True, grad_norm=0.5))
    states.append(core.start_epoch(states[-1])[0])
    for one in states:
        assert type(one) is core.AccumState
        assert attrs.evolve(one) == one  # every validator passes on the same values
        assert pickle.loads(pickle.dumps(one)) == one and hash(one.config) == hash(state.config)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            one.micro_step = 5  # type: ignore[misc]
    assert states[-2].last_grad_norm == 0.5 and states[-2].optimizer_steps == 1
