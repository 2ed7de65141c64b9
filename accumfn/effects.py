"""The shell: carries out a closed window's step and an epoch change on real torch objects."""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import attrs
import torch
from torch import nn
from torch.amp import GradScaler

from . import _distributed as distributed
from . import core
from ._grads import check_scaler, optimizer_params, scale_grads_
from .core import AccumState
from .errors import CallOrderError, ConfigError

__all__ = ["LRScheduler", "StepReport", "apply_step", "reset_epoch", "step_window"]


class LRScheduler(Protocol):
    """Anything with ``step()``: torch's LR schedulers and most others."""

    def step(self) -> Any: ...


@attrs.frozen
class StepReport:
    """What ``step_window`` did. ``grad_norm`` stays on the device until someone reads it."""

    state: AccumState
    applied: bool
    """The optimizer stepped (False: the window was skipped for non-finite gradients)."""
    grad_norm: torch.Tensor | None
    """Pre-clip norm of the window's (unscaled, normalized) gradients."""


def _total_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor | None:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return None
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in grads if p.grad is not None])
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)


def _step_optimizer(optimizer: torch.optim.Optimizer, scaler: GradScaler | None) -> bool:
    if scaler is None:
        optimizer.step()
        return True
    stepped = False

    def mark(*_: object) -> None:
        nonlocal stepped
        stepped = True

    handle = optimizer.register_step_post_hook(mark)
    try:
        scaler.step(optimizer)
    finally:
        handle.remove()
    scaler.update()
    return stepped


def _check_objects(optimizer: object, model: object, *, model_optional: bool = False) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            f"the order is (state, optimizer, model, ...)."
        )
    if not (isinstance(model, nn.Module) or (model_optional and model is None)):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; the order is "
            f"(state, optimizer, model, ...)."
        )


def step_window(
    state: AccumState,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    scaler: GradScaler | None = None,
    scheduler: LRScheduler | None = None,
) -> StepReport:
    """Apply a closed window without reading anything back from the device.

    In order: unscale (GradScaler), rescale as the core decided (short window, item count),
    clip once on the unscaled accumulated gradient, step the optimizer unless the gradients
    are non-finite (GradScaler's decision, or ``skip_nonfinite``), step the scheduler only
    when the optimizer stepped, zero the gradients, open the next window.
    """
    _check_objects(optimizer, model)
    check_scaler(scaler)
    if not core.check_state(state).closed:
        raise CallOrderError(
            "apply_step needs a closed window: call it only after accumulate(...) returned "
            f"stepped=True (this window holds {state.micro_step} of {state.window} micro-steps)."
        )
    if scaler is not None:
        scaler.unscale_(optimizer)
    scale_grads_(optimizer_params(optimizer), state.grad_scale)
    norm = _total_norm(list(model.parameters()), state.config.max_grad_norm)
    check = scaler is None and state.config.skip_nonfinite
    if check and norm is not None and not bool(torch.isfinite(norm)):  # read: opt-in only
        applied = False
    else:
        applied = _step_optimizer(optimizer, scaler)
    if applied and scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    new_state = core.finish_step(state, applied=applied)
    distributed.set_forward_sync(model, core.sync_next_forward(new_state))
    return StepReport(state=new_state, applied=applied, grad_norm=norm)


def apply_step(
    state: AccumState,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    scaler: GradScaler | None = None,
    scheduler: LRScheduler | None = None,
) -> AccumState:
    """Apply a closed window (see ``step_window``) and record its pre-clip gradient norm.

    Reading the norm is one host-device sync per window; use ``step_window`` to keep it lazy.
    """
    report = step_window(state, optimizer, model, scaler=scaler, scheduler=scheduler)
    if report.grad_norm is None:
        return report.state
    return attrs.evolve(report.state, last_grad_norm=float(report.grad_norm))


def reset_epoch(
    state: AccumState, optimizer: torch.optim.Optimizer, model: nn.Module | None = None
) -> AccumState:
    """Start the next epoch. An open window is discarded: its gradients are zeroed (never
    leaked into the next window), counted in ``dropped_micro_steps``, and a warning says so.
    Pass ``is_final_batch=True`` on an epoch's last micro-batch to apply it instead.
    """
    _check_objects(optimizer, model, model_optional=True)
    new_state, dropped = core.start_epoch(state)
    if dropped:
        optimizer.zero_grad(set_to_none=True)
        warnings.warn(
            f"reset_epoch discarded an open window of {dropped} micro-batch(es); pass "
            f"is_final_batch=True on the epoch's last micro-batch to apply it instead.",
            stacklevel=2,
        )
    if model is not None:
        distributed.set_forward_sync(model, core.sync_next_forward(new_state))
    return new_state
