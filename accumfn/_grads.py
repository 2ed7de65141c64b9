"""Gradient arithmetic over parameter lists (dense and sparse), and the GradScaler check."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.amp import GradScaler

from .errors import ConfigError

__all__ = [
    "check_scaler",
    "clip_grads_",
    "grad_norm",
    "optimizer_params",
    "params_with_grads",
    "scale_grads_",
    "zero_grads_",
]

_EXACT_DTYPES = (torch.float32, torch.float64)


def check_scaler(scaler: object) -> None:
    """Raise ConfigError unless ``scaler`` is a ``torch.amp.GradScaler`` or None."""
    if scaler is not None and not isinstance(scaler, GradScaler):
        raise ConfigError(
            f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}."
        )


def optimizer_params(
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
) -> Iterator[torch.Tensor]:
    """Every parameter the optimizer(s) update, in optimizer then param-group order."""
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else (optimizer,)
    for one in optimizers:
        for group in one.param_groups:
            yield from group["params"]


def zero_grads_(optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]) -> None:
    """``zero_grad(set_to_none=True)`` on each optimizer."""
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else (optimizer,)
    for one in optimizers:
        one.zero_grad(set_to_none=True)


def params_with_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters among ``params`` that hold a gradient."""
    return [p for p in params if p.grad is not None]


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def scale_grads_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply every existing gradient by ``factor`` in place (no host-device sync).

    fp32/fp64 dense gradients in one foreach call; fp16/bf16 ones are multiplied in fp32 and
    rounded once, so a factor beyond their range (65504 in fp16) or below their precision
    never turns them into inf or loses digits; sparse ones one by one.
    """
    grads = _grads(params)
    if not grads or factor == 1.0:
        return
    exact = [g for g in grads if g.dtype in _EXACT_DTYPES and not g.is_sparse]
    if exact:
        torch._foreach_mul_(exact, factor)
    for grad in grads:
        if grad.dtype in _EXACT_DTYPES:
            if grad.is_sparse:
                grad.mul_(factor)
        else:
            grad.copy_(grad.to(torch.float32).mul_(factor))


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 2-norm of all gradients of ``params`` as one vector, on the device (None: no grads).

    Dense gradients as ``torch.nn.utils.get_total_norm``; a sparse gradient by the values of
    its coalesced form (an accumulated sparse gradient repeats indices until coalesced).
    """
    grads = _grads(params)
    if not grads:
        return None
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g for g in grads if g.is_sparse]
    if not sparse:
        norm: torch.Tensor = torch.nn.utils.get_total_norm(dense)
        return norm
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.coalesce().values()).float().to(device) for g in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm(dense).float().to(device))
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms))
    return total


def clip_grads_(params: Sequence[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients so their total norm ``norm`` is at most ``max_norm``, as
    ``torch.nn.utils.clip_grads_with_norm_`` does (which takes no sparse gradient)."""
    with_grad = params_with_grads(params)
    dense = [p for p in with_grad if p.grad is not None and not p.grad.is_sparse]
    if dense:
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, norm)
    sparse = [p.grad for p in with_grad if p.grad is not None and p.grad.is_sparse]
    if sparse:
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grad in sparse:
            grad.mul_(coefficient.to(device=grad.device, dtype=grad.dtype))


def clip_grads_by_value_(params: Sequence[torch.Tensor], clip_value: float) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` (sparse: its values)."""
    grads = _grads(params)
    dense = [g for g in grads if not g.is_sparse]
    if dense:
        torch._foreach_clamp_min_(dense, -clip_value)
        torch._foreach_clamp_max_(dense, clip_value)
    for param in params:
        grad = param.grad
        if grad is not None and grad.is_sparse:
            param.grad = grad = grad.coalesce()
            grad.values().clamp_(-clip_value, clip_value)
