"""Checkpoints: resuming at any micro-step, from files that survive a crash mid-save.

- ``_capture``: ``capture``/``restore``, the accumulation checkpoint dict (plain state,
  open-window gradients, scaler state), checked whole before anything changes.
- ``_files``: ``save_checkpoint`` (atomic: temporary file, fsync, rename) and
  ``load_checkpoint`` (``torch.load(weights_only=True)``, clear errors).
- ``_pickled``: a ``GradientAccumulator`` pickled whole, also from earlier versions.
- ``_dcp``: ``distributed_state``, the accumulator as a ``torch.distributed.checkpoint``
  Stateful.
"""

from ._capture import capture, restore
from ._dcp import DistributedState, StateHolder, distributed_state
from ._files import PathLike as PathLike
from ._files import load_checkpoint, save_checkpoint
from ._pickled import pickled as pickled
from ._pickled import unpickled as unpickled

__all__ = [
    "DistributedState",
    "StateHolder",
    "capture",
    "distributed_state",
    "load_checkpoint",
    "restore",
    "save_checkpoint",
]
