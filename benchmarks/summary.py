"""``python -m benchmarks.summary RUN1.json RUN2.json``: the docs' tables from two runs.

Each cell is ``run 1 / run 2``, a median of the paired differences (or ratios) over the
repeats of that run; the control row (a second copy of the hand loop against the hand
loop) stands beside each workload and shows how far apart two identical loops come out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["main", "summary", "sweep"]

_ROWS = [
    ("hand_control-hand", "control (hand again)"),
    ("accumfn-hand", "accumfn"),
    ("accumulator-hand", "`GradientAccumulator`"),
    ("accumulator-accumfn", "`GradientAccumulator` - accumfn"),
    ("accumulator_steps1-plain", "`GradientAccumulator`, window 1 - plain loop"),
    ("accumfn-accelerate", "accumfn - Accelerate"),
    ("accumfn-lightning", "accumfn - Lightning"),
]


def _pair(runs: list[dict[str, Any]], name: str, pair: str, key: str, form: str) -> str:
    cells = []
    for run in runs:
        row = run["timing"].get(name, {}).get("pairs", {}).get(pair)
        cells.append("n/a" if row is None else format(row[key][0], form))
    return " / ".join(cells)


def _hand(runs: list[dict[str, Any]], name: str, key: str) -> str:
    return " / ".join(f"{run['timing'][name]['loops']['hand'][key][0]:.0f}" for run in runs)


def summary(runs: list[dict[str, Any]]) -> str:
    """The time table (one row per workload and comparison) and the boundary sweep."""
    lines = [
        "| workload | comparison | hand us / micro-step | extra us / micro-step | ratio "
        "| extra us, non-boundary micro-step | extra us / window boundary |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, title in runs[0]["workloads"].items():
        for pair, label in _ROWS:
            if all(pair not in run["timing"][name]["pairs"] for run in runs):
                continue
            lines.append(
                f"| {title} | {label} | {_hand(runs, name, 'micro_step')} "
                f"| {_pair(runs, name, pair, 'micro_step_diff_us', '+.1f')} "
                f"| {_pair(runs, name, pair, 'ratio', '.3f')} "
                f"| {_pair(runs, name, pair, 'non_boundary_diff_us', '+.1f')} "
                f"| {_pair(runs, name, pair, 'boundary_diff_us', '+.0f')} |"
            )
    return "\n".join(lines)


def sweep(runs: list[dict[str, Any]]) -> str:
    """Window-boundary cost against the number of parameter tensors (SGD foreach, clip 1.0)."""
    lines = [
        "| parameter tensors | hand loop us / boundary micro-step | accumfn extra us "
        "| `GradientAccumulator` extra us | control us |",
        "|---:|---:|---:|---:|---:|",
    ]
    names = [name for name in runs[0]["timing"] if name.startswith("tensors")]
    for name in names:
        cells = [
            _pair(runs, name, pair, "boundary_diff_us", "+.0f")
            for pair in ("accumfn-hand", "accumulator-hand", "hand_control-hand")
        ]
        lines.append(
            f"| {name.removeprefix('tensors')} | {_hand(runs, name, 'boundary')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of python -m benchmarks")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    print(summary(runs))
    print()
    print(sweep(runs))


if __name__ == "__main__":
    main()
