"""Gradient arithmetic over parameter lists (dense and sparse), and the GradScaler check."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import cast

import torch
from torch.amp import GradScaler
from torch.utils._foreach_utils import _has_foreach_support

from ..errors import ConfigError

__all__ = [
    "WindowGrads",
    "check_scaler",
    "grads_of",
    "is_dtensor",
    "optimizer_params",
    "scale_grads_",
    "zero_grads_",
]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter or gradient shard), without
    importing ``torch.distributed.tensor``."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


_ROUNDED_DTYPES = (torch.float16, torch.bfloat16)
"""Rescaled in fp32 and rounded once; every other dtype (fp32, fp64, complex) in place."""


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


def grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``params`` that exist (one pass, one read of each ``.grad``)."""
    return [grad for param in params if (grad := param.grad) is not None]


def scale_grads_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply every existing gradient of ``params`` by ``factor`` in place (see
    ``WindowGrads.scale_``)."""
    if factor != 1.0:
        WindowGrads(grads_of(params)).scale_(factor)


def _by_device_and_dtype(
    tensors: list[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """``tensors`` grouped by device and dtype in one C++ pass, as torch's clipping groups
    them (its Python wrapper only adds a ``no_grad`` context, which costs microseconds)."""
    grouped = torch._C._group_tensors_by_device_and_dtype(
        [cast(list[torch.Tensor | None], tensors)], False
    )
    return {key: cast(list[torch.Tensor], lists[0]) for key, (lists, _) in grouped.items()}


class _Group:
    __slots__ = ("device", "dtype", "foreach", "grads")

    def __init__(self, device: torch.device, dtype: torch.dtype, grads: list[torch.Tensor]):
        self.device = device
        self.dtype = dtype
        self.grads = grads
        self.foreach = _has_foreach_support(grads, device)


class WindowGrads:
    """A window's gradients (dense and sparse), grouped once by device and dtype for the
    foreach calls that rescale, measure and clip them: no Python loop over the gradients
    but the one that reads them, and one that looks for sparse ones."""

    __slots__ = ("_groups", "grads", "sparse")

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self.grads = grads
        self.sparse = [g for g in grads if g.is_sparse] if any([g.is_sparse for g in grads]) else []
        self._groups: list[_Group] | None = None

    def groups(self) -> list[_Group]:
        """The dense gradients by device and dtype, in torch's order."""
        if self._groups is None:
            dense = [g for g in self.grads if not g.is_sparse] if self.sparse else self.grads
            grouped = _by_device_and_dtype(dense) if dense else {}  # (sparse only: no group)
            self._groups = [_Group(d, t, gs) for (d, t), gs in grouped.items()]
        return self._groups

    def scale_(self, factor: float) -> None:
        """Multiply the gradients by ``factor`` in place (no host-device sync; nothing at 1).

        Dense gradients in one foreach call per device and dtype (fp32, fp64, complex);
        fp16/bf16 ones are multiplied in fp32 and rounded once, so a factor beyond their
        range (65504 in fp16) or below their precision never turns them into inf or loses
        digits; sparse ones one by one.
        """
        if factor == 1.0 or not self.grads:
            return
        for group in self.groups():
            if group.dtype not in _ROUNDED_DTYPES:
                torch._foreach_mul_(group.grads, factor)
            else:
                for grad in group.grads:
                    grad.copy_(grad.to(torch.float32).mul_(factor))
        for grad in self.sparse:
            if grad.dtype not in _ROUNDED_DTYPES:
                grad.mul_(factor)
            else:
                grad.copy_(grad.to(torch.float32).mul_(factor))

    def norm(self) -> torch.Tensor | None:
        """The 2-norm of all gradients as one vector, on the device (None: no gradients).

        Dense gradients as ``torch.nn.utils.get_total_norm`` computes it (the same
        operations in the same order); a sparse gradient by the values of its coalesced
        form (an accumulated sparse gradient repeats indices until coalesced).
        """
        if not self.grads:
            return None
        if not self.sparse:
            return self._dense_norm()
        device = self.grads[0].device
        norms = [
            torch.linalg.vector_norm(g.coalesce().values()).float().to(device) for g in self.sparse
        ]
        if self.groups():
            norms.append(self._dense_norm().float().to(device))
        total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms))
        return total

    def _dense_norm(self) -> torch.Tensor:
        groups = self.groups()
        norms: list[torch.Tensor] = []
        for group in groups:
            if group.foreach:
                norms.extend(torch._foreach_norm(group.grads, 2.0))
            else:
                norms.extend([torch.linalg.vector_norm(g, 2.0) for g in group.grads])
        if any(group.device != groups[0].device for group in groups):
            # torch moves each norm to the device of the first gradient
            first = next(g for g in self.grads if not g.is_sparse).device
            norms = [norm.to(first) for norm in norms]
        total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        return total

    def clip_(self, max_norm: float, norm: torch.Tensor) -> None:
        """Scale the gradients so their total norm ``norm`` is at most ``max_norm``, as
        ``torch.nn.utils.clip_grads_with_norm_`` does (which takes no sparse gradient): the
        same coefficient, multiplied in per device and dtype."""
        # max_norm / (norm + 1e-6), computed as torch computes it (Tensor.__rtruediv__),
        # without its Python wrapper
        coefficient = torch.clamp((norm + 1e-6).reciprocal() * max_norm, max=1.0)
        for group in self.groups():
            on_device = coefficient.to(group.device)
            if group.foreach:
                torch._foreach_mul_(group.grads, on_device)
            else:
                for grad in group.grads:
                    grad.mul_(on_device)
        for grad in self.sparse:
            grad.mul_(coefficient.to(device=grad.device, dtype=grad.dtype))


def clip_grads_by_value_(params: Sequence[torch.Tensor], clip_value: float) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` (sparse: its values)."""
    grads = grads_of(params)
    dense = [g for g in grads if not g.is_sparse]
    if dense:
        torch._foreach_clamp_min_(dense, -clip_value)
        torch._foreach_clamp_max_(dense, clip_value)
    for param in params:
        grad = param.grad
        if grad is not None and grad.is_sparse:
            param.grad = grad = grad.coalesce()
            grad.values().clamp_(-clip_value, clip_value)
