"""Per-micro-step time of several loops, measured alternately in one process.

Each repeat runs every loop once over the same micro-batches, in an order that rotates
from repeat to repeat, so drift in machine load hits all loops alike. A ratio is the
median over repeats of (loop time / baseline time) within the same repeat.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .loops import Loop, MissingPackage, make_loop
from .workloads import WINDOW, Workload

__all__ = ["time_loops"]


def time_loops(
    workload: Workload,
    names: Sequence[str],
    *,
    repeats: int,
    windows: int,
    baseline: str = "hand",
) -> dict[str, Any]:
    """Seconds per micro-step of each loop (median) and its ratio to ``baseline``.

    ``large_batch`` runs ``windows`` batches ``WINDOW`` times larger (one step each); its
    time is divided by ``WINDOW`` so it reads per micro-batch's worth of data.
    """
    micro = workload.batches(windows * WINDOW)
    large = workload.batches(windows, scale=WINDOW)
    loops: dict[str, Loop] = {}
    missing: dict[str, str] = {}
    for name in names:
        try:
            loops[name] = make_loop(name, workload)
        except MissingPackage as error:
            missing[name] = str(error)
    data = {name: large if name == "large_batch" else micro for name in loops}
    for name, loop in loops.items():  # warm-up: allocator, optimizer state, lazy imports
        loop(data[name][: 2 if name == "large_batch" else 2 * WINDOW])
    times: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops)
    for repeat in range(repeats):
        shift = repeat % len(order)
        for name in order[shift:] + order[:shift]:
            seconds = loops[name](data[name])
            times[name].append(seconds / WINDOW if name == "large_batch" else seconds)
    result: dict[str, Any] = {}
    for name, samples in times.items():
        ratios = [t / b for t, b in zip(samples, times[baseline], strict=True)]
        result[name] = {
            "ms_per_micro_step": 1e3 * statistics.median(samples),
            f"ratio_to_{baseline}": statistics.median(ratios),
            "samples_ms": [round(1e3 * t, 4) for t in samples],
        }
    for name, why in missing.items():
        result[name] = {"not_available": why}
    return result
