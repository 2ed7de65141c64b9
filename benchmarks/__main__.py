"""``python -m benchmarks``: every comparison in one run; prints the tables and writes JSON."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import memory
from .machine import machine_info
from .report import table
from .sync_counts import count_syncs
from .timing import compare, time_windows
from .workloads import SWEEP, WINDOW, workload

__all__ = ["TIMED", "main", "run_all"]

ACCUMFN = ["accumfn", "accumulator"]
PEERS = ["accelerate", "lightning"]
TIMED: dict[str, list[str]] = {
    "linear": ACCUMFN,
    "mlp": [*ACCUMFN, "accumfn_apply_step", *PEERS],
    "linears50": ACCUMFN,
    **{f"tensors{n}": ACCUMFN for n in SWEEP},
    "mlp_noclip": [*ACCUMFN, "plain", "accumulator_steps1"],
    "transformer": [*ACCUMFN, *PEERS],
}
"""Workloads timed, and the loops timed beside ``hand`` and ``hand_control`` on each."""
LONGER = {
    "mlp": 3.0,
    "mlp_noclip": 3.0,
    "linears50": 2.0,
    "tensors100": 2.0,
    "tensors1000": 4.0,
    "transformer": 8.0,
}
"""Workloads whose windows are long or noisy get this many times the CPU time per repeat."""
QUICK = ["linear", "mlp", "tensors10"]
PAIRS = [
    ("hand_control", "hand"),
    ("accumfn", "hand"),
    ("accumulator", "hand"),
    ("accumfn_apply_step", "hand"),
    ("accumulator", "accumfn"),
    ("accumulator_steps1", "plain"),
    ("accumfn", "accelerate"),
    ("accumfn", "lightning"),
]
SYNCED = ["hand", "accumfn", "accumfn_apply_step", "accumulator", "accelerate"]
MEASURED = ["hand", "accumfn", "large_batch"]
MEMORY = ["wide_mlp", "transformer"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def _memory(name: str, repeats: int, windows: int, threads: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {loop: [] for loop in MEASURED}
    for _ in range(repeats):
        for loop in MEASURED:
            runs[loop].append(memory.measure(name, loop, windows, threads))
    result: dict[str, Any] = {
        loop: {
            key: statistics.median(r[key] for r in rs) for key in ("peak_rss_mib", "training_mib")
        }
        for loop, rs in runs.items()
    }
    for base in ("hand", "large_batch"):
        result[f"accumfn/{base}"] = {
            key: result["accumfn"][key] / result[base][key]
            for key in ("peak_rss_mib", "training_mib")
        }
    return result


def _ddp(repeats: int) -> dict[str, Any]:
    if importlib.util.find_spec("benchmarks.ddp_allreduce") is None:
        return {"not_available": "benchmarks/ddp_allreduce.py is not present"}
    module = importlib.import_module("benchmarks.ddp_allreduce")
    failures = []
    for _ in range(2):  # a rank lost to the machine (a killed process) costs one retry
        try:
            result: dict[str, Any] = module.run(repeats=repeats)
        except Exception as error:  # the other sections' results are kept either way
            failures.append(f"{type(error).__name__}: {error}")
        else:
            return result
    return {"not_available": "; ".join(failures)}


def _progress(started: float, what: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {what}", file=sys.stderr, flush=True)


def run_all(
    *,
    repeats: int,
    quick: bool,
    target_s: float,
    only: list[str] | None = None,
    extras: bool = True,
) -> dict[str, Any]:
    """Every benchmark; the dict that is written as JSON."""
    names = only or (QUICK if quick else list(TIMED))
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "repeats": repeats,
            "quick": quick,
            "window": WINDOW,
            "target_s_per_repeat": target_s,
            "windows_per_repeat": {},
        },
        "workloads": {},
        "timing": {},
        "syncs": {},
        "memory": {},
    }
    for name in names:
        _progress(started, f"timing {name}")
        loops = ["hand", "hand_control", *TIMED[name]]
        timed = time_windows(
            workload(name),
            loops,
            repeats=repeats,
            target_s=target_s * LONGER.get(name, 1.0),
            warmup=1 if quick else 2,
            min_windows=1 if quick else 3,
        )
        results["settings"]["windows_per_repeat"][name] = timed["windows"]
        results["workloads"][name] = workload(name).title
        results["timing"][name] = {
            **compare(timed, PAIRS),
            "missing": timed["missing"],
        }
    if extras:
        for name in ["mlp"] if quick else ["mlp", "transformer"]:
            _progress(started, f"syncs {name}")
            results["syncs"][name] = count_syncs(workload(name), SYNCED)
        for name in MEMORY[:1] if quick else MEMORY:
            _progress(started, f"memory {name}")
            results["memory"][name] = _memory(name, 1 if quick else 3, 2, torch.get_num_threads())
        _progress(started, "ddp")
        results["ddp"] = _ddp(2 if quick else 5)
    results["settings"]["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 9; 2 quick)")
    parser.add_argument("--quick", action="store_true", help="small run (under a minute)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="CPU seconds of one loop's repeat (default 0.3; 0.01 quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--only", nargs="+", choices=list(TIMED), help="time these workloads only")
    parser.add_argument(
        "--timing-only", action="store_true", help="skip the sync, memory and DDP sections"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 9)
    seconds = args.seconds if args.seconds is not None else (0.01 if args.quick else 0.3)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if seconds <= 0:
        parser.error(f"--seconds must be > 0, got {seconds}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    results = run_all(
        repeats=repeats,
        quick=args.quick,
        target_s=seconds,
        only=args.only,
        extras=not args.timing_only,
    )
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
