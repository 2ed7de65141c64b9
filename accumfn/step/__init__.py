"""The torch shell of one window: it carries out what the core decides.

- ``_accumulate``: ``accumulate`` scales the loss, runs backward and sets the strategy's
  sync; ``prepare_forward``, ``micro_step_context``, ``flush``, ``check_loss``.
- ``_apply``: a closed window's step (``apply_step``, ``step_window``): unscale, rescale,
  clip, skip, optimizer, scheduler; and ``reset_epoch``.
- ``_window``: what a window's step covers (its parameter set) and the checks made on it
  before anything changes.
- ``_tally``: what a window keeps on the device beside the pure state (item counts given
  as tensors, the sum of its losses), read only at its boundary.
- ``_guard``: nothing but accumfn touches an open window: a loop's leftover ``zero_grad``
  or ``step``, optimizers stepped inside backward, a window never applied.
- ``_foreign``: other trainers' objects (Accelerate, DeepSpeed, Lightning Fabric) refused
  before they make a window wrong, or driven where that is exact.

``__all__`` is the functional API (``accumfn`` re-exports it); the other names serve
``GradientAccumulator``.
"""

from ._accumulate import accumulate, check_loss, flush, micro_step_context, prepare_forward
from ._apply import StepReport, apply_step, reset_epoch, step_window
from ._apply import check_hooks as check_hooks
from ._apply import check_model as check_model
from ._apply import check_settings as check_settings
from ._apply import prepare_step as prepare_step
from ._apply import run_step as run_step
from ._foreign import check_foreign_optimizer as check_foreign_optimizer
from ._guard import all_guards as all_guards
from ._guard import continue_guard as continue_guard
from ._guard import existing_guard as existing_guard
from ._guard import guard_for as guard_for
from ._guard import guards_of as guards_of
from ._guard import report_dropped as report_dropped
from ._tally import attach_beside as attach_beside
from ._tally import carry as carry
from ._tally import closed_loss as closed_loss
from ._tally import restore_tally as restore_tally
from ._tally import settle as settle
from ._tally import tally_beside as tally_beside
from ._window import LRScheduler, Optimizers, Schedulers
from ._window import as_optimizers as as_optimizers
from ._window import as_schedulers as as_schedulers
from ._window import check_fp16_with_scaler as check_fp16_with_scaler
from ._window import check_steppable as check_steppable
from ._window import claim_scaler as claim_scaler
from ._window import warn_untracked as warn_untracked
from ._window import window_params as window_params

__all__ = [
    "LRScheduler",
    "Optimizers",
    "Schedulers",
    "StepReport",
    "accumulate",
    "apply_step",
    "check_loss",
    "flush",
    "micro_step_context",
    "prepare_forward",
    "reset_epoch",
    "step_window",
]
