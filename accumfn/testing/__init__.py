"""Tools for checking that accumulation is right on your own model.

``assert_equivalent`` trains a model both ways and names what diverged and why.
Hypothesis strategies live in ``accumfn.testing.strategies`` (needs ``hypothesis``).
"""

from ._batches import concat_batches
from ._equivalence import EquivalenceReport, TensorDiff, assert_equivalent, plan_windows

__all__ = ["EquivalenceReport", "TensorDiff", "assert_equivalent", "concat_batches", "plan_windows"]
