"""The window's gradients summed in a wider dtype (``accum_dtype``), held beside the model.

After each backward, a bf16/fp16 gradient is added into an fp32 buffer of its parameter
and the parameter's ``.grad`` is cleared, so the window's sum is rounded once, at the
boundary, where the buffer, rescaled for the window in the wide dtype, is handed back to
``.grad`` in the parameter's dtype (as
optax's ``accumulator_dtype``, DeepSpeed's ``gradient_accumulation_dtype`` and Megatron's
``main_grad`` do). Gradients already in the wide dtype, and sparse ones, stay in ``.grad``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["buffered", "drop", "dtype_named", "put", "restore_", "stash_", "take"]

_BUFFERS: Any = WeakIdKeyDictionary()  # untyped in torch
"""parameter -> the sum of its gradients in this window, in the accumulation dtype."""


def dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def stash_(params: Iterable[torch.Tensor], dtype: torch.dtype) -> None:
    """Add each narrower dense gradient into its parameter's buffer; clear ``.grad``."""
    for param in params:
        grad = param.grad
        if grad is None or grad.dtype == dtype or grad.is_sparse:
            continue
        buffer = _BUFFERS.get(param)
        if buffer is None:
            _BUFFERS[param] = grad.to(dtype)
        else:
            buffer.add_(grad)
        param.grad = None


def buffered(param: torch.Tensor) -> torch.Tensor | None:
    """The parameter's open buffer, if it has one."""
    found = _BUFFERS.get(param)
    return found if isinstance(found, torch.Tensor) else None


def take(param: torch.Tensor) -> torch.Tensor | None:
    """Remove and return the parameter's buffer."""
    found = _BUFFERS.pop(param, None)
    return found if isinstance(found, torch.Tensor) else None


def put(param: torch.Tensor, buffer: torch.Tensor) -> None:
    _BUFFERS[param] = buffer


def restore_(params: Iterable[torch.Tensor], factor: float) -> None:
    """Hand each buffer back to ``.grad``, multiplied by the window's rescale ``factor`` in
    the wide dtype and then rounded once to the parameter's dtype (a window's sum that an
    fp16 gradient cannot hold is divided by its item count before it is rounded).

    Parameters without a buffer (already in the wide dtype, or sparse) get the factor too,
    so that the step applies none: ``core.rescale_in_step`` is False with ``accum_dtype``.
    """
    for param in params:
        buffer = take(param)
        if buffer is not None:
            param.grad = buffer.mul_(factor).to(param.dtype)
        elif param.grad is not None and factor != 1.0:
            param.grad.mul_(factor)


def drop(params: Iterable[torch.Tensor]) -> None:
    """Forget the buffers of ``params`` (a discarded window)."""
    for param in params:
        _BUFFERS.pop(param, None)
