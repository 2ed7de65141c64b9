"""Peak memory of one loop, measured in a fresh process.

``python -m benchmarks.memory WORKLOAD LOOP [WINDOWS]`` prints JSON. The loop first runs
one window on one-row batches (so code pages, thread pools and lazy imports are in), then
the process's peak RSS is reset (``/proc/self/clear_refs``) and the real run is measured:
``training_mib`` is its peak RSS minus the RSS just before, i.e. what the model, its
gradients, optimizer state and activations took. ``peak_rss_mib`` is the whole process.
``measure`` fixes glibc's mmap threshold, so every tensor over 64 KiB is returned to the
system when freed and RSS follows the tensors alive (without it, RSS drifts by megabytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["MEMORY_SCALE", "measure", "peak_memory"]

MEMORY_SCALE = 8
"""Micro-batches here are this many times the timing runs' ones, so activations matter."""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(workload_name: str, loop_name: str, windows: int) -> dict[str, Any]:
    """Run ``loop_name`` for ``windows`` windows in this process; report its memory."""
    import torch

    from .loops import make_loop
    from .workloads import WINDOW, workload

    bench = workload(workload_name)
    large = loop_name == "large_batch"
    count, scale = (windows, WINDOW * MEMORY_SCALE) if large else (windows * WINDOW, MEMORY_SCALE)
    batches = bench.batches(count, scale=scale)
    warm = [(x[:1], y[:1]) for x, y in bench.batches(1 if large else WINDOW)]
    make_loop(loop_name, bench)(warm)
    gc.collect()
    base = _status_kib("VmRSS")
    reset = _reset_peak()
    make_loop(loop_name, bench)(batches)
    peak = _status_kib("VmHWM")
    cuda = torch.cuda.is_available()
    return {
        "peak_rss_mib": peak / 1024,
        "training_mib": (peak - base) / 1024,
        "peak_was_reset": reset,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def measure(workload_name: str, loop_name: str, windows: int, threads: int) -> dict[str, Any]:
    """``peak_memory`` in a fresh interpreter, so no other loop's memory counts."""
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.memory", workload_name, loop_name, str(windows)),
            *("--threads", str(threads)),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=root,
        env={**os.environ, "PYTHONPATH": path, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    if done.returncode:
        raise RuntimeError(f"memory run {workload_name}/{loop_name} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload", choices=["wide_mlp", "transformer", "mlp"])
    parser.add_argument("loop")
    parser.add_argument("windows", type=int, nargs="?", default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(peak_memory(args.workload, args.loop, args.windows)))


if __name__ == "__main__":
    main()
