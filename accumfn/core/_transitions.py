"""Every decision of accumulation: when a window closes, how to scale, what counts.

All transitions are pure functions of frozen records; the shell carries out their plans.
"""

from __future__ import annotations

import numbers
from typing import NoReturn

from ..errors import CallOrderError, ConfigError
from ._checks import check_count
from ._schedule import StepsSpec
from ._state import (
    _PLANS,
    DEFAULT_MAX_GRAD_NORM,
    AccumConfig,
    AccumState,
    MicroPlan,
    Normalization,
    evolve_state,
    micro_plan,
    state_evolver,
)

__all__ = [
    "ON_DEVICE",
    "check_flush_scaler",
    "check_state",
    "check_step_scaler",
    "close_window",
    "closes_window",
    "finish_step",
    "init",
    "micro_step",
    "rescale_in_step",
    "start_epoch",
    "sync_next_forward",
    "window_after",
]

# Enum members read through the class cost a metaclass lookup each: read once.
_MEAN = Normalization.MEAN
_ITEMS = Normalization.ITEMS

_count_micro_step = state_evolver(
    "micro_step", "window_norm", "window_items", "total_micro_steps", "window_scaled"
)
_count_on_device = state_evolver(
    "micro_step",
    "window_norm",
    "window_items",
    "total_micro_steps",
    "window_scaled",
    "window_device_counts",
)
_close = state_evolver("closed", "grad_scale")
_open_next = state_evolver(
    "window",
    "micro_step",
    "window_norm",
    "window_items",
    "closed",
    "grad_scale",
    "optimizer_steps",
    "skipped_steps",
    "last_grad_norm",
    "window_scaled",
    "window_device_counts",
)


def init(
    steps: StepsSpec = 1,
    *,
    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM,
    batch_size: int = 1,
    skip_nonfinite: bool = False,
    sync_every_micro_step: bool = False,
    accum_dtype: object = None,
) -> AccumState:
    """A fresh state: epoch 0, no micro-step taken, first window sized by the schedule.

    ``steps``: an int, ``{epoch: steps}``, a callable of the effective step, or None: each
    window closes when the caller says so (``is_final_batch=True`` on its last micro-batch,
    or ``flush``), after any number of micro-batches, exactly in mean and item mode.

    The window's gradient is clipped to ``max_grad_norm`` (1.0 unless given; None: no
    clipping), as ``GradientAccumulator`` and ``AccumulationConfig`` do.

    ``accum_dtype=torch.float32`` sums a window's bf16/fp16 gradients in an fp32 buffer per
    parameter and hands them to the optimizer in the parameter's dtype at the boundary.
    """
    config = AccumConfig(
        schedule=steps,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        skip_nonfinite=skip_nonfinite,
        sync_every_micro_step=sync_every_micro_step,
        accum_dtype=accum_dtype,
    )
    return AccumState(config=config, window=config.schedule.window(0, 0))


def check_state(state: object) -> AccumState:
    """Return ``state`` if it is an AccumState, else raise ConfigError saying what to pass."""
    if not isinstance(state, AccumState):
        hint = (
            " (accumulate returns (state, stepped): unpack it)" if isinstance(state, tuple) else ""
        )
        raise ConfigError(
            f"state must be an AccumState, got {type(state).__name__}{hint}; pass the state "
            f"that accumfn.init(...) or the previous step returned."
        )
    return state


class _OnDevice:
    """``num_items`` of a micro-batch counted on the device: the shell keeps the count
    (``step/_tally.py``), the core the window's mode and micro-steps."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<a tensor>"


ON_DEVICE = _OnDevice()
"""Pass as ``micro_step``'s ``num_items`` for a count the shell keeps on the device."""


def _items(num_items: object) -> int:
    if num_items is ON_DEVICE:
        return 0
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral):
        raise ConfigError(
            f"num_items must be a Python int >= 0 (the number of items the loss sums over), "
            f"got {num_items!r} of type {type(num_items).__name__}; pass an int, or a 0-dim "
            f"integer tensor counted on the device (e.g. (labels != -100).sum())."
        )
    return check_count("num_items", num_items, minimum=0)


def _mode_error(state: AccumState, items: object) -> NoReturn:
    assert state.window_norm is not None
    given = "without num_items" if items is None else f"with num_items={items}"
    raise ConfigError(
        f"this window was opened in {state.window_norm.value} mode but this micro-batch came "
        f"{given}; pass num_items on every micro-batch of a window, or on none."
    )


def _scaling_error(scaled: bool) -> NoReturn:
    if scaled:
        raise ConfigError(
            "this micro-batch's loss is scaled by a GradScaler but the window's earlier ones "
            "were not: their gradients would be summed at different scales. Pass the same "
            "scaler= to accumulate on every micro-batch of a window, or on none."
        )
    raise ConfigError(
        "this micro-batch came without the GradScaler the window's earlier losses were "
        "scaled by: their gradients would be summed at different scales. Pass the same "
        "scaler= to accumulate on every micro-batch of a window."
    )


def micro_step(
    state: AccumState,
    *,
    is_final_batch: bool = False,
    num_items: object = None,
    scaled: bool = False,
) -> tuple[AccumState, MicroPlan]:
    """Account one micro-batch; return the new state and what the shell must do for it.

    ``is_final_batch``: this micro-batch closes the window early (the end of the data), or,
    when the caller closes windows (``steps=None``), closes this window (only this one).

    ``scaled``: the loss is scaled by an enabled GradScaler; every micro-batch of a window
    must agree, and the window's step must unscale (``check_step_scaler``).
    """
    if not isinstance(state, AccumState):
        check_state(state)
    if state.closed:
        raise CallOrderError(
            "the window is closed: call apply_step(state, optimizer, model, ...) before "
            "accumulating the next micro-batch."
        )
    if not isinstance(is_final_batch, bool):
        raise ConfigError(
            f"is_final_batch must be True or False, got {is_final_batch!r}; pass e.g. "
            f"is_final_batch=(batch_idx == len(dataloader) - 1)."
        )
    if scaled is not False and scaled is not True:
        raise ConfigError(f"scaled must be True or False, got {scaled!r}.")
    if state.window_scaled is not None and state.window_scaled is not scaled:
        _scaling_error(scaled)
    window = state.window
    taken = state.micro_step + 1
    boundary = is_final_batch or taken >= window > 0  # (window 0: the caller closes it)
    config = state.config
    reduce = (boundary or config.sync_every_micro_step) and config.accum_dtype is None
    if num_items is None:
        if state.window_norm is _ITEMS:
            _mode_error(state, None)
        new_state = _count_micro_step(
            state, taken, _MEAN, state.window_items, state.total_micro_steps + 1, scaled
        )
        divisor = window or 1  # a caller-closed window is rescaled by 1/k when it closes
        plan = _PLANS.get(4 * divisor + 2 * boundary + reduce)
        if plan is None:
            plan = micro_plan(divisor, boundary, reduce)
        return new_state, plan
    items = _items(num_items)
    if state.window_norm is _MEAN:
        _mode_error(state, num_items)
    if num_items is ON_DEVICE:  # the shell keeps the count; the state, that there is one
        new_state = _count_on_device(
            state,
            taken,
            _ITEMS,
            state.window_items,
            state.total_micro_steps + 1,
            scaled,
            state.window_device_counts + 1,
        )
    else:
        new_state = _count_micro_step(
            state, taken, _ITEMS, state.window_items + items, state.total_micro_steps + 1, scaled
        )
    plan = micro_plan(1, boundary, reduce)
    return new_state, plan


def close_window(
    state: AccumState,
    *,
    global_items: int | None = None,
    averaged_over: int = 1,
    global_micro_steps: int | None = None,
) -> AccumState:
    """Close the window after its boundary backward and fix the gradient rescale factor.

    Gradients arrive averaged over ``averaged_over`` data-parallel ranks (1 on one process).
    Mean mode: each rank divided its losses by the window N, so the window's
    ``global_micro_steps`` micro-batches over all ranks (``micro_step`` on one process) are
    rescaled by ``averaged_over * N / global_micro_steps``: N/k for a short window of k,
    also when ranks closed it with different k. A window the caller closes (``steps=None``)
    was not divided (N taken as 1): 1/k, the mean of its micro-batches' losses over all
    ranks, whatever each rank's k. Item mode: gradients hold the sum over
    items, rescaled by ``averaged_over / global_items``; a window with no item on any rank
    gets factor 0: the step applies nothing and counts the window as skipped.
    """
    if check_state(state).closed or state.micro_step == 0:
        raise CallOrderError("close_window needs an open window with at least one micro-step.")
    averaged_over = check_count("averaged_over", averaged_over)
    if state.window_norm is _ITEMS:
        total = state.window_items if global_items is None else global_items
        total = check_count("the window's total num_items", total, minimum=0)
        scale = averaged_over / total if total else 0.0  # no item anywhere: nothing to apply
    else:
        steps = state.micro_step if global_micro_steps is None else global_micro_steps
        steps = check_count("the window's micro-steps over all ranks", steps)
        scale = averaged_over * (state.window or 1) / steps
    return _close(state, True, scale)


def check_step_scaler(state: AccumState, scaled: bool) -> None:
    """ConfigError unless the window's step is given a GradScaler exactly when its losses
    were scaled by one (``scaled``: the step has an enabled GradScaler). A state that did
    not record it (saved before it was) is not checked."""
    held = check_state(state).window_scaled
    if held is None or held is scaled:
        return
    if held:
        raise ConfigError(
            "this window's losses were scaled by a GradScaler (accumulate(..., scaler=...)) "
            "but its step was given none: its gradients still carry the loss scale. Pass the "
            "same GradScaler to the step: apply_step/step_window(..., scaler=scaler)."
        )
    raise ConfigError(
        "this window's step was given a GradScaler but its losses were accumulated without "
        "one: unscaling would divide its gradients by the loss scale. Pass the GradScaler to "
        "accumulate on every micro-batch as well (scaler=scaler), or to neither."
    )


def check_flush_scaler(state: AccumState, scaled: bool, *, ranks: int) -> None:
    """ConfigError unless ``flush`` is given the GradScaler its window's losses were scaled
    by (``scaled``: it has an enabled one) where the ranks compare it: under data
    parallelism (``ranks`` > 1) the exchange that closes the window carries the scale,
    as at ``accumulate``'s boundary. A scaler given for a window scaled by none is refused
    everywhere, as at the step."""
    if scaled:
        if check_state(state).window_scaled is False:
            raise ConfigError(
                "flush was given a GradScaler but this window's losses were accumulated "
                "without one: its step would divide their gradients by the loss scale. Pass "
                "the GradScaler to accumulate on every micro-batch as well, or to neither."
            )
    elif ranks > 1 and check_state(state).window_scaled:
        raise ConfigError(
            "this window's losses were scaled by a GradScaler but flush was given none: "
            "under data parallelism the ranks compare the GradScaler's scale when a window "
            "closes, so flush needs it as accumulate does. Pass it: "
            "flush(state, model, scaler=scaler)."
        )


def closes_window(state: AccumState, is_final_batch: object = False) -> bool:
    """Whether the next micro-step, given these arguments, will close the open window.

    Asks nothing and checks nothing: ``micro_step`` does both; this lets the shell check what
    the step will need before the boundary's backward runs.
    """
    return is_final_batch is True or state.micro_step + 1 >= state.window > 0


def window_after(state: AccumState) -> int:
    """Size of the window that opens once the current one is stepped (asks the schedule).

    The shell asks before the optimizer steps, so a schedule that raises or returns a bad
    size stops the step before anything changed; pass the answer to ``finish_step``.
    """
    return check_state(state).config.schedule.window(state.epoch, state.effective_step + 1)


def finish_step(
    state: AccumState,
    *,
    applied: bool,
    grad_norm: float | None = None,
    window: int | None = None,
) -> AccumState:
    """Count the closed window as applied or skipped and open the next window.

    ``window`` is the next window's size as ``window_after`` gave it (asked again if None).
    """
    if not check_state(state).closed:
        raise CallOrderError(
            "apply_step needs a closed window: call it only when accumulate(...) returned "
            "stepped=True."
        )
    if window is None:
        window = window_after(state)
    window = check_count("the next window's size", window, minimum=int(not state.caller_closed))
    if state.caller_closed and window:
        raise ConfigError(
            f"the next window's size must be 0 (none planned) when the caller closes windows "
            f"(steps=None), got {window}."
        )
    return _open_next(
        state,
        window,
        0,
        None,
        0,
        False,
        1.0,
        state.optimizer_steps + int(applied),
        state.skipped_steps + int(not applied),
        grad_norm,
        None,
        0,
    )


def _reopen(state: AccumState) -> AccumState:
    window = state.config.schedule.window(state.epoch, state.effective_step)
    return state if window == state.window else evolve_state(state, window=window)


def start_epoch(state: AccumState) -> tuple[AccumState, int]:
    """Begin the next epoch; an open window is discarded. Returns (state, micro-steps dropped).

    The shell must zero the gradients when the count is not 0.
    """
    if check_state(state).closed:
        raise CallOrderError(
            "the window is closed: call apply_step(...) before starting a new epoch."
        )
    dropped = state.micro_step
    fresh = evolve_state(
        state,
        epoch=state.epoch + 1,
        micro_step=0,
        window_norm=None,
        window_items=0,
        window_scaled=None,
        window_device_counts=0,
        dropped_micro_steps=state.dropped_micro_steps + dropped,
    )
    return _reopen(fresh), dropped


def rescale_in_step(state: AccumState) -> bool:
    """Whether the step multiplies the closed window's gradients by ``grad_scale``.

    With ``accum_dtype`` the shell already did, in the wide dtype, before the one rounding.
    """
    return state.config.accum_dtype is None


def sync_next_forward(state: AccumState) -> bool:
    """Whether the next micro-step's backward will reduce gradients (DDP decides at forward).

    True when the next micro-batch fills the window, or with ``sync_every_micro_step``;
    never with ``accum_dtype``, whose wide buffers the shell reduces itself.
    """
    if state.config.accum_dtype is not None:
        return False
    if state.config.sync_every_micro_step or state.closed:
        return True
    return state.micro_step + 1 >= state.window > 0  # never for a caller-closed window (0)
