"""``python -m benchmarks.cuda``: without CUDA it says so and exits 0; ``--device cpu`` runs
its loops (all but the sync debug mode) and prints its tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.cuda", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
        check=False,
    )


def test_without_cuda_it_says_so_and_exits_0() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA GPU" in done.stdout and "Nothing was run" in done.stdout


def test_on_the_cpu_every_loop_runs_and_every_window_loss_matches() -> None:
    done = _run("--device", "cpu", "--windows", "1", "--turns", "1")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| accumfn,")]
    assert len(rows) == 3
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "0" and float(cells[3]) < 1e-5
    assert "accumfn_items / hand_items_read" in done.stdout
