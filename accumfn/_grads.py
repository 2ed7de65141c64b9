"""Gradient helpers over parameter lists, and the GradScaler argument check."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.amp import GradScaler

from .errors import ConfigError

__all__ = ["check_scaler", "optimizer_params", "scale_grads_", "with_grads"]


def check_scaler(scaler: object) -> None:
    """Raise ConfigError unless ``scaler`` is a ``torch.amp.GradScaler`` or None."""
    if scaler is not None and not isinstance(scaler, GradScaler):
        raise ConfigError(
            f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}."
        )


def optimizer_params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every parameter the optimizer updates, in param-group order."""
    for group in optimizer.param_groups:
        yield from group["params"]


def with_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients that exist among ``params``."""
    return [p.grad for p in params if p.grad is not None]


def scale_grads_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply every existing gradient by ``factor`` in place (no host-device sync)."""
    grads = with_grads(params)
    if not grads or factor == 1.0:
        return
    torch._foreach_mul_(grads, factor)
