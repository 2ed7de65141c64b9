"""The demo's outputs: the plot and the verdict."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._runs import StepRecord

__all__ = ["departure", "plot", "verdict"]

WORKLOADS = {
    "regression": "regression MLP, mean loss per micro-batch",
    "tokens": "token model, ragged token counts (num_items)",
}
FLOOR = 1e-12
"""Exact zeros cannot be drawn on a log axis; they are shown at this floor."""


def departure(rows: Sequence[StepRecord], tolerance: float) -> StepRecord | None:
    """The first window after which the naive loop is further than ``tolerance`` away."""
    return next((r for r in rows if r.naive_max_param_diff > tolerance), None)


def plot(records: Sequence[StepRecord], tolerance: float, path: Path) -> bool:
    """One row of panels per workload: the losses, and the parameter differences (log scale).

    The large-batch loss is a line and the accumulated loss hollow markers on it, so where
    they agree the markers sit on the line. Epoch starts are dashed lines and short final
    windows shaded; the naive loop's departure is marked. False without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), sharex=True)
    for row, (workload, title) in zip(axes, WORKLOADS.items(), strict=True):
        rows = [r for r in records if r.workload == workload]
        _losses(row[0], rows, title)
        _differences(row[1], rows, tolerance)
        for ax, where in zip(row, ("upper right", "lower right"), strict=True):
            _mark_windows(ax, rows)
            ax.legend(fontsize=8, loc=where)
    for ax in axes[1]:
        ax.set_xlabel("effective step (as in metrics.jsonl and summary.json)")
    worst = max(r.max_param_diff for r in records)
    agree = worst <= tolerance
    fig.suptitle(
        f"accumulated {'==' if agree else '!='} large batch: max |dparam| = {worst:.1e} "
        f"(tolerance {tolerance:.0e}); the naive loop (micro-batch mean / N) drifts away",
        fontsize=12,
        color="black" if agree else "tab:red",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _losses(ax: Any, rows: Sequence[StepRecord], title: str) -> None:
    steps = [r.step for r in rows]
    ax.plot(steps, [r.large_loss for r in rows], color="tab:blue", lw=2.5, label="large batch")
    ax.plot(
        steps,
        [r.accumulated_loss for r in rows],
        linestyle="none",
        marker="o",
        markersize=7,
        markerfacecolor="none",
        markeredgecolor="tab:orange",
        markeredgewidth=1.5,
        label="accumulated (accumfn)",
    )
    ax.set(title=f"{title}: loss", ylabel="loss")


def _differences(ax: Any, rows: Sequence[StepRecord], tolerance: float) -> None:
    steps = [r.step for r in rows]
    ax.plot(
        steps,
        [max(r.max_param_diff, FLOOR) for r in rows],
        color="tab:orange",
        marker="o",
        markersize=4,
        zorder=3,
        label="accumfn vs large batch",
    )
    ax.plot(
        steps,
        [max(r.naive_max_param_diff, FLOOR) for r in rows],
        color="tab:red",
        linestyle="--",
        marker="x",
        markersize=5,
        zorder=2,
        label="naive loop vs large batch",
    )
    ax.axhline(tolerance, color="grey", linestyle=":", label=f"tolerance {tolerance:.0e}")
    ax.set(yscale="log", ylabel="max |param - large-batch param|", ylim=(FLOOR / 3, 1.0))
    ax.set_title("parameter difference after each step")
    first = departure(rows, tolerance)
    if first is not None:
        why = "a short final window" if first.short else "ragged counts"
        ax.annotate(
            f"naive loop departs at step {first.step}\n({why})",
            xy=(first.step, first.naive_max_param_diff),
            xytext=(0.03, 0.12),
            textcoords="axes fraction",
            fontsize=8,
            color="tab:red",
            arrowprops={"arrowstyle": "->", "color": "tab:red"},
        )


def _mark_windows(ax: Any, rows: Sequence[StepRecord]) -> None:
    """Dashed lines where epochs start, shading on short final windows."""
    shaded = False
    for previous, record in itertools.pairwise(rows):
        if record.epoch != previous.epoch:
            ax.axvline(record.step - 0.5, color="black", linestyle="--", lw=0.8)
            ax.text(
                record.step - 0.4,
                0.02,
                f"epoch {record.epoch}",
                transform=ax.get_xaxis_transform(),
                fontsize=8,
            )
    for record in rows:
        if record.short:
            ax.axvspan(
                record.step - 0.5,
                record.step + 0.5,
                color="gold",
                alpha=0.35,
                label=None if shaded else "short final window",
            )
            shaded = True


def verdict(records: Sequence[StepRecord], tolerance: float) -> tuple[bool, str]:
    """Whether every accumulated run stayed within ``tolerance`` of its large batch."""
    lines, passed = [], True
    for workload in WORKLOADS:
        rows = [r for r in records if r.workload == workload]
        worst = max((r.max_param_diff for r in rows), default=math.nan)
        ok = worst <= tolerance
        passed &= ok
        short = sum(1 for r in rows if r.short)
        lines.append(
            f"  {workload:<10} {len(rows)} optimizer steps ({short} short final windows): "
            f"max |dparam| = {worst:.2e}  {'ok' if ok else 'DIFFERENT'}"
        )
        first = departure(rows, tolerance)
        naive = max((r.naive_max_param_diff for r in rows), default=math.nan)
        where = (
            f"departs at step {first.step}{' (a short final window)' if first.short else ''}"
            if first is not None
            else "stays within the tolerance"
        )
        lines.append(f"  {'':<10} naive loop (micro-batch mean / N) {where}, drifts to {naive:.2e}")
    head = (
        f"EQUIVALENT: accumulated training matches large-batch training (tolerance {tolerance:.0e})"
        if passed
        else f"NOT EQUIVALENT: a run drifted beyond the tolerance {tolerance:.0e}"
    )
    return passed, "\n".join([head, *lines])
