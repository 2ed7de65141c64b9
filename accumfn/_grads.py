"""Gradient arithmetic over parameter lists (dense and sparse), and the GradScaler check."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import cast

import torch
from torch.amp import GradScaler
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from .errors import ConfigError

__all__ = [
    "check_scaler",
    "clip_",
    "clip_grads_",
    "grad_norm",
    "grads_of",
    "norm_of",
    "optimizer_params",
    "params_with_grads",
    "scale_",
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


def grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``params`` that exist (one pass, one read of each ``.grad``)."""
    return [grad for param in params if (grad := param.grad) is not None]


_grads = grads_of


def scale_grads_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply every existing gradient of ``params`` by ``factor`` in place (see ``scale_``)."""
    if factor != 1.0:
        scale_(grads_of(params), factor)


def scale_(grads: Sequence[torch.Tensor], factor: float) -> None:
    """Multiply ``grads`` by ``factor`` in place (no host-device sync; nothing when it is 1).

    fp32/fp64 gradients (dense or sparse) in one foreach call per device and dtype;
    fp16/bf16 ones are multiplied in fp32 and rounded once, so a factor beyond their range
    (65504 in fp16) or below their precision never turns them into inf or loses digits.
    """
    if factor == 1.0 or not grads:
        return
    for (_, dtype), group in _by_device_and_dtype(grads).items():
        if dtype in _EXACT_DTYPES:
            torch._foreach_mul_(group, factor)
        else:
            for grad in group:
                grad.copy_(grad.to(torch.float32).mul_(factor))


def _by_device_and_dtype(
    tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """``tensors`` grouped by device and dtype, in one C++ pass (as torch's clipping does)."""
    grouped = _group_tensors_by_device_and_dtype([cast(list[torch.Tensor | None], list(tensors))])
    return {key: cast(list[torch.Tensor], lists[0]) for key, (lists, _) in grouped.items()}


def _sparse(grads: Sequence[torch.Tensor]) -> bool:
    return any([grad.is_sparse for grad in grads])


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 2-norm of all gradients of ``params`` as one vector (see ``norm_of``)."""
    return norm_of(grads_of(params))


def norm_of(grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 2-norm of ``grads`` as one vector, on the device (None: no gradients).

    Dense gradients by ``torch.nn.utils.get_total_norm``; a sparse gradient by the values of
    its coalesced form (an accumulated sparse gradient repeats indices until coalesced).
    """
    if not grads:
        return None
    if not _sparse(grads):
        return _total_norm(grads)
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g for g in grads if g.is_sparse]
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.coalesce().values()).float().to(device) for g in sparse]
    if dense:
        norms.append(_total_norm(dense).float().to(device))
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms))
    return total


def _total_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(grads)``, the same operations in the same order,
    without moving each tensor's norm to the first device when all are on it already."""
    first_device = grads[0].device
    grouped = _by_device_and_dtype(grads)
    norms: list[torch.Tensor] = []
    for (device, _), group in grouped.items():
        if _has_foreach_support(group, device):
            norms.extend(torch._foreach_norm(group, 2.0))
        else:
            norms.extend([torch.linalg.vector_norm(g, 2.0) for g in group])
    if any(device != first_device for device, _ in grouped):
        norms = [norm.to(first_device) for norm in norms]
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    return total


def clip_grads_(params: Sequence[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients of ``params`` so their total norm is at most ``max_norm``."""
    clip_(grads_of(params), max_norm, norm)


def clip_(grads: Sequence[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale ``grads`` so their total norm ``norm`` is at most ``max_norm``, as
    ``torch.nn.utils.clip_grads_with_norm_`` does (which takes parameters, and no sparse
    gradient): the same coefficient, multiplied in per device and dtype."""
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    sparse = _sparse(grads)
    dense = [g for g in grads if not g.is_sparse] if sparse else list(grads)
    for (device, _), group in _by_device_and_dtype(dense).items():
        on_device = coefficient.to(device)
        if _has_foreach_support(group, device):
            torch._foreach_mul_(group, on_device)
        else:
            for grad in group:
                grad.mul_(on_device)
    if sparse:
        for grad in grads:
            if grad.is_sparse:
                grad.mul_(coefficient.to(device=grad.device, dtype=grad.dtype))
