"""The shell: carries out a closed window's step and an epoch change on real torch objects."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import attrs
import torch
from torch import nn
from torch.amp import GradScaler

from . import _distributed as distributed
from . import core
from ._grads import WindowGrads, check_scaler, grads_of, zero_grads_
from ._window import (
    LRScheduler,
    Optimizers,
    ParamSet,
    Schedulers,
    as_optimizers,
    as_schedulers,
    check_fp16_with_scaler,
    check_steppable,
    claim_scaler,
    enabled,
    param_set,
    warn_untracked,
)
from .core import AccumState
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
    """Pre-clip norm of the window's (unscaled, normalized) gradients: computed when
    something uses it (clipping, ``skip_nonfinite``, the GradScaler's check across several
    optimizers) or ``grad_norm=True`` asked for it; else None, and no norm is computed."""


def check_model(model: object, *, optional: bool = False, hint: str = _ORDER) -> None:
    """Raise ConfigError unless ``model`` is an ``nn.Module`` (or None when optional)."""
    if not (isinstance(model, nn.Module) or (optional and model is None)):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}.")


class _Window:
    """A closed window's step, checked whole: what it covers and the window after it."""

    __slots__ = ("next_window", "optimizers", "params", "scaler", "schedulers")

    def __init__(
        self,
        optimizers: tuple[torch.optim.Optimizer, ...],
        schedulers: tuple[Callable[[], object], ...],
        scaler: GradScaler | None,
        next_window: int,
        params: ParamSet,
    ) -> None:
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.scaler = scaler
        self.next_window = next_window
        self.params = params


_checked: tuple[weakref.ref[nn.Module], tuple[weakref.ref[torch.optim.Optimizer], ...]] | None = (
    None
)
"""The model and optimizers of the last window checked without a GradScaler: the checks
that depend on nothing else (types, duplicates, step signatures, the warning about
untracked parameters) need not run again for them."""


def prepare_step(
    state: AccumState, optimizer: object, model: object, scaler: object, scheduler: object
) -> _Window:
    """Check everything the step that ends ``state``'s window needs; change nothing.

    The window may still be open: ``GradientAccumulator`` checks before the boundary's
    backward. Checks that depend only on the model and optimizers run again only when
    they change; the parameter groups and the schedule are asked every time.
    """
    global _checked
    checked = _checked
    if scaler is None and checked is not None and checked[0]() is model:
        refs = checked[1]
        optimizers: tuple[torch.optim.Optimizer, ...] | None = None
        if len(refs) == 1 and refs[0]() is optimizer:
            optimizers = (optimizer,)  # type: ignore[assignment]
        elif (
            isinstance(optimizer, (list, tuple))
            and len(optimizer) == len(refs)
            and all(ref() is item for ref, item in zip(refs, optimizer, strict=True))
        ):
            optimizers = tuple(optimizer)
        if optimizers is not None:
            schedulers = () if scheduler is None else as_schedulers(scheduler)
            params = param_set(optimizers)
            return _Window(optimizers, schedulers, None, core.window_after(state), params)
    optimizers = as_optimizers(optimizer, hint=_ORDER)
    check_model(model)
    check_scaler(scaler)
    assert isinstance(model, nn.Module)
    assert scaler is None or isinstance(scaler, GradScaler)
    schedulers = as_schedulers(scheduler)
    check_steppable(optimizers)
    params = param_set(optimizers)
    check_fp16_with_scaler(params.params, scaler, grads=True)
    claim_scaler(scaler, optimizers)
    next_window = core.window_after(state)
    warn_untracked(model, optimizers, params.params)
    if scaler is None:
        _checked = (weakref.ref(model), tuple(weakref.ref(o) for o in optimizers))
    return _Window(optimizers, schedulers, enabled(scaler), next_window, params)


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

    __slots__ = ("applied", "index", "phase", "scaler_pending", "stepped")

    def __init__(self) -> None:
        self.phase = "grads"
        self.index = 0
        self.stepped: list[int] = []
        self.applied = False
        self.scaler_pending = False
        """The GradScaler holds unscale records that only ``update()`` clears."""

    def where(self, window: _Window) -> str:
        if self.phase == "optimizer":
            name = type(window.optimizers[self.index]).__name__
            return f"optimizer {self.index} ({name}) step()"
        if self.phase == "scheduler":
            return f"scheduler {self.index} step()"
        if self.phase == "update":
            return "GradScaler.update()"
        return "unscaling and clipping the gradients"


def _step_optimizers(
    window: _Window,
    has_grads: list[bool],
    norm: torch.Tensor | None,
    check_finite: bool,
    progress: _Progress,
) -> bool:
    """Step every optimizer, or none when the window's gradients are not finite."""
    scaler = window.scaler
    if check_finite and norm is not None and not bool(torch.isfinite(norm)):  # one read
        if scaler is not None:
            scaler.update()
            progress.scaler_pending = False
        return False
    stepped = True
    progress.phase = "optimizer"
    for index, (optimizer, grads) in enumerate(zip(window.optimizers, has_grads, strict=True)):
        progress.index = index
        if scaler is not None and grads:
            stepped = _scaler_step(optimizer, scaler) and stepped
        else:
            optimizer.step()
        progress.stepped.append(index)
    if scaler is not None and any(has_grads):
        progress.phase = "update"
        scaler.update()
        progress.scaler_pending = False
    return stepped


def _run(
    state: AccumState, window: _Window, progress: _Progress, want_norm: bool
) -> tuple[bool, torch.Tensor | None]:
    config = state.config
    scaler = window.scaler
    clips = config.max_grad_norm is not None
    grads = None
    has_grads = [True] * len(window.optimizers)  # read only with a GradScaler
    check_finite = config.skip_nonfinite
    if scaler is not None or clips or check_finite or want_norm or state.grad_scale != 1.0:
        grouped = [grads_of(params) for params in window.params.per_optimizer]
        grads = WindowGrads(
            grouped[0] if len(grouped) == 1 else [grad for group in grouped for grad in group]
        )
        has_grads = [bool(group) for group in grouped]
        if scaler is not None:
            # GradScaler decides per optimizer: with several, one read decides for all.
            check_finite = sum(has_grads) > 1
            for optimizer, present in zip(window.optimizers, has_grads, strict=True):
                if present:
                    scaler.unscale_(optimizer)
                    progress.scaler_pending = True
    norm = None
    if grads is not None:
        grads.scale_(state.grad_scale)
        norm = grads.norm() if clips or check_finite or want_norm else None
        if config.max_grad_norm is not None and norm is not None:
            grads.clip_(config.max_grad_norm, norm)
    applied = _step_optimizers(window, has_grads, norm, check_finite, progress)
    progress.applied = applied
    if applied and window.schedulers:
        progress.phase = "scheduler"
        for index, step in enumerate(window.schedulers):
            progress.index = index
            step()
    return applied, norm


def _recover(window: _Window, progress: _Progress) -> None:
    """After a failed step: drop the window's gradients, let the GradScaler start afresh."""
    zero_grads_(window.optimizers)
    if window.scaler is not None and progress.scaler_pending:
        window.scaler.update()  # clears its per-optimizer records for the next window


def run_step(
    state: AccumState, window: _Window, model: nn.Module, *, grad_norm: bool = False
) -> StepReport:
    """Carry out a checked window (see ``step_window``)."""
    progress = _Progress()
    try:
        applied, norm = _run(state, window, progress, grad_norm)
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
        where = progress.where(window)
        raise StepError(
            f"the window's step failed in {where}: {type(exc).__name__}: {exc}. The "
            f"window was closed as {'applied' if applied else 'skipped'} (its gradients "
            f"zeroed, the GradScaler updated) and the next one opened.{moved} Continue from "
            f"this error's .state (GradientAccumulator does so itself).",
            new_state,
            applied,
        ) from exc
    for optimizer in window.optimizers:
        optimizer.zero_grad(set_to_none=True)
    new_state = core.finish_step(state, applied=applied, window=window.next_window)
    parallel = distributed.strategy(model)
    if parallel.kind != "plain":
        parallel.set_forward_sync(core.sync_next_forward(new_state))
    return StepReport(state=new_state, applied=applied, grad_norm=norm)


def step_window(
    state: AccumState,
    optimizer: Optimizers,
    model: nn.Module,
    *,
    scaler: GradScaler | None = None,
    scheduler: Schedulers | None = None,
    grad_norm: bool = False,
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

    The pre-clip norm (``StepReport.grad_norm``, on the device) is computed only when
    something uses it: clipping, ``skip_nonfinite``, the GradScaler's check across several
    optimizers, or ``grad_norm=True``; otherwise it is None and no norm is computed.

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
    window = prepare_step(state, optimizer, model, scaler, scheduler)
    return run_step(state, window, model, grad_norm=grad_norm)


def apply_step(
    state: AccumState,
    optimizer: Optimizers,
    model: nn.Module,
    scaler: GradScaler | None = None,
    scheduler: Schedulers | None = None,
) -> AccumState:
    """Apply a closed window (see ``step_window``) and record its pre-clip gradient norm.

    The norm is always computed and read here: one host-device sync per window. Use
    ``step_window`` to keep it on the device, or not compute it when nothing uses it.
    """
    report = step_window(
        state, optimizer, model, scaler=scaler, scheduler=scheduler, grad_norm=True
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
        warnings.warn(
            f"reset_epoch discarded an open window of {dropped} micro-batch(es); pass "
            f"is_final_batch=True on the epoch's last micro-batch to apply it instead.",
            stacklevel=2,
        )
    if model is not None:
        distributed.set_forward_sync(model, core.sync_next_forward(new_state))
    return new_state
