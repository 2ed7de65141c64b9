"""The shell: carries out a closed window's step and an epoch change on real torch objects."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.amp import GradScaler

from .. import core
from .. import parallel as distributed
from ..core import AccumState, check_positive_float
from ..errors import CallOrderError, ConfigError, StepError
from ..grads import (
    WindowGrads,
    buffers,
    check_scaler,
    clip_grads_by_value_,
    grads_of,
    is_dtensor,
    optimizer_params,
    zero_grads_,
)
from ._foreign import check_foreign_optimizer
from ._guard import existing_guard, guard_for, guards_of
from ._tally import closed_loss
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
    window_params,
)

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
    window_loss: torch.Tensor | None = None
    """The window's loss as the large batch computes it, a 0-dim float64 tensor on the
    device, not read: the mean of the window's micro-batch losses over all ranks (mean
    mode), or their sum over all ranks divided by the window's item count over all ranks
    (item mode; nan for a window without items). As given to ``accumulate``: not scaled by
    a GradScaler, nor divided by the window. None for a window ``accumulate`` did not
    close (a state rebuilt by hand)."""


def check_model(model: object, *, optional: bool = False, hint: str = _ORDER) -> None:
    """Raise ConfigError unless ``model`` is an ``nn.Module`` (or None when optional)."""
    if not (isinstance(model, nn.Module) or (optional and model is None)):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}.")


class _Progress:
    """How far a step got, for the message when something in it raises (a window's own
    record: ``run_step`` starts it afresh)."""

    __slots__ = ("applied", "index", "phase", "scaler_pending", "stepped")

    def __init__(self) -> None:
        self.phase = "grads"
        self.index = 0
        self.stepped = 0
        """Optimizers stepped so far (they step in order)."""
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
        if self.phase == "before_step":
            return "before_step"
        if self.phase == "clip":
            return "clipping the gradients"
        return "unscaling and clipping the gradients"


class _Window(_Progress):
    """A closed window's step, checked whole: what it covers and the window after it."""

    __slots__ = (
        "before_step",
        "clip_value",
        "given",
        "next_window",
        "optimizers",
        "params",
        "prepared_early",
        "scaler",
        "schedulers",
    )

    def __init__(
        self,
        optimizers: tuple[torch.optim.Optimizer, ...],
        schedulers: tuple[Callable[[], object], ...],
        scaler: GradScaler | None,
        next_window: int,
        params: ParamSet | None,
        prepared_early: bool,
        before_step: Callable[[Optimizers], object] | None = None,
        clip_value: float | None = None,
        given: Optimizers | None = None,
    ) -> None:
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.scaler = scaler
        self.next_window = next_window
        self.params = params
        self.prepared_early = prepared_early
        """Checked before the boundary's backward: the param groups are looked at again."""
        self.before_step = before_step
        self.clip_value = clip_value
        self.given = given
        """The optimizer(s) as the user passed them, for ``before_step``."""
        # The progress record (see _Progress), without a call to its __init__
        self.phase = "grads"
        self.index = 0
        self.stepped = 0
        self.applied = False
        self.scaler_pending = False


def check_hooks(before_step: object, clip_value: object) -> float | None:
    if before_step is not None and not callable(before_step):
        raise ConfigError(
            f"before_step must be a function of the optimizer(s) or None, got "
            f"{type(before_step).__name__}."
        )
    return check_positive_float("clip_value", clip_value, allow_none=True)


def check_settings(
    optimizer: object,
    steps: object,
    scaler: object,
    scheduler: object,
    before_step: object = None,
    clip_value: object = None,
) -> float | None:
    """The checks of ``prepare_step`` that need no model, for an object built to step
    windows (``GradientAccumulator``): an error is raised when it is built. Returns
    ``clip_value`` as a float (or None)."""
    optimizers = as_optimizers(optimizer)
    value = check_hooks(before_step, clip_value)
    check_steppable(optimizers)
    for item in optimizers:  # Accelerate's, DeepSpeed's, Fabric's: refused up front
        check_foreign_optimizer(item, steps)
    as_schedulers(scheduler)
    check_scaler(scaler)
    assert scaler is None or isinstance(scaler, GradScaler)
    check_fp16_with_scaler(window_params(optimizers), scaler, grads=False)
    return value


_checked: (
    tuple[weakref.ref[nn.Module], tuple[weakref.ref[torch.optim.Optimizer], ...], bool] | None
) = None
"""The model and optimizers of the last window checked without a GradScaler, and whether
the warning about untracked parameters was given for them: the checks that depend on
nothing else (types, duplicates, step signatures, that warning) need not run again."""


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
    early: bool = False,
) -> _Window:
    """Check everything the step that ends ``state``'s window needs; change nothing.

    ``early``: the window is still open, checked before the boundary's backward (the step
    then looks at the param groups again). ``warn``: look for trainable parameters outside
    the optimizers here; only after the boundary's backward, when FSDP2 has put its sharded
    parameters back (``GradientAccumulator`` looks for them itself, after the step). Checks
    that depend only on the model and optimizers run again only when they change; the
    parameter groups, the hooks and the schedule are checked every time.
    """
    global _checked
    optimizers = _remembered(model, optimizer) if scaler is None else None
    remembered = optimizers is not None
    warned = remembered and _checked is not None and _checked[2]
    if optimizers is not None:
        if before_step is not None or clip_value is not None:
            clip_value = check_hooks(before_step, clip_value)
        schedulers = () if scheduler is None else as_schedulers(scheduler)
    else:
        optimizers = as_optimizers(optimizer, hint=_ORDER)
        check_model(model)
        check_scaler(scaler)
        clip_value = check_hooks(before_step, clip_value)
        assert scaler is None or isinstance(scaler, GradScaler)
        schedulers = as_schedulers(scheduler)
        check_steppable(optimizers)
    assert isinstance(model, nn.Module)
    given = enabled(scaler)  # type: ignore[arg-type]  # (checked above when not None)
    guard = guard_for(model, window=state.window)
    guard.watch(optimizers, state.window)
    guard.check_stepped(state)  # a closed state stepped before: refused
    if given is not None and guard.scaler is not None:
        guard.check_scaler(state, given, "step")  # not the GradScaler of the window's losses
    check_reduced(model, optimizers)  # every window: a param group may have been added
    core.check_step_scaler(state, given is not None)
    params = None  # resolved here only when a check needs it; else where the step does
    if scaler is not None or len(optimizers) > 1 or (warn and not warned):
        params = param_set(optimizers)  # (two optimizers sharing a parameter: ConfigError)
        check_fp16_with_scaler(params.params, scaler, grads=True)  # type: ignore[arg-type]
        claim_scaler(scaler, optimizers)  # type: ignore[arg-type]
    next_window = core.window_after(state)
    if warn and not warned:  # after the boundary's backward: FSDP2 holds its params again
        assert params is not None
        warn_untracked(model, optimizers, params.params)
    if scaler is None and not (remembered and (warned or not warn)):
        _checked = (weakref.ref(model), tuple(weakref.ref(o) for o in optimizers), warn or warned)
    return _Window(
        optimizers,
        schedulers,
        given,
        next_window,
        params,
        early,
        before_step,
        clip_value,
        optimizer,  # type: ignore[arg-type]
    )


def check_reduced(model: object, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """ConfigError if the ranks would step parameters whose gradients nobody averages:
    under DDP (or accumfn's own reduction of a plain model) only the model's are reduced.
    (FSDP2 swaps the parameters it registers while a window is open: not checked.)"""
    if not isinstance(model, nn.Module):
        return
    parallel = distributed.strategy(model)
    if not parallel.distributed or parallel.kind not in ("ddp", "manual"):
        return
    params = list(optimizer_params(list(optimizers)))
    inside = {id(param) for param in parallel.model.parameters()}
    outside = sum(id(param) not in inside for param in params)
    if outside:
        raise ConfigError(
            f"{outside} of the optimizer's {len(params)} parameters are not parameters of the "
            f"model given to accumulate ({type(parallel.model).__name__}), whose "
            f"data-parallel reduction is the only one: their gradients would never be "
            f"averaged over the ranks, which would step them apart. Put them in that model "
            f"(wrap the module holding all trained parameters in DDP/FSDP2), or give them an "
            f"optimizer of their own with a model of their own."
        )


def _remembered(model: object, optimizer: object) -> tuple[torch.optim.Optimizer, ...] | None:
    """``optimizer`` as a tuple if it and ``model`` are those last checked without a
    GradScaler (their type checks, duplicates and step signatures need not run again)."""
    checked = _checked
    if checked is None or model is None or checked[0]() is not model:
        return None
    refs = checked[1]
    if len(refs) == 1 and refs[0]() is optimizer:
        return (optimizer,)  # type: ignore[return-value]  # checked when remembered
    if (
        isinstance(optimizer, (list, tuple))
        and len(optimizer) == len(refs)
        and all(ref() is item for ref, item in zip(refs, optimizer, strict=True))
    ):
        return tuple(optimizer)
    return None


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


def _step_optimizers(
    window: _Window,
    unscaled: list[bool],
    norm: torch.Tensor | None,
    check_finite: bool,
    progress: _Progress,
) -> bool:
    """Step every optimizer, or none when the window's gradients are not finite.

    ``unscaled``: the optimizers the GradScaler unscaled (it steps those and decides for
    them whether their gradients are finite; it is updated once it holds their records).
    """
    scaler = window.scaler
    if check_finite and norm is not None and not bool(torch.isfinite(norm)):  # one read
        _update_scaler(scaler, progress)
        return False
    stepped = True
    progress.phase = "optimizer"
    for index, (optimizer, held) in enumerate(zip(window.optimizers, unscaled, strict=True)):
        progress.index = index
        if scaler is not None and held:
            stepped = _scaler_step(optimizer, scaler) and stepped
        else:
            optimizer.step()
        progress.stepped = index + 1
    progress.phase = "update"
    _update_scaler(scaler, progress)
    return stepped


def _update_scaler(scaler: GradScaler | None, progress: _Progress) -> None:
    """``scaler.update()`` when it holds this window's unscale records (which only
    ``update`` clears: left, they make every later window's ``unscale_`` raise)."""
    if scaler is not None and progress.scaler_pending:
        scaler.update()
        progress.scaler_pending = False


def _holds_records(scaler: GradScaler) -> bool:
    """Whether ``scaler`` holds unscale records that ``update()`` would use."""
    states: dict[int, dict[str, Any]] = scaler._per_optimizer_states
    return any(state.get("found_inf_per_device") for state in states.values())


def _scaler_tensors(scaler: GradScaler | None) -> list[torch.Tensor]:
    """The GradScaler's scale and growth tracker tensors (once it has made them)."""
    found = [getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)]
    return [tensor for tensor in found if isinstance(tensor, torch.Tensor)]


def _call_before_step(window: _Window, progress: _Progress) -> None:
    """``before_step`` with the optimizer(s), refused if it steps them or updates the
    GradScaler: it is a hook for looking at and editing the window's gradients."""

    def refuse(*_: object) -> None:
        raise ConfigError(
            "before_step stepped an optimizer (optimizer.step() or scaler.step()): accumfn "
            "steps the optimizer(s) once per window, right after before_step, which is for "
            "looking at and editing the window's gradients. Remove the step from before_step "
            "(to skip a window, drop its gradients: optimizer.zero_grad(set_to_none=True))."
        )

    assert window.before_step is not None
    scaler = window.scaler
    kept = [tensor.clone() for tensor in _scaler_tensors(scaler)]  # (on the device)
    handles = [optimizer.register_step_pre_hook(refuse) for optimizer in window.optimizers]
    try:
        window.before_step(window.given if window.given is not None else window.optimizers[0])
    finally:
        for handle in handles:
            handle.remove()
    if scaler is not None and progress.scaler_pending and not _holds_records(scaler):
        progress.scaler_pending = False
        for tensor, saved in zip(_scaler_tensors(scaler), kept, strict=True):
            tensor.copy_(saved)  # its scale and growth tracker as they were
        raise ConfigError(
            "before_step called scaler.update(), which accumfn calls once per window after "
            "the optimizer(s) stepped; before_step is for looking at and editing the "
            "window's gradients. Remove the update from before_step."
        )


def _window_grads(params: ParamSet) -> tuple[WindowGrads, list[bool]]:
    """The window's gradients, and whether each optimizer has any."""
    grouped = [grads_of(group) for group in params.per_optimizer]
    grads = WindowGrads(
        grouped[0] if len(grouped) == 1 else [grad for group in grouped for grad in group]
    )
    return grads, [bool(group) for group in grouped]


def _run(
    state: AccumState, window: _Window, progress: _Progress, want_norm: bool
) -> tuple[bool, torch.Tensor | None]:
    if state.grad_scale == 0:  # an item-mode window without items on any rank
        warnings.warn(
            f"the window closed with num_items=0 on every micro-batch of every rank "
            f"({state.micro_step} micro-batch(es) here): no update was applied and the window "
            f"counts in skipped_steps, without a scheduler step.",
            stacklevel=4,
        )
        return False, None
    config = state.config
    scaler = window.scaler
    clips = config.max_grad_norm is not None
    rescale = state.grad_scale != 1.0 and core.rescale_in_step(state)
    hooks = window.before_step is not None or window.clip_value is not None
    grads = None
    unscaled = [False] * len(window.optimizers)  # read only with a GradScaler
    check_finite = config.skip_nonfinite
    if scaler is not None or clips or check_finite or want_norm or rescale or hooks:
        checked = window.params
        if checked is None or (window.prepared_early and not checked.current(window.optimizers)):
            # Not needed by the checks, or a param group added since them (in the
            # boundary's backward): resolved now, so it covers what the step steps.
            checked = param_set(window.optimizers)
        params = checked
        grads, has_grads = _window_grads(params)
        unscaled = has_grads
        if scaler is not None:
            for optimizer, present in zip(window.optimizers, has_grads, strict=True):
                if present:
                    scaler.unscale_(optimizer)
                    progress.scaler_pending = True
            # GradScaler decides per optimizer: with several, one read decides for all.
            check_finite = sum(has_grads) > 1
        if rescale:
            grads.scale_(state.grad_scale)
        if window.before_step is not None:
            progress.phase = "before_step"
            _call_before_step(window, progress)
            progress.phase = "clip"
            if not params.current(window.optimizers):
                raise ConfigError(
                    "before_step changed the optimizer's param groups, after the window's "
                    "gradients were unscaled and rescaled for the parameters it had: add or "
                    "replace parameters between windows (after the step), not in before_step."
                )
            grads, has_grads = _window_grads(params)  # it may have replaced or dropped some
            if not any(has_grads):  # it dropped them all: the window is skipped
                _update_scaler(scaler, progress)
                return False, None
            # Gradients made non-finite after the GradScaler's own check: one read decides.
            check_finite = check_finite or scaler is not None
    norm = None
    finite = None
    if grads is not None:
        if window.clip_value is not None:
            if check_finite:  # clamping turns inf into +-clip_value: decide before it
                finite = grads.norm()
            clip_grads_by_value_(params.params, window.clip_value)
            if grads.sparse:  # coalesced into new tensors
                grads, has_grads = _window_grads(params)
        norm = grads.norm() if clips or check_finite or want_norm else None
        if config.max_grad_norm is not None and norm is not None:
            grads.clip_(config.max_grad_norm, norm)
    applied = _step_optimizers(
        window, unscaled, norm if finite is None else finite, check_finite, progress
    )
    progress.applied = applied
    if applied and window.schedulers:
        progress.phase = "scheduler"
        for index, step in enumerate(window.schedulers):
            progress.index = index
            step()
    return applied, norm


def _hand_back_wide(state: AccumState, window: _Window, model: nn.Module) -> None:
    """``accum_dtype``: the window's parameters (its optimizers') get their wide sums back,
    rescaled for the window and rounded once; the model's other parameters get theirs
    unscaled (left as they are, as without ``accum_dtype``). The window's parameters
    outside the model are summed in the wide dtype from the next window on."""
    inner = distributed.strategy(model).model
    if window.params is None:
        window.params = param_set(window.optimizers)
    params = window.params.params
    buffers.cover(inner, params)
    buffers.restore_(params, state.grad_scale)
    inside = {id(param) for param in params}
    buffers.restore_((p for p in inner.parameters() if id(p) not in inside), 1.0)


def _recover(window: _Window, progress: _Progress) -> None:
    """After a failed step: drop the window's gradients, let the GradScaler start afresh."""
    zero_grads_(window.optimizers)
    scaler = window.scaler
    if scaler is not None and progress.scaler_pending and _holds_records(scaler):
        # Clear its per-optimizer records for the next window without counting the failed
        # window as a clean step: the scale (and its growth tracker) stay as they were.
        scaler.update(new_scale=scaler.get_scale())
    progress.scaler_pending = False


def run_step(
    state: AccumState, window: _Window, model: nn.Module, *, grad_norm: bool = False
) -> StepReport:
    """Carry out a checked window (see ``step_window``)."""
    guard = distributed.strategy(model).guard
    if guard is not None:
        guard.applied(state)  # closed before: only accumfn steps its optimizers from here
    progress: _Progress = window
    if progress.phase != "grads" or progress.scaler_pending:  # run before: start afresh
        _Progress.__init__(progress)
    try:
        if state.config.accum_dtype is not None:
            _hand_back_wide(state, window, model)
        applied, norm = _run(state, window, progress, grad_norm)
    except Exception as exc:
        _recover(window, progress)
        applied = progress.applied
        new_state = core.finish_step(state, applied=applied, window=window.next_window)
        distributed.set_forward_sync(model, core.sync_next_forward(new_state))
        moved = (
            f" Optimizer(s) {list(range(progress.stepped))} had stepped: their parameters moved."
            if progress.stepped and not applied
            else ""
        )
        where = progress.where(window)
        distributed.note_failure(model, f"{type(exc).__name__} in {where}: {exc}")
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
    return StepReport(new_state, applied, norm, closed_loss(state))


def step_window(
    state: AccumState,
    optimizer: Optimizers,
    model: nn.Module,
    *,
    scaler: GradScaler | None = None,
    scheduler: Schedulers | None = None,
    before_step: Callable[[Optimizers], object] | None = None,
    clip_value: float | None = None,
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

    ``before_step(optimizer)`` is called once per window with the optimizer(s) as passed,
    after unscale and rescale and before the value clip, the norm, clipping and the
    non-finite check: the gradients it sees (and may edit) are those large-batch training
    would have. ``clip_value`` clamps every gradient entry to ``[-clip_value, clip_value]``
    there (Lightning's ``gradient_clip_algorithm="value"``); the norm is taken after it.

    The pre-clip norm (``StepReport.grad_norm``, on the device) is computed only when
    something uses it: clipping, ``skip_nonfinite``, the GradScaler's check across several
    optimizers, or ``grad_norm=True``; otherwise it is None and no norm is computed.
    ``StepReport.window_loss`` is the window's loss as the large batch computes it, on the
    device (nothing is read for it).

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
            f"stepped=True (this window holds {core.window_progress(state)})."
        )
    window = prepare_step(
        state, optimizer, model, scaler, scheduler, before_step=before_step, clip_value=clip_value
    )
    return run_step(state, window, model, grad_norm=grad_norm)


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

    The norm is always computed and read here: one host-device sync per window. Use
    ``step_window`` to keep it on the device, or not compute it when nothing uses it, and
    for the window's loss (``StepReport.window_loss``).
    """
    report = step_window(
        state,
        optimizer,
        model,
        scaler=scaler,
        scheduler=scheduler,
        before_step=before_step,
        clip_value=clip_value,
        grad_norm=True,
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
    inside = state.is_accumulating and not state.config.sync_every_micro_step
    if inside and model is None and any(is_dtensor(p) for p in optimizer_params(optimizers)):
        raise ConfigError(
            "reset_epoch inside a window under FSDP2 needs the model: FSDP2 holds the open "
            "window's gradients unsharded inside its own parameters, which accumfn clears "
            "through the model. Pass it: reset_epoch(state, optimizer, model)."
        )
    new_state, dropped = core.start_epoch(state)
    for guard in [existing_guard(model), *guards_of(optimizers)]:
        if guard is not None:
            guard.applied()  # the window is gone: nothing left to guard or to apply
    if dropped:
        if model is not None and inside:
            distributed.strategy(model).drop_unreduced_grads()
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
