"""`python -m benchmarks --quick`: the JSON it writes and the sync counts (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCUMFN_LOOPS = ["accumfn", "accumfn_apply_step", "accumulator"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Time per micro-step" in done.stdout and f"wrote {out}" in done.stdout
    loaded: dict[str, Any] = json.loads(out.read_text())
    loaded["table"] = done.stdout
    return loaded


def test_machine_and_settings_are_recorded(results: dict[str, Any]) -> None:
    machine = results["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    assert machine["torch"].startswith("2.")
    assert results["settings"]["quick"] is True and results["settings"]["repeats"] == 1
    assert machine["torch_threads"] == 1  # the default


def test_every_loop_is_timed_against_the_hand_loop(results: dict[str, Any]) -> None:
    assert set(results["timing"]) == {"linear", "mlp", "tensors10"}
    timing = results["timing"]["mlp"]
    for loop in ["hand", "hand_control", *ACCUMFN_LOOPS, "accelerate", "lightning"]:
        figures = timing["loops"][loop]
        assert all(figures[key][0] > 0 for key in ("micro_step", "non_boundary", "boundary"))
        # [median, min, max] over repeats
        assert all(low <= mid <= high for mid, low, high in figures.values())
    assert set(timing["pairs"]) == {
        "hand_control-hand",
        "accumfn-hand",
        "accumulator-hand",
        "accumfn_apply_step-hand",
        "accumulator-accumfn",
        "accumfn-accelerate",
        "accumfn-lightning",
    }
    for row in timing["pairs"].values():
        assert set(row) == {
            "micro_step_diff_us",
            "non_boundary_diff_us",
            "boundary_diff_us",
            "ratio",
        }
        assert row["ratio"][0] > 0
    assert results["settings"]["windows_per_repeat"]["mlp"] >= 1
    assert "Boundary cost against the number of parameter tensors" in results["table"]


def test_no_host_sync_on_non_boundary_steps(results: dict[str, Any]) -> None:
    syncs = results["syncs"]["mlp"]
    for loop in ["hand", *ACCUMFN_LOOPS]:
        assert syncs[loop]["non_boundary_max"] == 0, (loop, syncs[loop])
    # step_window keeps the gradient norm on the device; apply_step reads it once per window.
    assert syncs["accumfn"]["boundary_per_window"] == 0
    assert syncs["accumulator"]["boundary_per_window"] == 0
    assert syncs["accumfn_apply_step"]["boundary_calls"] == {"__float__": 1}


def test_memory_is_measured_against_hand_loop_and_large_batch(results: dict[str, Any]) -> None:
    memory = results["memory"]["wide_mlp"]
    for loop in ["hand", "accumfn", "large_batch"]:
        assert memory[loop]["training_mib"] > 0
    # The large batch holds WINDOW times the activations: it must need more memory.
    assert memory["large_batch"]["training_mib"] > memory["accumfn"]["training_mib"]
    assert memory["accumfn/hand"]["peak_rss_mib"] > 0


def test_ddp_row_is_present(results: dict[str, Any]) -> None:
    ddp = results["ddp"]
    assert "not_available" in ddp or {"ratio", "allreduce_per_window_accumfn"} <= set(ddp)


def test_summary_puts_two_runs_side_by_side(results: dict[str, Any]) -> None:
    from benchmarks.summary import summary

    text = summary([results, results])
    rows = [line for line in text.splitlines() if line.startswith("| Linear(4, 1) |")]
    assert [row.split(" | ")[1] for row in rows] == [
        "control (hand again)",
        "accumfn",
        "`GradientAccumulator`",
        "`GradientAccumulator` - accumfn",
    ]
    pair = results["timing"]["linear"]["pairs"]["accumfn-hand"]
    extra = f"{pair['micro_step_diff_us'][0]:+.1f}"
    assert f"| {extra} / {extra} |" in rows[1]
