"""The accumulator's checkpoint dict: plain state, open-window gradients, scaler state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch.amp import GradScaler

from ._grads import optimizer_params
from .core import AccumState, ByStep
from .errors import CheckpointError, StateFormatError

__all__ = ["accumulator_state", "load_accumulator_state"]

_KEYS = {"accumfn", "partial_grads", "scaler"}


def accumulator_state(
    state: AccumState, optimizer: torch.optim.Optimizer, scaler: GradScaler | None
) -> dict[str, Any]:
    grads: list[torch.Tensor | None] | None = None
    if state.is_accumulating:
        grads = [
            None if p.grad is None else p.grad.detach().clone() for p in optimizer_params(optimizer)
        ]
    return {
        "accumfn": state.to_dict(),
        "partial_grads": grads,
        "scaler": None if scaler is None else scaler.state_dict(),
    }


def _describe(state: AccumState) -> str:
    config = state.config
    return (
        f"schedule={config.schedule.to_dict()}, max_grad_norm={config.max_grad_norm}, "
        f"batch_size={config.batch_size}, skip_nonfinite={config.skip_nonfinite}, "
        f"sync_every_micro_step={config.sync_every_micro_step}"
    )


def _same_config(saved: AccumState, current: AccumState) -> bool:
    if isinstance(current.config.schedule, ByStep):
        return attrs.evolve(saved.config, schedule=current.config.schedule) == current.config
    return saved.config == current.config


def _checked_grads(
    saved: object, optimizer: torch.optim.Optimizer
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    params = list(optimizer_params(optimizer))
    if not isinstance(saved, list) or len(saved) != len(params):
        count = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise CheckpointError(
            f"the checkpoint's open-window gradients ({count}) do not match the optimizer's "
            f"{len(params)} parameters: load it into the same model and optimizer it came from."
        )
    pairs = []
    for index, (param, grad) in enumerate(zip(params, saved, strict=True)):
        if grad is not None and (not isinstance(grad, torch.Tensor) or grad.shape != param.shape):
            shape = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise CheckpointError(
                f"open-window gradient {index} has shape {shape}, parameter {index} has "
                f"{tuple(param.shape)}: the checkpoint is from another model."
            )
        pairs.append((param, grad))
    return pairs


def load_accumulator_state(
    data: Mapping[str, Any],
    current: AccumState,
    optimizer: torch.optim.Optimizer,
    scaler: GradScaler | None,
    *,
    allow_config_change: bool,
) -> AccumState:
    """Validate ``data`` whole, then restore grads and scaler; return the state to use."""
    if not isinstance(data, Mapping) or set(data) != _KEYS:
        got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(
            f"not an accumulator checkpoint: expected keys {sorted(_KEYS)}, got {got}. Pass "
            f"what GradientAccumulator.state_dict() returned."
        )
    schedule = current.config.schedule
    try:
        saved = AccumState.from_dict(
            data["accumfn"], schedule=schedule.fn if isinstance(schedule, ByStep) else None
        )
    except StateFormatError as exc:
        raise CheckpointError(f"the accumulator checkpoint is unusable: {exc}") from exc
    state = saved
    if not _same_config(saved, current):
        if not allow_config_change:
            raise CheckpointError(
                f"the checkpoint was saved with {_describe(saved)}, this accumulator has "
                f"{_describe(current)}. Build the accumulator with the checkpoint's settings, "
                f"or pass allow_config_change=True to continue under the new ones from a "
                f"checkpoint taken at a window boundary."
            )
        if saved.is_accumulating or saved.closed:
            raise CheckpointError(
                f"the checkpoint was taken inside a window ({saved.micro_step} of "
                f"{saved.window} micro-steps), so its gradients belong to the old config; "
                f"allow_config_change needs a checkpoint taken at a window boundary."
            )
        state = attrs.evolve(
            saved,
            config=current.config,
            window=current.config.schedule.window(saved.epoch, saved.effective_step),
        )
    pairs = None
    if state.is_accumulating:
        if data["partial_grads"] is None:
            raise CheckpointError("the checkpoint is inside a window but holds no gradients.")
        pairs = _checked_grads(data["partial_grads"], optimizer)
    scaler_state = data["scaler"]
    if scaler is not None and scaler_state is None:
        raise CheckpointError(
            "this accumulator has a GradScaler but the checkpoint holds no scaler state: it "
            "was saved without one."
        )
    if scaler is not None:
        scaler.load_state_dict(scaler_state)
    optimizer.zero_grad(set_to_none=True)
    for param, grad in pairs or []:
        if grad is not None:
            param.grad = grad.to(device=param.device, dtype=param.dtype).clone()
    return state
