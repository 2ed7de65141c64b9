"""Gradient arithmetic: what every torch layer does to a parameter list's gradients.

The lowest torch layer, below the data-parallel strategy, the window's step and the
checkpoint, which all work on the same gradients:

- ``_arithmetic``: parameters of an optimizer, norm, clip, rescale and zero over dense and
  sparse gradients (fp16/bf16-safe), and the ``GradScaler`` check.
- ``buffers``: the window's gradients summed in a wider dtype (``accum_dtype``), held
  beside the model.
"""

from . import buffers
from ._arithmetic import (
    WindowGrads,
    check_scaler,
    clip_grads_by_value_,
    grads_of,
    is_dtensor,
    optimizer_params,
    scale_grads_,
    zero_grads_,
)

__all__ = [
    "WindowGrads",
    "buffers",
    "check_scaler",
    "clip_grads_by_value_",
    "grads_of",
    "is_dtensor",
    "optimizer_params",
    "scale_grads_",
    "zero_grads_",
]
