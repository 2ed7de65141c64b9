"""Batches as users write them: tensors, or tuples, lists and dicts of tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["batch_size", "concat_batches"]


def concat_batches(batches: Sequence[Any]) -> Any:
    """Join micro-batches along dim 0 into the large batch they stand for.

    Tensors are concatenated; tuples, lists and dicts are joined element by element.
    """
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, Mapping):
        return {key: concat_batches([b[key] for b in batches]) for key in first}
    if isinstance(first, tuple | list):
        joined = [concat_batches([b[i] for b in batches]) for i in range(len(first))]
        return type(first)(joined) if isinstance(first, list) else tuple(joined)
    raise ConfigError(
        f"cannot join micro-batches of type {type(first).__name__}: batches must be tensors or "
        f"tuples/lists/dicts of tensors, or pass combine=... to assert_equivalent."
    )


def batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in ``batch``; None when it holds none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, tuple | list):
        values = list(batch)
    else:
        return None
    for value in values:
        size = batch_size(value)
        if size is not None:
            return size
    return None
