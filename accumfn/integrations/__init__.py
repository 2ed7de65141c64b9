"""accumfn beside other trainers: never two accumulators on one window.

- ``_detect``: duck-typed detection of a Lightning trainer that accumulates, and
  ``AccumulationConflictError`` (no Lightning import).
- ``lightning``: ``ExactAccumulation``, Lightning's ``accumulate_grad_batches`` made exact
  (importing it imports ``lightning``).

Accelerate support will live here too.
"""

from ._detect import AccumulationConflictError, check_conflict, trainer_accumulation

__all__ = ["AccumulationConflictError", "check_conflict", "trainer_accumulation"]
