"""The model's data-parallel strategy, resolved once per model.

- ``_strategy``: ``strategy(model)`` finds plain, DDP, FSDP2/HSDP (behind ``torch.compile``)
  and the process groups they reduce over; the resulting ``DataParallel`` sets sync,
  exchanges the per-window header every rank agrees on (which window, how it closes), and
  runs the bucketed fallback reduction; the count of window steps that raised here, which
  the header carries so a step failed on some ranks stops every rank.
- ``_refused``: the wrappers accumfn cannot steer (a live DDP over a plain model's
  parameters, FSDP1), refused before they make a window wrong.
"""

from ._refused import check_steerable, fsdp_class
from ._strategy import (
    BUCKET_BYTES,
    DataParallel,
    all_reduce,
    clear_failures,
    device_for,
    exchange,
    gather_objects,
    note_failure,
    prepare,
    set_forward_sync,
    strategy,
)

__all__ = [
    "BUCKET_BYTES",
    "DataParallel",
    "all_reduce",
    "check_steerable",
    "clear_failures",
    "device_for",
    "exchange",
    "fsdp_class",
    "gather_objects",
    "note_failure",
    "prepare",
    "set_forward_sync",
    "strategy",
]
