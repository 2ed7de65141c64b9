"""Host-device syncs per micro-step of each loop, split into non-boundary and boundary steps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from accumfn.testing import HostSyncCounter

from .loops import MissingPackage, StepLoop, make_loop
from .workloads import WINDOW, Workload

__all__ = ["count_syncs"]


def _count(loop: StepLoop, workload: Workload, windows: int) -> dict[str, Any]:
    batches = workload.batches((windows + 1) * WINDOW)
    loop(batches[:WINDOW])  # one window first, so the optimizer state exists
    per_step: list[int] = []
    at_boundary: Counter[str] = Counter()
    for index, batch in enumerate(batches[WINDOW:]):
        counter = HostSyncCounter()
        counter.exclude_optimizer_steps(loop.optimizer)
        with counter:
            loop.step(index, batch, index == windows * WINDOW - 1)
        per_step.append(len(counter.calls))
        if (index + 1) % WINDOW == 0:
            at_boundary.update(counter.calls)
    non_boundary = [n for i, n in enumerate(per_step) if (i + 1) % WINDOW]
    boundary = [n for i, n in enumerate(per_step) if (i + 1) % WINDOW == 0]
    return {
        "non_boundary_max": max(non_boundary),
        "non_boundary_per_step": sum(non_boundary) / len(non_boundary),
        "boundary_per_window": sum(boundary) / len(boundary),
        "per_micro_step": sum(per_step) / len(per_step),
        "boundary_calls": {name: n // len(boundary) for name, n in sorted(at_boundary.items())},
    }


def count_syncs(workload: Workload, names: Sequence[str], *, windows: int = 2) -> dict[str, Any]:
    """Syncs per micro-step for each loop over ``windows`` windows after a warm-up window."""
    result: dict[str, Any] = {}
    for name in names:
        try:
            loop = make_loop(name, workload)
        except MissingPackage as error:
            result[name] = {"not_available": str(error)}
            continue
        if not isinstance(loop, StepLoop):
            raise TypeError(f"loop {name!r} is not a per-micro-step loop; syncs need one")
        result[name] = _count(loop, workload, windows)
    return result
