"""``python -m benchmarks.against REV``: this tree's accumfn against revision REV's, paired.

REV's ``accumfn`` package is exported from git into a temporary directory under the name
``accumfn_base`` and imported beside this tree's; the loops (functional API with
``step_window``, and ``GradientAccumulator``, of each) take turns a window at a time on one
model and optimizer, as in ``python -m benchmarks`` (``timing.time_windows``), with two
control rows: the hand loop against itself, and REV's functional loop against itself. It
prints, per workload, the difference per non-boundary micro-step and per boundary and the
micro-step ratio, each as the median [min, max] over the repeats.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import accumfn

from .loops import LOOPS, MicroStep
from .timing import compare, time_windows
from .workloads import WINDOW, Batch, Workload, workload

__all__ = ["main"]

PAIRS = [
    ("hand_control", "hand"),
    ("base_control", "base"),
    ("accumfn", "base"),
    ("accumulator", "base_accumulator"),
    ("accumulator_steps1", "base_steps1"),
    ("accumulator_steps1", "plain"),
    ("base_steps1", "plain"),
]


def _functional(lib: Any) -> Any:
    def make(work: Workload, model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
        state = lib.init(WINDOW, max_grad_norm=work.max_grad_norm)

        def step(index: int, batch: Batch, last: bool) -> None:
            nonlocal state
            loss = work.loss(model, batch)
            state, stepped = lib.accumulate(state, loss, model, is_final_batch=last)
            if stepped:
                state = lib.step_window(state, optimizer, model).state

        return step

    return make


def _accumulator(lib: Any, window: int = WINDOW) -> Any:
    """``GradientAccumulator`` of ``lib``; ``window=1``: every micro-step a window (against
    the plain ``backward(); step(); zero_grad()`` loop, both clipped as the workload is)."""

    def make(work: Workload, model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
        accumulator = lib.GradientAccumulator(optimizer, window, max_grad_norm=work.max_grad_norm)

        def step(index: int, batch: Batch, last: bool) -> None:
            accumulator.accumulate(work.loss(model, batch), model, is_final_batch=last)

        return step

    return make


def _import_base(rev: str, into: Path) -> Any:
    """REV's accumfn package, imported as ``accumfn_base`` from ``into``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "accumfn"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python before 3.10.12 / 3.11.4: no filters (our own archive)
            tar.extractall(into)
    (into / "accumfn").rename(into / "accumfn_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("accumfn_base")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.against", description=__doc__)
    parser.add_argument("rev", help="the git revision to compare with (e.g. main)")
    parser.add_argument("--only", nargs="+", default=["linear", "mlp", "tensors100", "mlp_noclip"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--target", type=float, default=0.3, help="CPU seconds per repeat")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="accumfn-base-") as tmp:
        base = _import_base(args.rev, Path(tmp))
        LOOPS.update(
            accumfn=_functional(accumfn),
            accumulator=_accumulator(accumfn),
            base=_functional(base),
            base_control=_functional(base),
            base_accumulator=_accumulator(base),
            accumulator_steps1=_accumulator(accumfn, 1),
            base_steps1=_accumulator(base, 1),
        )
        names = ["hand", "hand_control", "accumfn", "base", "base_control"]
        names += ["accumulator", "base_accumulator", "plain", "accumulator_steps1", "base_steps1"]
        results: dict[str, Any] = {}
        for name in args.only:
            timed = time_windows(workload(name), names, repeats=args.repeats, target_s=args.target)
            results[name] = compare(timed, PAIRS)
            hand = results[name]["loops"]["hand"]["micro_step"][0]
            print(f"{name} (hand loop {hand:.0f} us / micro-step)")
            for pair, row in results[name]["pairs"].items():
                cells = [
                    "{:+.2f} us [{:+.2f}, {:+.2f}]".format(*row["non_boundary_diff_us"]),
                    "{:+.1f} us [{:+.1f}, {:+.1f}]".format(*row["boundary_diff_us"]),
                    "{:.4f} [{:.4f}, {:.4f}]".format(*row["ratio"]),
                ]
                print(f"  {pair:32s} non-boundary {cells[0]}  boundary {cells[1]}  {cells[2]}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
