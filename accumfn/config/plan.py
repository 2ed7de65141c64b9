"""Choose a window size: physical batch x devices x window = effective batch."""

from __future__ import annotations

import math

import attrs

from ..core import DEFAULT_MAX_GRAD_NORM, check_count

__all__ = ["WindowPlan", "format_plan", "plan_window"]


@attrs.frozen
class WindowPlan:
    """The window that reaches ``target`` from ``batch_size`` per device on ``devices``."""

    batch_size: int
    devices: int
    target: int
    window: int
    """Micro-batches accumulated per optimizer step on each device."""

    @property
    def per_step_all_devices(self) -> int:
        """Samples processed by all devices in one micro-step."""
        return self.batch_size * self.devices

    @property
    def effective_batch(self) -> int:
        """Samples behind one optimizer step, all devices together."""
        return self.batch_size * self.devices * self.window

    @property
    def per_device_effective_batch(self) -> int:
        """What ``GradientAccumulator.effective_batch_size`` reports on each device."""
        return self.batch_size * self.window

    @property
    def exact(self) -> bool:
        return self.effective_batch == self.target


def plan_window(batch_size: int, target: int, devices: int = 1) -> WindowPlan:
    """The smallest window whose effective batch is at least ``target``."""
    batch_size = check_count("batch_size", batch_size)
    target = check_count("target", target)
    devices = check_count("devices", devices)
    window = max(1, math.ceil(target / (batch_size * devices)))
    return WindowPlan(batch_size=batch_size, devices=devices, target=target, window=window)


def format_plan(plan: WindowPlan, max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM) -> str:
    """The plan as the table users read, the clipping it runs under (the default unless
    given), and a note when the target is not reachable."""
    from ._advice import clipping_text  # _advice imports this module

    rows = [
        ("physical batch per device", plan.batch_size),
        ("devices", plan.devices),
        ("accumulation steps (window)", plan.window),
        ("effective batch per device", plan.per_device_effective_batch),
        ("effective batch (all devices)", plan.effective_batch),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append(f"clipping: {clipping_text(max_grad_norm)}")
    lines.append("")
    lines.append(
        f"GradientAccumulator(optimizer, accumulation_steps={plan.window}, "
        f"batch_size={plan.batch_size})   # or accumfn.init(steps={plan.window}, "
        f"batch_size={plan.batch_size})"
    )
    if plan.target < plan.per_step_all_devices:
        lines.append(_below_one_micro_batch(plan))
    elif not plan.exact:
        below = plan.window - 1
        lower = plan.batch_size * plan.devices * below
        alternative = f"; window {below} gives {lower}" if below >= 1 else ""
        lines.append(
            f"note: target {plan.target} is not a multiple of {plan.per_step_all_devices} "
            f"(batch x devices); window {plan.window} gives {plan.effective_batch}{alternative}. "
            f"Change the batch size or the number of devices to hit it exactly."
        )
    return "\n".join(lines)


def _below_one_micro_batch(plan: WindowPlan) -> str:
    if plan.devices == 1:
        holds = f"one micro-batch already holds {plan.batch_size}"
    else:
        holds = (
            f"one micro-step already holds {plan.batch_size} per device x {plan.devices} "
            f"devices = {plan.per_step_all_devices}"
        )
    if plan.devices == 1:
        fix = f"use a batch size of {plan.target}"
    elif plan.target % plan.devices == 0:
        fix = f"use a batch size of {plan.target // plan.devices} per device"
    else:
        fix = f"use fewer devices, or a target that is a multiple of {plan.devices}"
    return (
        f"note: target {plan.target} is below one micro-batch: {holds}, so there is nothing "
        f"to accumulate (window 1 gives {plan.effective_batch}). To step on {plan.target} "
        f"samples, {fix}."
    )
