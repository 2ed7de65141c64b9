"""The ``accumfn`` command: the demo users run first, and the window planner."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accumfn.cli import COMMANDS, _parser, main

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
    regression = [s for s in steps if s["workload"] == "regression"]
    tokens = [s for s in steps if s["workload"] == "tokens"]
    assert [s["micro_batches"] for s in regression] == [3, 3, 3, 1] * 2
    assert [s["short"] for s in tokens] == [False, False, False, True] * 2
    assert [s["epoch"] for s in tokens] == [0] * 4 + [1] * 4
    assert max(s["max_param_diff"] for s in steps) <= summary["tolerance"]
    tolerance = summary["tolerance"]
    # The naive loop matches until the first short window (mean loss), or departs at once
    # (ragged token counts); the verdict names the step.
    assert [s["naive_max_param_diff"] > tolerance for s in regression][:4] == [0, 0, 0, 1]
    assert max(s["naive_max_param_diff"] for s in tokens) > 100 * tolerance
    assert "departs at step 3 (a short final window)" in done.stdout
    # One numbering everywhere: the window's effective step from 0, both workloads per row.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["_step"] for r in rows] == list(range(8))
    assert [s["step"] for s in regression] == [s["step"] for s in tokens] == list(range(8))
    for row, reg, tok in zip(rows, regression, tokens, strict=True):
        assert row["regression/max_param_diff"] == reg["max_param_diff"]
        assert row["tokens/naive_max_param_diff"] == tok["naive_max_param_diff"]
        assert row["tokens/micro_batches"] == tok["micro_batches"]
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


def test_a_target_below_one_micro_batch_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--target", "4", "--batch-size", "8"]) == 0
    note = capsys.readouterr().out.splitlines()[-1]
    assert note.startswith("note: target 4 is below one micro-batch")
    assert "use a batch size of 4" in note


def test_every_option_has_a_help_text() -> None:
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {command.name for command in COMMANDS}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"accumfn {name} {action.option_strings} has no help"
        assert sub.description, name


LIGHT = """
import json, sys
from accumfn.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                                     ("torch", "numpy", "wandb", "matplotlib"))))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["demo", "--help"],
        ["plan", "--help"],
        ["plan", "--batch-size", "8", "--target", "256", "--devices", "4"],
        ["plan", "--batch-size", "eight", "--target", "32"],
        ["demo", "--window", "0"],
        ["nonsense"],
    ],
)
def test_help_plan_and_argument_errors_do_not_import_torch(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", LIGHT, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("MODULES ")]
    assert json.loads(line.removeprefix("MODULES ")) == []
