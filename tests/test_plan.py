"""The window planner: physical batch x devices x window = effective batch."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accumfn import ConfigError
from accumfn.plan import format_plan, plan_window


def test_guide_table() -> None:
    plan = plan_window(batch_size=8, target=256, devices=4)
    assert (plan.window, plan.per_device_effective_batch, plan.effective_batch) == (8, 64, 256)
    assert plan.exact
    text = format_plan(plan)
    assert "accumulation steps (window)    8" in text
    assert "accumulation_steps=8, batch_size=8" in text
    assert "note:" not in text


def test_unreachable_target_is_explained() -> None:
    plan = plan_window(batch_size=6, target=100, devices=4)
    assert (plan.window, plan.effective_batch, plan.exact) == (5, 120, False)
    assert "window 5 gives 120; window 4 gives 96" in format_plan(plan)


@given(st.integers(1, 512), st.integers(1, 4096), st.integers(1, 64))
def test_smallest_window_reaching_target(batch: int, target: int, devices: int) -> None:
    plan = plan_window(batch, target, devices)
    assert plan.effective_batch >= target
    assert plan.window == 1 or batch * devices * (plan.window - 1) < target


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"batch_size": 0, "target": 32}, "batch_size must be >= 1"),
        ({"batch_size": 8, "target": 32.0}, "target must be an int"),
        ({"batch_size": 8, "target": 32, "devices": True}, "devices must be an int"),
    ],
)
def test_bad_plan_input(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        plan_window(**kwargs)  # type: ignore[arg-type]
