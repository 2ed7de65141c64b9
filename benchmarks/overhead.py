"""accumfn's own cost per micro-step, on a model so small that compute does not hide it.

The hand loop is ``(loss / 8).backward()`` and an SGD step every 8; accumfn's extra
includes the core's transition (a validated frozen record per micro-step) and, once per
window, the gradient norm that ``step_window`` always computes (kept on the device).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

import accumfn

__all__ = ["python_overhead"]


def _loops() -> dict[str, Callable[[], None]]:
    model = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    state = accumfn.init(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = accumfn.GradientAccumulator(optimizer, 8)
    count = 0

    def hand() -> None:
        nonlocal count
        (model(x).sum() / 8).backward()
        count += 1
        if count % 8 == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def functional() -> None:
        nonlocal state
        state, stepped = accumfn.accumulate(state, model(x).sum(), model)
        if stepped:
            state = accumfn.step_window(state, optimizer, model).state

    def object_api() -> None:
        accumulator.accumulate(model(x).sum(), model)

    return {"hand": hand, "accumfn": functional, "accumulator": object_api}


def python_overhead(repeats: int, calls: int = 800) -> dict[str, float]:
    """Microseconds per micro-step (best of ``repeats``, alternating) and accumfn's extra."""
    loops = _loops()
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(repeats):
        for name, step in loops.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return {
        **{f"{name}_us": value for name, value in best.items()},
        "accumfn_extra_us": best["accumfn"] - best["hand"],
        "accumulator_extra_us": best["accumulator"] - best["hand"],
    }
