"""The ``accumfn`` command: the demo users run first, and the window planner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accumfn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_both_ways_and_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "accumfn", "demo", "--steps", "4", "--epochs", "2",
         "--window", "3", "--out", str(out), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("EQUIVALENT")
    assert "naive loop" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is True
    steps = summary["steps"]
    # 2 workloads x 2 epochs x 4 steps, each epoch ending on a short window of 1 micro-batch.
    assert len(steps) == 16
    assert [s["micro_batches"] for s in steps[:4]] == [3, 3, 3, 1]
    assert max(s["max_param_diff"] for s in steps) <= summary["tolerance"]
    naive = [s["naive_max_param_diff"] for s in steps if s["workload"] == "tokens"]
    assert max(naive) > 100 * summary["tolerance"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["_step"] for r in rows] == list(range(16))
    assert all("regression/micro_loss" in r for r in rows[:8])
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_demo_exit_code_and_output_without_wandb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--steps", "2", "--epochs", "1", "--out", str(tmp_path), "--no-wandb",
                 "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "metrics" in printed and "wandb" not in printed.split("files:")[1]
    assert not (tmp_path / "wandb").exists()


def test_plan_prints_the_window(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--batch-size", "8", "--target", "256", "--devices", "4"]) == 0
    printed = capsys.readouterr().out
    assert "accumulation steps (window)    8" in printed
    assert "effective batch (all devices)  256" in printed


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["plan", "--batch-size", "0", "--target", "32"], "expected a number >= 1"),
        (["plan", "--batch-size", "eight", "--target", "32"], "expected a whole number"),
        (["demo", "--window", "-1"], "expected a number >= 1"),
    ],
)
def test_bad_arguments_say_what_is_wrong(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert words in capsys.readouterr().err
