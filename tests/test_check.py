"""``accumfn check``: passes on a working install, and fails (exit 1) on a broken one.

The broken installs are real faults put into the library for one run: a short window not
rescaled, applied steps counted as skipped, a checkpoint whose open-window gradients are
off. Each must turn exactly its own check to FAIL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

import accumfn
from accumfn import checkpoint as _checkpoint
from accumfn import core
from accumfn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def verdicts(output: str) -> dict[str, str]:
    return dict(
        (name, verdict) for verdict, name in re.findall(r"^(PASS|FAIL)  (\w+)", output, re.M)
    )


def test_check_passes_from_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "accumfn", "check", "--config", str(ROOT / "examples/config.yaml")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "batch_size 8 x gradient_accumulation_steps 4 = effective batch 32" in done.stdout
    assert verdicts(done.stdout) == {"gradients": "PASS", "counters": "PASS", "resume": "PASS"}
    assert "windows of 4 and 3 micro-batches" in done.stdout
    assert "2 of 4 in the window" in done.stdout and "bit for bit" in done.stdout
    assert "3 of 3 checks passed" in done.stdout
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_check_follows_an_epoch_schedule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "training:\n  batch_size: 2\n  gradient_accumulation_steps: {1: 3, 2: 2}\n"
        "  max_grad_norm: 0.05\n  epochs: 3\n"
    )
    assert main(["check", "--config", str(path), "--ignore", "epochs"]) == 0
    out = capsys.readouterr().out
    assert verdicts(out) == {"gradients": "PASS", "counters": "PASS", "resume": "PASS"}
    assert "5 windows of 1, 3, 2, 2 and 1 micro-batches" in out
    assert "micro-step 4 (1 of 3 in the window, epoch 1)" in out
    assert "1+1+1+1+1+1+1 in epoch 0, 3+3+1 in epoch 1, 2+2+2+1 in epochs 2-3" in out


def short_window_not_rescaled(monkeypatch: pytest.MonkeyPatch) -> None:
    real = core.close_window

    def close_window(state: core.AccumState, **kwargs: Any) -> core.AccumState:
        return attrs.evolve(real(state, **kwargs), grad_scale=1.0)

    monkeypatch.setattr(core, "close_window", close_window)


def applied_counted_as_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    real = core.finish_step

    def finish_step(state: core.AccumState, *, applied: bool, **kwargs: Any) -> core.AccumState:
        return real(state, applied=False, **kwargs)

    monkeypatch.setattr(core, "finish_step", finish_step)


def open_window_grads_halved(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _checkpoint.capture

    def capture(*args: Any, **kwargs: Any) -> dict[str, Any]:
        data = real(*args, **kwargs)
        if data["partial_grads"] is not None:
            data["partial_grads"] = [None if g is None else g / 2 for g in data["partial_grads"]]
        return data

    monkeypatch.setattr(_checkpoint, "capture", capture)


@pytest.mark.parametrize(
    ("fault", "failing", "words"),
    [
        (short_window_not_rescaled, "gradients", r"windows of 4 and 3: max \|accumulated"),
        (applied_counted_as_skipped, "counters", r"epoch 0, after 4 micro-batches: .* expected"),
        (open_window_grads_halved, "resume", r"resumed at micro-step 6 \(2 of 4 in the window\)"),
    ],
)
def test_a_fault_fails_its_check_and_the_exit_code(
    fault: Any,
    failing: str,
    words: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fault(monkeypatch)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    expected = {name: "FAIL" if name == failing else "PASS" for name in ("gradients", "counters",
                                                                          "resume")}  # fmt: skip
    assert verdicts(out) == expected
    assert re.search(words, out), out
    assert "2 of 3 checks passed" in out


def test_an_error_inside_a_check_is_a_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(accumfn.cli._check, "save_checkpoint", broken)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  resume     RuntimeError: disk full" in out


def test_bad_config_is_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text('training:\n  batch_size: 8\n  gradient_accumulation_steps: "4"\n')
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "accumfn check:" in err and "gradient_accumulation_steps must be an int" in err
    assert main(["check", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no config file at" in capsys.readouterr().err
