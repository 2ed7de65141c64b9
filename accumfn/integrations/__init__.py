"""accumfn beside other trainers: never two accumulators on one window.

- ``_detect``: duck-typed detection of a Lightning trainer that accumulates, and
  ``AccumulationConflictError`` (no Lightning import).
- ``lightning``: ``ExactAccumulation``, Lightning's ``accumulate_grad_batches`` made exact
  (importing it imports ``lightning``).

Accelerate's, DeepSpeed's and Fabric's objects are recognised where accumfn first meets
them, in ``step._foreign`` (the conflict error lives in ``accumfn.errors``).
"""

from ._detect import AccumulationConflictError, check_conflict, trainer_accumulation

__all__ = ["AccumulationConflictError", "check_conflict", "trainer_accumulation"]
