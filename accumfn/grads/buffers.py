"""The window's gradients summed in a wider dtype (``accum_dtype``), held beside the model.

After each backward, a bf16/fp16 gradient is added into an fp32 buffer of its parameter
and the parameter's ``.grad`` is cleared, so the window's sum is rounded once, at the
boundary, where the buffer, rescaled for the window in the wide dtype, is handed back to
``.grad`` in the parameter's dtype (as
optax's ``accumulator_dtype``, DeepSpeed's ``gradient_accumulation_dtype`` and Megatron's
``main_grad`` do). Gradients already in the wide dtype, and sparse ones, stay in ``.grad``.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "buffered",
    "cover",
    "drop",
    "dtype_named",
    "put",
    "restore_",
    "stash_",
    "stash_params",
    "take",
]

_BUFFERS: Any = WeakIdKeyDictionary()  # untyped in torch
"""parameter -> the sum of its gradients in this window, in the accumulation dtype."""


def dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def stash_(params: Iterable[torch.Tensor], dtype: torch.dtype, keep: Collection[int] = ()) -> None:
    """Add each narrower dense gradient into its parameter's buffer; clear ``.grad``.

    The parameters whose ids are in ``keep`` keep their ``.grad``, zeroed, so that the
    guard of the open window can tell a loop's ``zero_grad()`` from accumfn's own work.
    """
    for param in params:
        grad = param.grad
        if grad is None or grad.dtype == dtype or grad.is_sparse:
            continue
        buffer = _BUFFERS.get(param)
        if buffer is None:
            _BUFFERS[param] = grad.to(dtype)
        else:
            buffer.add_(grad)
        if keep and id(param) in keep:
            grad.zero_()
        else:
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

    Parameters without a buffer (already in the wide dtype, sparse, or outside the model
    in the first window) get the factor too, a narrow gradient multiplied in fp32 and
    rounded once, so that the step applies none: ``core.rescale_in_step`` is False with
    ``accum_dtype``.
    """
    for param in params:
        buffer = take(param)
        if buffer is not None:
            if param.grad is not None:  # micro-steps not stashed (a buffer put back by a
                buffer.add_(param.grad)  # checkpoint, before a step made it known)
            param.grad = buffer.mul_(factor).to(param.dtype)
            continue
        grad = param.grad
        if grad is None or factor == 1.0:
            continue
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad.copy_(grad.to(torch.float32).mul_(factor))
        else:
            grad.mul_(factor)


_COVERED: Any = WeakKeyDictionary()  # untyped in torch
"""model -> the window's parameters outside it (an optimizer's, learnt at a step)."""


def cover(model: nn.Module, window_params: Iterable[torch.Tensor]) -> None:
    """Remember which of a window's parameters (its optimizers') lie outside ``model``, so
    that ``stash_params`` sums their gradients in the wide dtype too."""
    inside = {id(param) for param in model.parameters()}
    outside = tuple(param for param in window_params if id(param) not in inside)
    if outside or model in _COVERED:
        _COVERED[model] = outside


def stash_params(model: nn.Module) -> Iterable[torch.Tensor]:
    """The parameters whose gradients a micro-step adds into wide buffers: the model's, and
    the window's parameters outside it that a step made known (``cover``)."""
    outside = _COVERED.get(model)
    if not outside:
        return model.parameters()
    return itertools.chain(model.parameters(), outside)


def drop(params: Iterable[torch.Tensor]) -> None:
    """Forget the buffers of ``params`` (a discarded window)."""
    for param in params:
        _BUFFERS.pop(param, None)
