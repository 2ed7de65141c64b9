"""What in a model or its data makes accumulation differ from one large batch."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["find_culprits"]


def _module_culprits(model: nn.Module) -> list[str]:
    found: list[str] = []
    for name, module in model.named_modules():
        label = f"{name or '<model>'!r} ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            found.append(
                f"BatchNorm {label} in train mode: each micro-batch is normalized with its own "
                f"batch statistics and running stats are updated once per micro-batch, so "
                f"micro-batches cannot match one large batch. Use GroupNorm/LayerNorm, or "
                f"freeze it (module.eval()) while training."
            )
        dropout = (
            module.p
            if isinstance(module, nn.modules.dropout._DropoutNd)
            else module.dropout
            if isinstance(module, nn.MultiheadAttention)
            else 0.0
        )
        if module.training and dropout > 0:
            found.append(
                f"Dropout {label} with p={dropout} in train mode: masks come from the RNG and "
                f"differ between the two runs. Check equivalence with p=0 or model.eval(); "
                f"training with dropout is still fine."
            )
    return found


def _ragged_culprits(sizes: Sequence[Sequence[int | None]]) -> list[str]:
    for index, window in enumerate(sizes):
        known = [size for size in window if size is not None]
        if len(set(known)) > 1:
            return [
                f"mean-reduced loss over micro-batches of different sizes (window {index}: "
                f"{list(window)}): the mean of per-micro-batch means weights small micro-batches "
                f"more than one large batch does. Return a sum-reduced loss and pass "
                f"num_items=... (the items each micro-batch's loss sums over)."
            ]
    return []


def find_culprits(
    model: nn.Module, window_sizes: Sequence[Sequence[int | None]], *, item_mode: bool
) -> list[str]:
    """Known causes of divergence present in ``model`` and the micro-batch sizes."""
    found = _module_culprits(model)
    if not item_mode:
        found += _ragged_culprits(window_sizes)
    return found
