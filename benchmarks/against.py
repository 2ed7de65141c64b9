"""``python -m benchmarks.against REV``: this tree's accumfn against revision REV's, paired.

REV's ``accumfn`` package is exported from git into a temporary directory under the name
``accumfn_base`` and imported beside this tree's; the loops (functional API with
``step_window``, ``GradientAccumulator``, and ``GradientAccumulator(optimizer, 1)`` beside
the plain loop, clipped as the workload is, of each) take turns a window at a time on one
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

import accumfn

from .loops import LOOPS, accumulator_loop, functional_loop
from .timing import compare, time_windows
from .workloads import workload

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
            accumfn=functional_loop(accumfn),
            accumulator=accumulator_loop(accumfn),
            base=functional_loop(base),
            base_control=functional_loop(base),
            base_accumulator=accumulator_loop(base),
            accumulator_steps1=accumulator_loop(accumfn, 1),
            base_steps1=accumulator_loop(base, 1),
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
