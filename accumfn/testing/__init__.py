"""Tools for checking that accumulation is right on your own model.

``assert_equivalent`` trains a model both ways and names what diverged and why, on one
process or with the accumulated side on gloo ranks (DDP, FSDP2, your own wrapper);
``HostSyncCounter`` counts host-device syncs (on CPU too). Hypothesis strategies live in
``accumfn.testing.strategies`` (needs ``hypothesis``).
"""

from ._batches import concat_batches
from ._equivalence import EquivalenceReport, TensorDiff, assert_equivalent, plan_windows
from ._spawn import RankFailedError
from ._syncs import HostSyncCounter

__all__ = [
    "EquivalenceReport",
    "HostSyncCounter",
    "RankFailedError",
    "TensorDiff",
    "assert_equivalent",
    "concat_batches",
    "plan_windows",
]
