"""The demo's outputs: the plot, the summary and the verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ._runs import StepRecord

__all__ = ["plot", "verdict"]


def plot(records: Sequence[StepRecord], tolerance: float, path: Path) -> bool:
    """Write both loss curves and the per-step parameter difference; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (losses, diffs) = plt.subplots(1, 2, figsize=(11, 4))
    for workload, colour in (("regression", "tab:blue"), ("tokens", "tab:green")):
        rows = [r for r in records if r.workload == workload]
        steps = [r.step for r in rows]
        losses.plot(steps, [r.large_loss for r in rows], color=colour, label=f"{workload}: large")
        losses.plot(
            steps,
            [r.accumulated_loss for r in rows],
            color=colour,
            linestyle="--",
            marker=".",
            label=f"{workload}: accumulated",
        )
        diffs.plot(steps, [_floor(r.max_param_diff) for r in rows], color=colour, label=workload)
        naive = [r.naive_max_param_diff for r in rows if r.naive_max_param_diff is not None]
        if naive:
            diffs.plot(
                steps,
                [_floor(d) for d in naive],
                color="tab:red",
                label=f"{workload}: naive loss/N",
            )
    diffs.axhline(tolerance, color="grey", linestyle=":", label="tolerance")
    losses.set(title="loss per optimizer step", xlabel="effective step", ylabel="loss")
    diffs.set(
        title="max |param(accumulated) - param(large batch)|",
        xlabel="effective step",
        yscale="log",
    )
    losses.legend(fontsize=7)
    diffs.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _floor(value: float) -> float:
    """Exact zeros cannot be drawn on a log axis; show them at the fp32 resolution floor."""
    return max(value, 1e-12)


def verdict(records: Sequence[StepRecord], tolerance: float) -> tuple[bool, str]:
    """Whether every accumulated run stayed within ``tolerance`` of its large batch."""
    lines, passed = [], True
    for workload in ("regression", "tokens"):
        rows = [r for r in records if r.workload == workload]
        worst = max((r.max_param_diff for r in rows), default=math.nan)
        ok = worst <= tolerance
        passed &= ok
        short = sum(1 for r in rows if r.micro_batches < max(x.micro_batches for x in rows))
        lines.append(
            f"  {workload:<10} {len(rows)} optimizer steps ({short} short final windows): "
            f"max |dparam| = {worst:.2e}  {'ok' if ok else 'DIFFERENT'}"
        )
        naive = [r.naive_max_param_diff for r in rows if r.naive_max_param_diff is not None]
        if naive:
            lines.append(
                f"  {'':<10} a naive loop (per-micro-batch mean / N) drifts to {max(naive):.2e}"
            )
    head = (
        f"EQUIVALENT: accumulated training matches large-batch training (tolerance {tolerance:.0e})"
        if passed
        else f"NOT EQUIVALENT: a run drifted beyond the tolerance {tolerance:.0e}"
    )
    return passed, "\n".join([head, *lines])
