"""``python -m benchmarks``: every ratio in one run; prints a table and writes JSON."""

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
from .overhead import python_overhead
from .report import table
from .sync_counts import count_syncs
from .timing import time_loops
from .workloads import WINDOW, workload

__all__ = ["main", "run_all"]

TIMED = ["hand", "accumfn", "accumfn_apply_step", "accumulator", "accelerate", "lightning"]
SYNCED = ["hand", "accumfn", "accumfn_apply_step", "accumulator", "accelerate"]
MEASURED = ["hand", "accumfn", "large_batch"]
PAIRS = [
    ("accumfn", "hand"),
    ("accumfn_apply_step", "hand"),
    ("accumulator", "hand"),
    ("accumfn", "accelerate"),
    ("accumfn", "lightning"),
]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def _paired(timing: dict[str, Any], a: str, b: str) -> float | None:
    """Median over repeats of a's time over b's time in the same repeat."""
    if "samples_ms" not in timing.get(a, {}) or "samples_ms" not in timing.get(b, {}):
        return None
    pairs = zip(timing[a]["samples_ms"], timing[b]["samples_ms"], strict=True)
    return float(statistics.median(x / y for x, y in pairs))


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
    result: dict[str, Any] = module.run(repeats=repeats)
    return result


def _progress(started: float, what: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {what}", file=sys.stderr, flush=True)


def run_all(*, repeats: int, quick: bool) -> dict[str, Any]:
    """Every benchmark; the dict that is written as JSON."""
    windows = 2 if quick else 6
    names = ["mlp"] if quick else ["mlp", "transformer"]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"repeats": repeats, "quick": quick, "window": WINDOW, "windows": windows},
        "timing": {},
        "ratios": {},
        "syncs": {},
        "memory": {},
    }
    _progress(started, "accumfn's own cost per micro-step")
    results["overhead"] = python_overhead(repeats)
    for name in names:
        _progress(started, f"timing {name}")
        timing = time_loops(workload(name), TIMED, repeats=repeats, windows=windows)
        results["timing"][name] = timing
        results["ratios"][name] = {f"{a}/{b}": _paired(timing, a, b) for a, b in PAIRS}
        _progress(started, f"syncs {name}")
        results["syncs"][name] = count_syncs(workload(name), SYNCED)
    for name in names:
        _progress(started, f"memory {name}")
        results["memory"][name] = _memory(
            name, 1 if quick else min(repeats, 3), 2, torch.get_num_threads()
        )
    _progress(started, "ddp")
    results["ddp"] = _ddp(repeats)
    results["settings"]["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 7; 3 quick)")
    parser.add_argument("--quick", action="store_true", help="small run (under a minute)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = run_all(repeats=repeats, quick=args.quick)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
