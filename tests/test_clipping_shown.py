"""Every command says which clipping it runs under: ``accumfn demo``, and ``accumfn plan``
with or without ``--config``; the demo runs under accumfn's default or under none."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from accumfn import core
from accumfn.cli import main
from accumfn.cli.demo import DemoSettings, run_demo

DEFAULT_LINE = "clipping: at max_grad_norm 1.0 (the default)"


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--batch-size", "8", "--steps", "4"],
        ["plan", "--batch-size", "8", "--target", "256", "--devices", "4"],
        ["plan", "--batch-size", "8", "--target", "30", "--lr", "0.1", "--base-batch", "8"],
    ],
)
def test_plan_without_a_config_prints_the_clipping(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    assert DEFAULT_LINE in capsys.readouterr().out.splitlines()


def test_the_demo_prints_its_clipping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--steps", "2", "--epochs", "1", "--out", str(tmp_path), "--no-wandb"]
    assert main([*argv, "--no-progress"]) == 0
    assert f"{DEFAULT_LINE}, in all three runs" in capsys.readouterr().out.splitlines()
    assert attrs.fields(DemoSettings).max_grad_norm.default == core.DEFAULT_MAX_GRAD_NORM


def test_the_demo_runs_without_clipping(tmp_path: Path) -> None:
    settings = DemoSettings(steps=2, epochs=1, max_grad_norm=None)
    result = run_demo(settings, tmp_path, use_wandb=False, progress=False)
    assert result.passed
    summary = json.loads(Path(result.files["summary"]).read_text())
    assert summary["settings"]["max_grad_norm"] is None
