"""The accumulation checkpoint dict: plain state, open-window gradients, scaler state.

``capture`` builds it, ``restore`` checks it whole against the state, optimizer and scaler
that will use it, and only then changes anything.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.amp import GradScaler

from .. import core
from ..core import AccumState, ByStep, window_progress
from ..errors import CheckpointError, ConfigError, StateFormatError
from ..grads import buffers, is_dtensor, optimizer_params, zero_grads_
from ..parallel import clear_failures, exchange, gather_objects, strategy
from ..step import all_guards, existing_guard, guards_of, restore_tally, settle

__all__ = ["agreeing_groups", "capture", "refuse_together", "restore"]

_KEYS = frozenset({"accumfn", "partial_grads", "scaler", "rank"})
_KEYS_V1 = _KEYS - {"rank"}  # checkpoints of accumfn 0.1, saved on one process
_LOSS_KEY = "window_loss"
"""Present inside a window only: the sum of the open window's losses so far (a float)."""
_SCALER_KEYS: dict[str, type] = {
    "scale": float,
    "growth_factor": float,
    "backoff_factor": float,
    "growth_interval": int,
    "_growth_tracker": int,
}
_CONFIG_NAMES = {
    "schedule": "accumulation schedule",
    "max_grad_norm": "max_grad_norm",
    "batch_size": "batch_size",
    "skip_nonfinite": "skip_nonfinite",
    "sync_every_micro_step": "sync_every_micro_step",
    "accum_dtype": "accum_dtype",
}


def _scaler_on(scaler: GradScaler | None) -> bool:
    return scaler is not None and scaler.is_enabled()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _open_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The parameter's share of the open window: its wide buffer (accum_dtype) or .grad."""
    buffer = buffers.buffered(param)
    if buffer is not None:
        return buffer.detach().clone()
    return None if param.grad is None else _local(param.grad).detach().clone()


def _rank() -> dict[str, int] | None:
    """This process's place in a distributed run (None on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}


def capture(
    state: AccumState,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    scaler: GradScaler | None = None,
) -> dict[str, Any]:
    """What resuming at this micro-step needs besides the model and optimizer state dicts.

    ``{"accumfn": state.to_dict(), "partial_grads": [...] or None, "scaler": {...} or None,
    "rank": {...} or None}``: the open window's gradients (cloned, in the optimizer's
    parameter order; this rank's shard under FSDP2) are kept only while a window holds
    micro-steps. In a distributed run a checkpoint taken inside a window records the rank
    that took it (each rank's open window differs) and loads only on that rank. Under FSDP2
    without ``sync_every_micro_step`` the open window's gradients live inside FSDP2, out of
    reach: capturing them there raises ``CheckpointError``. Loadable with
    ``torch.load(weights_only=True)``.

    Inside a window whose ``num_items`` were given as tensors, their count is read (once)
    and saved in the state's ``window_items``; the sum of the window's losses so far is
    saved under ``"window_loss"``, so the resumed window's loss is the whole window's.
    """
    state, loss_sum = settle(state)
    grads: list[torch.Tensor | None] | None = None
    params = list(optimizer_params(optimizer))
    if state.is_accumulating:
        if not state.config.sync_every_micro_step and any(is_dtensor(p) for p in params):
            raise CheckpointError(
                f"cannot checkpoint inside a window under FSDP2 ({window_progress(state)}): "
                f"FSDP2 keeps the open window's gradients "
                f"unsharded inside its own parameters until the window's reduce-scatter, out "
                f"of reach of a checkpoint. Checkpoint at a window boundary (when "
                f"state.is_accumulating is False, e.g. right after apply_step), or build the "
                f"accumulator with sync_every_micro_step=True (gradients reduced every "
                f"micro-step and kept sharded, which a checkpoint can hold)."
            )
        grads = [_open_grad(p) for p in params]
        # A program that saves inside a window and ends resumes it later: nothing is lost.
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        for guard in guards_of(optimizers) or all_guards():
            guard.saved()
    data: dict[str, Any] = {
        "accumfn": state.to_dict(),
        "partial_grads": grads,
        "scaler": scaler.state_dict() if scaler is not None and _scaler_on(scaler) else None,
        "rank": _rank() if state.is_accumulating else None,
    }
    if loss_sum is not None:
        data[_LOSS_KEY] = loss_sum
    return data


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config dict with a callable schedule reduced to its kind (functions don't compare)."""
    plain = dict(config)
    schedule = plain.get("schedule")
    if isinstance(schedule, Mapping) and schedule.get("kind") == "callable":
        plain["schedule"] = {"kind": "callable"}
    return plain


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    rows = [
        f"{_CONFIG_NAMES.get(key, key)}: checkpoint {saved.get(key)!r}, "
        f"this run {current.get(key)!r}"
        for key in _CONFIG_NAMES
        if saved.get(key) != current.get(key)
    ]
    return "; ".join(rows)


def _parse(data: object, current: AccumState) -> tuple[Mapping[str, Any], AccumState]:
    keys = set(data) - {_LOSS_KEY} if isinstance(data, Mapping) else set()
    if not isinstance(data, Mapping) or keys not in (_KEYS, _KEYS_V1):
        got = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(
            f"not an accumfn checkpoint: expected a dict with keys {sorted(_KEYS)}, got {got}. "
            f"Pass what GradientAccumulator.state_dict() or accumfn.checkpoint.capture() "
            f"returned, unchanged."
        )
    raw = data["accumfn"]
    schedule: object = None
    if isinstance(raw, Mapping) and isinstance(raw.get("config"), Mapping):
        saved_schedule = raw["config"].get("schedule")
        if isinstance(saved_schedule, Mapping) and saved_schedule.get("kind") == "callable":
            current_schedule = current.config.schedule
            # A callable cannot be saved; use this run's (the placeholder is never called:
            # a config that differs is refused or replaced below).
            schedule = current_schedule.fn if isinstance(current_schedule, ByStep) else _unused
    try:
        saved = AccumState.from_dict(raw, schedule=schedule)
    except StateFormatError as exc:
        raise CheckpointError(f"the accumfn state in this checkpoint is unusable: {exc}") from exc
    return raw, saved


def _unused(effective_step: int) -> int:
    raise AssertionError("placeholder schedule of a replaced config was called")


def _resolve_config(
    raw: Mapping[str, Any], saved: AccumState, current: AccumState, allow_change: bool
) -> AccumState:
    saved_config = _plain_config(raw["config"])
    current_config = _plain_config(current.to_dict()["config"])
    if saved_config == current_config:
        return saved
    diff = _differences(saved_config, current_config)
    if not allow_change:
        raise CheckpointError(
            f"the checkpoint is from a run with another accumulation config: build the "
            f"accumulator with the checkpoint's settings, or pass allow_config_change=True to "
            f"continue under the new ones from a checkpoint taken at a window boundary. "
            f"Differences: {diff}."
        )
    if saved.is_accumulating:
        raise CheckpointError(
            f"the checkpoint was taken inside a window ({window_progress(saved)}) whose "
            f"gradients were scaled for the old config, so allow_config_change needs a "
            f"checkpoint taken at a window boundary: resume under the old config up to the "
            f"next boundary, checkpoint there, then change. "
            f"Differences: {diff}."
        )
    window = current.config.schedule.window(saved.epoch, saved.effective_step)
    return attrs.evolve(saved, config=current.config, window=window)


def _check_scaler(
    saved_state: object, saved: AccumState, scaler: GradScaler | None, allow_change: bool
) -> Mapping[str, Any] | None:
    """The scaler state to load into ``scaler``, or None; raise when they do not fit."""
    if saved_state is not None and not isinstance(saved_state, Mapping):
        raise CheckpointError(
            f"the checkpoint's scaler state must be a dict or None, got "
            f"{type(saved_state).__name__}. Pass what state_dict()/capture() returned."
        )
    saved_on = bool(saved_state)
    if saved_on != _scaler_on(scaler):
        if allow_change and not saved.is_accumulating:
            return None
        had = "with" if saved_on else "without"
        fix = (
            "pass the same kind of GradScaler"
            if saved_on
            else "drop the scaler (scaler=None) for this run"
        )
        raise CheckpointError(
            f"the checkpoint was saved {had} an enabled GradScaler and this run "
            f"{'has none' if saved_on else 'has one'}: {fix}, or pass allow_config_change=True "
            f"with a checkpoint taken at a window boundary (open-window gradients are scaled "
            f"by the scaler that made them)."
        )
    if not saved_on:
        return None
    assert isinstance(saved_state, Mapping)
    wrong = set(saved_state) != set(_SCALER_KEYS) or any(
        isinstance(saved_state[key], bool)
        or not isinstance(saved_state[key], numbers.Integral if kind is int else numbers.Real)
        for key, kind in _SCALER_KEYS.items()
    )
    if wrong:
        raise CheckpointError(
            f"the checkpoint's scaler state is malformed: expected numbers under "
            f"{sorted(_SCALER_KEYS)}, got {dict(saved_state)!r}. Pass what "
            f"GradScaler.state_dict() returned."
        )
    return saved_state


def _check_grads(
    saved_grads: object,
    saved: AccumState,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, gradient) pairs to restore; raise when they do not fit the optimizer."""
    if not saved.is_accumulating:
        if saved_grads is not None:
            raise CheckpointError(
                "the checkpoint holds open-window gradients but its state has no open window: "
                "it was edited or assembled by hand. Pass what state_dict()/capture() returned."
            )
        return []
    params = list(optimizer_params(optimizer))
    if not isinstance(saved_grads, list) or len(saved_grads) != len(params):
        count = len(saved_grads) if isinstance(saved_grads, list) else type(saved_grads).__name__
        raise CheckpointError(
            f"the checkpoint's open-window gradients ({count}) do not match the optimizer's "
            f"{len(params)} parameters: load it into the model and optimizer it was saved from "
            f"(same architecture, same parameter groups)."
        )
    pairs = []
    for index, (param, grad) in enumerate(zip(params, saved_grads, strict=True)):
        if grad is None:
            continue
        local = _local(param)
        if not isinstance(grad, torch.Tensor) or grad.shape != local.shape:
            shape = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise CheckpointError(
                f"open-window gradient {index} has shape {shape}, parameter {index} has "
                f"{tuple(local.shape)} on this rank: the checkpoint is from another model or "
                f"sharding; load it into the model it was saved from."
            )
        wide = saved.config.accum_dtype
        if grad.dtype != param.dtype and not (wide and str(grad.dtype) == f"torch.{wide}"):
            raise CheckpointError(
                f"open-window gradient {index} is {grad.dtype}, parameter {index} is "
                f"{param.dtype}: cast the model to the dtype it had when the checkpoint was "
                f"saved before loading."
            )
        pairs.append((param, grad))
    return pairs


def restore(
    data: Mapping[str, Any],
    state: AccumState,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    scaler: GradScaler | None = None,
    *,
    allow_config_change: bool = False,
    model: nn.Module | None = None,
) -> AccumState:
    """Restore a ``capture`` dict; return the state to continue from.

    ``state`` is the state this run would otherwise use (e.g. ``accumfn.init(...)``): its
    config must match the checkpoint's, and a callable schedule is taken from it. With
    ``allow_config_change=True`` a checkpoint taken at a window boundary continues under
    ``state``'s config. Everything is checked before anything changes; then the scaler
    state is loaded, the gradients are zeroed and the open window's gradients are put back.
    Load the model and optimizer state dicts too (before or after, in any order).

    In a job of several processes the ranks that train ``model`` together agree that they
    resume the same window (``_check_ranks``): every one of them must call ``restore``.
    ``model`` (as passed to ``accumulate``) names them: its data-parallel group; a model
    no wrapper reduces is checked alone. Without it, every process of the job.
    """
    if not isinstance(allow_config_change, bool):
        raise ConfigError(
            f"allow_config_change must be True or False, got {allow_config_change!r}."
        )
    groups = agreeing_groups(model)
    try:
        raw, saved = _parse(data, state)
        resumed = _resolve_config(raw, saved, state, allow_config_change)
        scaler_state = _check_scaler(data["scaler"], resumed, scaler, allow_config_change)
        pairs = _check_grads(data["partial_grads"], resumed, optimizer)
        saved_by = _saved_by(data.get("rank"))
        loss_sum = _window_loss(data.get(_LOSS_KEY), resumed)
    except Exception:
        refuse_together(state, groups)  # the other ranks learn it in the same exchange
        raise
    _check_ranks(saved_by, resumed, scaler_state, groups)
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(dict(scaler_state))
        if pairs:
            # The scale tensor is made lazily by scale(); a window restored closed goes
            # straight to unscale_, which needs it.
            scaler.scale(torch.zeros((), device=pairs[0][0].device))
    zero_grads_(optimizer)
    buffers.drop(optimizer_params(optimizer))
    if model is not None and resumed.config.accum_dtype is not None:
        # the optimizers' parameters outside the model are summed wide from the first
        # micro-step on (without the model, from the next step on)
        buffers.cover(strategy(model).model, optimizer_params(optimizer))
    for param, grad in pairs:
        if grad.dtype != param.dtype:  # an accum_dtype buffer
            buffers.put(param, grad.to(device=param.device, copy=True))
        else:
            param.grad = _as_grad_of(param, grad)
    clear_failures(model)  # every rank resumed from the same step
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    for guard in {id(g): g for g in [existing_guard(model), *guards_of(optimizers)] if g}.values():
        guard.restored(resumed)  # the gradients put back are the window's, as saved
    return restore_tally(resumed, loss_sum)


def _window_loss(saved: object, resumed: AccumState) -> float | None:
    """The saved sum of the open window's losses (nan for a checkpoint inside a window
    saved without it: the window's loss is then unknown)."""
    if saved is None:
        return math.nan if resumed.is_accumulating else None
    if isinstance(saved, bool) or not isinstance(saved, numbers.Real):
        raise CheckpointError(
            f"the checkpoint's window_loss must be a number, got {type(saved).__name__}. "
            f"Pass what state_dict()/capture() returned."
        )
    return float(saved)


def _as_grad_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    local = grad.to(device=_local(param).device, copy=True)
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        shape=param.shape,
        stride=param.stride(),
    )


def _saved_by(saved: object) -> tuple[int, int] | None:
    """The (rank, world size) that took a mid-window checkpoint, from its rank record."""
    if saved is None:
        return None
    if (
        not isinstance(saved, Mapping)
        or set(saved) != {"rank", "world_size"}
        or not all(isinstance(saved[k], int) and not isinstance(saved[k], bool) for k in saved)
    ):
        raise CheckpointError(
            f"the checkpoint's rank record is malformed: {saved!r}. Pass what "
            f"state_dict()/capture() returned."
        )
    return int(saved["rank"]), int(saved["world_size"])


def _scale_of(scaler_state: Mapping[str, Any] | None) -> int:
    return 0 if scaler_state is None else core.float_bits(float(scaler_state["scale"]))


def agreeing_groups(model: nn.Module | None) -> list[dist.ProcessGroup | None] | None:
    """The process groups whose ranks must resume together: ``model``'s data-parallel
    groups (None for a model no wrapper reduces), or the whole job without a model (None on
    one process)."""
    if model is not None:
        parallel = strategy(model)
        return list(parallel.groups) if parallel.distributed else None
    return [None] if _rank() is not None else None


def _check_ranks(
    saved_by: tuple[int, int] | None,
    resumed: AccumState,
    scaler_state: Mapping[str, Any] | None,
    groups: list[dist.ProcessGroup | None] | None,
) -> None:
    """Refuse, on every rank alike, states the ranks cannot resume together.

    The ranks of ``groups`` each send their view (step, epoch, micro-step, scale, who took
    their mid-window checkpoint) in one all-gather, boundary or not, and every rank decides
    from all of them (``core.agree_resume``): ranks resumed from different steps, a
    mid-window checkpoint of another rank or job size, or a rank whose checkpoint was
    refused raise ``CheckpointError`` on every rank. Without groups only who took a
    mid-window checkpoint is checked.
    """
    here = _rank() or {"rank": 0, "world_size": 1}
    scale = _scale_of(scaler_state)
    view = core.resume_view(resumed, rank=here["rank"], saved_by=saved_by, scale=scale)
    views = [view] if groups is None else exchange(view, groups, _LOADS)
    if groups is not None and len({v.settings for v in views}) > 1:
        # built with other settings: name them (a second exchange, on the way to the error)
        settings = gather_objects(core.settings_of(resumed.config), groups)
        core.agree_resume(views, here["world_size"], settings)
    core.agree_resume(views, here["world_size"])


def refuse_together(state: AccumState, groups: list[dist.ProcessGroup | None] | None) -> None:
    """This rank's checkpoint was refused: tell the other ranks, which raise too."""
    if groups is not None:
        rank = dist.get_rank()  # (groups: a job of several processes)
        exchange(core.resume_view(state, rank=rank, saved_by=None, refused=True), groups, _LOADS)


_LOADS = "the checkpoints each rank loads"
