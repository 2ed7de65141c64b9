"""The shell: carries out a closed window's step and an epoch change on real torch objects."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import attrs
import torch
from torch import nn
from torch.amp import GradScaler

from . import _accum_buffer as buffers
from . import _distributed as distributed
from . import core
from ._grads import (
    check_scaler,
    clip_grads_,
    clip_grads_by_value_,
    grad_norm,
    optimizer_params,
    params_with_grads,
    scale_grads_,
    zero_grads_,
)
from ._window import (
    LRScheduler,
    Optimizers,
    Schedulers,
    as_optimizers,
    as_schedulers,
    check_fp16_with_scaler,
    check_steppable,
    claim_scaler,
    enabled,
    warn_untracked,
    window_params,
)
from .core import AccumState
from .core._checks import check_positive_float
from .errors import CallOrderError, ConfigError, StepError

__all__ = [
    "LRScheduler",
    "Optimizers",
    "Schedulers",
    "StepReport",
    "apply_step",
    "reset_epoch",
    "step_window",
]

_ORDER = "; the order is (state, optimizer, model, ...)"


@attrs.frozen
class StepReport:
    """What ``step_window`` did. ``grad_norm`` stays on the device until someone reads it."""

    state: AccumState
    applied: bool
    """The optimizer(s) stepped (False: the window was skipped for non-finite gradients)."""
    grad_norm: torch.Tensor | None
    """Pre-clip norm of the window's (unscaled, normalized) gradients."""


def check_model(model: object, *, optional: bool = False, hint: str = _ORDER) -> None:
    """Raise ConfigError unless ``model`` is an ``nn.Module`` (or None when optional)."""
    if not (isinstance(model, nn.Module) or (optional and model is None)):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}.")


@attrs.frozen
class _Window:
    """A closed window's step, checked whole: what it covers and the window after it."""

    optimizers: tuple[torch.optim.Optimizer, ...]
    schedulers: tuple[Callable[[], object], ...]
    scaler: GradScaler | None
    next_window: int
    before_step: Callable[[Optimizers], object] | None = None
    clip_value: float | None = None
    given: Optimizers | None = None
    """The optimizer(s) as the user passed them, for ``before_step``."""


def check_hooks(before_step: object, clip_value: object) -> float | None:
    if before_step is not None and not callable(before_step):
        raise ConfigError(
            f"before_step must be a function of the optimizer(s) or None, got "
            f"{type(before_step).__name__}."
        )
    return check_positive_float("clip_value", clip_value, allow_none=True)


def prepare_step(
    state: AccumState,
    optimizer: object,
    model: object,
    scaler: object,
    scheduler: object,
    *,
    before_step: Callable[[Optimizers], object] | None = None,
    clip_value: float | None = None,
    warn: bool = True,
) -> _Window:
    """Check everything the step that ends ``state``'s window needs; change nothing.

    The window may still be open: ``GradientAccumulator`` checks before the boundary's
    backward (with ``warn=False``: parameters outside the optimizers are looked for after
    it, when FSDP2 has put its sharded parameters back).
    """
    optimizers = as_optimizers(optimizer, hint=_ORDER)
    check_model(model)
    check_scaler(scaler)
    clip_value = check_hooks(before_step, clip_value)
    assert isinstance(model, nn.Module)
    assert scaler is None or isinstance(scaler, GradScaler)
    schedulers = as_schedulers(scheduler)
    check_steppable(optimizers)
    params = window_params(optimizers)
    check_fp16_with_scaler(params, scaler, grads=True)
    claim_scaler(scaler, optimizers)
    next_window = core.window_after(state)
    if warn:  # after the boundary's backward: FSDP2 holds its sharded parameters again
        warn_untracked(model, optimizers, params)
    return _Window(
        optimizers,
        schedulers,
        enabled(scaler),
        next_window,
        before_step,
        clip_value,
        optimizer,  # type: ignore[arg-type]
    )


def _scaler_step(optimizer: torch.optim.Optimizer, scaler: GradScaler) -> bool:
    stepped = False

    def mark(*_: object) -> None:
        nonlocal stepped
        stepped = True

    handle = optimizer.register_step_post_hook(mark)
    try:
        scaler.step(optimizer)
    finally:
        handle.remove()
    return stepped


class _Progress:
    """How far a step got, for the message when something in it raises."""

    def __init__(self) -> None:
        self.where = "unscaling and clipping the gradients"
        self.stepped: list[int] = []
        self.applied = False
        self.scaler_pending = False
        """The GradScaler holds unscale records that only ``update()`` clears."""


def _step_optimizers(
    window: _Window,
    grouped: list[list[torch.Tensor]],
    norm: torch.Tensor | None,
    skip_nonfinite: bool,
    progress: _Progress,
) -> bool:
    """Step every optimizer, or none when the window's gradients are not finite."""
    scaler = window.scaler
    with_grads = sum(1 for params in grouped if params)
    # GradScaler decides per optimizer: with several, one read decides for the whole window.
    check = skip_nonfinite if scaler is None else with_grads > 1
    if check and norm is not None and not bool(torch.isfinite(norm)):  # one read
        if scaler is not None:
            scaler.update()
            progress.scaler_pending = False
        return False
    stepped = True
    for index, (optimizer, params) in enumerate(zip(window.optimizers, grouped, strict=True)):
        progress.where = f"optimizer {index} ({type(optimizer).__name__}) step()"
        if scaler is not None and params:
            stepped = _scaler_step(optimizer, scaler) and stepped
        else:
            optimizer.step()
        progress.stepped.append(index)
    if scaler is not None and with_grads:
        progress.where = "GradScaler.update()"
        scaler.update()
        progress.scaler_pending = False
    return stepped


def _run(
    state: AccumState, window: _Window, progress: _Progress
) -> tuple[bool, torch.Tensor | None]:
    if state.grad_scale == 0:  # an item-mode window without items on any rank
        warnings.warn(
            f"the window closed with num_items=0 on every micro-batch of every rank "
            f"({state.micro_step} micro-batch(es) here): no update was applied and the window "
            f"counts in skipped_steps, without a scheduler step.",
            stacklevel=4,
        )
        return False, None
    grouped = [params_with_grads(optimizer_params(o)) for o in window.optimizers]
    params = [param for group in grouped for param in group]
    if window.scaler is not None:
        for optimizer, group in zip(window.optimizers, grouped, strict=True):
            if group:
                window.scaler.unscale_(optimizer)
                progress.scaler_pending = True
    if core.rescale_in_step(state):
        scale_grads_(params, state.grad_scale)
    if window.before_step is not None:
        progress.where = "before_step"
        window.before_step(window.given if window.given is not None else window.optimizers[0])
        progress.where = "clipping the gradients"
        grouped = [params_with_grads(optimizer_params(o)) for o in window.optimizers]
        params = [param for group in grouped for param in group]
    finite_check = None
    if window.clip_value is not None:
        # Clamping turns inf into +-clip_value: decide "finite?" on the gradients before it.
        finite_check = grad_norm(params)
        clip_grads_by_value_(params, window.clip_value)
    norm = grad_norm(params)
    max_norm = state.config.max_grad_norm
    if max_norm is not None and norm is not None:
        clip_grads_(params, max_norm, norm)
    applied = _step_optimizers(
        window,
        grouped,
        norm if finite_check is None else finite_check,
        state.config.skip_nonfinite,
        progress,
    )
    progress.applied = applied
    if applied:
        for index, step in enumerate(window.schedulers):
            progress.where = f"scheduler {index} step()"
            step()
    return applied, norm


def _recover(window: _Window, progress: _Progress) -> None:
    """After a failed step: drop the window's gradients, let the GradScaler start afresh."""
    zero_grads_(list(window.optimizers))
    if window.scaler is not None and progress.scaler_pending:
        # Clear its per-optimizer records for the next window without counting the failed
        # window as a clean step: the scale (and its growth tracker) stay as they were.
        window.scaler.update(new_scale=window.scaler.get_scale())


def run_step(state: AccumState, window: _Window, model: nn.Module) -> StepReport:
    """Carry out a checked window (see ``step_window``)."""
    progress = _Progress()
    try:
        applied, norm = _run(state, window, progress)
    except Exception as exc:
        _recover(window, progress)
        applied = progress.applied
        new_state = core.finish_step(state, applied=applied, window=window.next_window)
        distributed.set_forward_sync(model, core.sync_next_forward(new_state))
        moved = (
            f" Optimizer(s) {progress.stepped} had stepped: their parameters moved."
            if progress.stepped and not applied
            else ""
        )
        raise StepError(
            f"the window's step failed in {progress.where}: {type(exc).__name__}: {exc}. The "
            f"window was closed as {'applied' if applied else 'skipped'} (its gradients "
            f"zeroed, the GradScaler updated) and the next one opened.{moved} Continue from "
            f"this error's .state (GradientAccumulator does so itself).",
            new_state,
            applied,
        ) from exc
    zero_grads_(list(window.optimizers))
    new_state = core.finish_step(state, applied=applied, window=window.next_window)
    distributed.set_forward_sync(model, core.sync_next_forward(new_state))
    return StepReport(state=new_state, applied=applied, grad_norm=norm)


def step_window(
    state: AccumState,
    optimizer: Optimizers,
    model: nn.Module,
    *,
    scaler: GradScaler | None = None,
    scheduler: Schedulers | None = None,
    before_step: Callable[[Optimizers], object] | None = None,
    clip_value: float | None = None,
) -> StepReport:
    """Apply a closed window without reading anything back from the device.

    The window covers the parameters of ``optimizer`` (one, or a list stepped together);
    ``model`` is used only for gradient sync and a one-time warning about trainable
    parameters outside every optimizer. In order: unscale (GradScaler, per optimizer),
    rescale as the core decided (short window, item count), clip once over all of them,
    step every optimizer unless the gradients are non-finite (GradScaler's decision, or
    ``skip_nonfinite``; with several optimizers the window is skipped whole), update the
    GradScaler once, step the scheduler(s) only when the window was applied, zero the
    gradients, open the next window.

    ``before_step(optimizer)`` is called once per window with the optimizer(s) as passed,
    after unscale and rescale and before the value clip, the norm, clipping and the
    non-finite check: the gradients it sees (and may edit) are those large-batch training
    would have. ``clip_value`` clamps every gradient entry to ``[-clip_value, clip_value]``
    there (Lightning's ``gradient_clip_algorithm="value"``); the norm is taken after it.

    All or nothing: the arguments, the scheduler's ``step()`` signature, an optimizer that
    needs a closure, fp16 gradients under a GradScaler and the next window's size (the
    schedule) are checked first; such an error changes nothing, so fix the cause and call
    again with the same state. If the optimizer or scheduler still raises, ``StepError``
    carries the state to continue from: the window closed (applied if every optimizer had
    stepped, else skipped), its gradients zeroed, the GradScaler updated.
    """
    if not core.check_state(state).closed:
        raise CallOrderError(
            "apply_step needs a closed window: call it only after accumulate(...) returned "
            f"stepped=True (this window holds {state.micro_step} of {state.window} micro-steps)."
        )
    window = prepare_step(
        state, optimizer, model, scaler, scheduler, before_step=before_step, clip_value=clip_value
    )
    return run_step(state, window, model)


def apply_step(
    state: AccumState,
    optimizer: Optimizers,
    model: nn.Module,
    scaler: GradScaler | None = None,
    scheduler: Schedulers | None = None,
    *,
    before_step: Callable[[Optimizers], object] | None = None,
    clip_value: float | None = None,
) -> AccumState:
    """Apply a closed window (see ``step_window``) and record its pre-clip gradient norm.

    Reading the norm is one host-device sync per window; use ``step_window`` to keep it lazy.
    """
    report = step_window(
        state,
        optimizer,
        model,
        scaler=scaler,
        scheduler=scheduler,
        before_step=before_step,
        clip_value=clip_value,
    )
    if report.grad_norm is None:
        return report.state
    return attrs.evolve(report.state, last_grad_norm=float(report.grad_norm))


def reset_epoch(
    state: AccumState, optimizer: Optimizers, model: nn.Module | None = None
) -> AccumState:
    """Start the next epoch. An open window is discarded: its gradients (those of the
    optimizer(s)' parameters) are zeroed, never leaked into the next window, counted in
    ``dropped_micro_steps``, and a warning says so. Pass ``is_final_batch=True`` on an
    epoch's last micro-batch to apply it instead.
    """
    optimizers = as_optimizers(optimizer, hint=_ORDER)
    check_model(model, optional=True)
    new_state, dropped = core.start_epoch(state)
    if dropped:
        zero_grads_(list(optimizers))
        buffers.drop(optimizer_params(list(optimizers)))
        warnings.warn(
            f"reset_epoch discarded an open window of {dropped} micro-batch(es); pass "
            f"is_final_batch=True on the epoch's last micro-batch to apply it instead.",
            stacklevel=2,
        )
    if model is not None:
        distributed.set_forward_sync(model, core.sync_next_forward(new_state))
    return new_state
