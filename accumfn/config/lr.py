"""Learning-rate scaling for a larger effective batch: advice, never applied by itself.

A learning rate tuned at one batch size is often scaled when the effective batch grows:

- ``"linear"``: multiply by ``effective / base`` (Goyal et al. 2017, "Accurate, Large
  Minibatch SGD: Training ImageNet in 1 Hour", arXiv:1706.02677; for SGD, with warmup).
- ``"sqrt"``: multiply by ``sqrt(effective / base)``, often used for Adam-type optimizers
  (Hoffer et al. 2017, arXiv:1705.08741; Malladi et al. 2022, arXiv:2205.10287).
- ``"none"``: keep it.

Neither rule holds for every model; treat the result as a starting point to tune from.
"""

from __future__ import annotations

import math
from typing import Final, Literal, TypeAlias

from ..core import check_choice, check_count, check_positive_float

__all__ = ["LR_RULES", "LRRule", "scale_lr"]

LRRule: TypeAlias = Literal["none", "linear", "sqrt"]
LR_RULES: Final = ("none", "linear", "sqrt")


def lr_factor(base_batch_size: int, effective_batch_size: int, rule: str) -> float:
    """The factor ``rule`` multiplies the learning rate by (arguments already checked)."""
    ratio = effective_batch_size / base_batch_size
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def scale_lr(
    base_lr: float, base_batch_size: int, effective_batch_size: int, rule: LRRule = "linear"
) -> float:
    """``base_lr``, tuned at ``base_batch_size``, scaled for ``effective_batch_size``.

    ``scale_lr(3e-4, 8, 32)`` is ``1.2e-3`` (linear); with ``rule="sqrt"`` it is ``6e-4``.
    Batch sizes count samples behind one optimizer step on all devices together.
    """
    lr = check_positive_float("base_lr", base_lr, allow_none=False)
    assert lr is not None  # allow_none=False
    base = check_count("base_batch_size", base_batch_size)
    effective = check_count("effective_batch_size", effective_batch_size)
    chosen = check_choice("rule", rule, LR_RULES)
    return lr * lr_factor(base, effective, chosen)
