"""Tools for checking that accumulation is right on your own model.

``assert_equivalent`` trains a model both ways and names what diverged and why;
``HostSyncCounter`` counts host-device syncs (on CPU too). Hypothesis strategies live in
``accumfn.testing.strategies`` (needs ``hypothesis``).
"""

from ._batches import concat_batches
from ._equivalence import EquivalenceReport, TensorDiff, assert_equivalent, plan_windows
from ._syncs import HostSyncCounter

__all__ = [
    "EquivalenceReport",
    "HostSyncCounter",
    "TensorDiff",
    "assert_equivalent",
    "concat_batches",
    "plan_windows",
]
