"""examples/train_from_config.py: config-driven training, stopped mid-window and resumed in a
new process, equals large-batch training written by hand over the same samples."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from accumfn import AccumulationConfig
from accumfn.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_from_config.py"


def example() -> Any:
    spec = importlib.util.spec_from_file_location("train_from_config", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def large_batch_params(config: AccumulationConfig) -> dict[str, torch.Tensor]:
    """One optimizer step per window on the window's samples as one batch: no accumfn."""
    ex = example()
    parts = ex.build(config)
    model, optimizer = parts["model"], parts["optimizer"]
    x, y = ex.dataset(config.batch_size)
    for epoch in range(ex.EPOCHS):
        batches = ex.micro_batches(epoch, config.batch_size)
        window = config.steps_at(epoch)
        for start in range(0, len(batches), window):
            rows = torch.cat(batches[start : start + window])
            optimizer.zero_grad()
            F.mse_loss(model(x[rows]), y[rows]).backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
    return {name: value.detach() for name, value in model.state_dict().items()}


@pytest.mark.parametrize(
    ("yaml", "stop", "held"),
    [
        (None, 6, "2 of 4"),  # the seed's file: windows of 4, 4 and 1 per epoch
        ("training:\n  batch_size: 3\n  gradient_accumulation_steps: {0: 2, 1: 5}\n"
         "  max_grad_norm: 0.1\n  learning_rate: 0.1\n", 12, "3 of 5"),
    ],
)  # fmt: skip
def test_stopped_mid_window_and_resumed_equals_large_batch(
    yaml: str | None, stop: int, held: str, tmp_path: Path
) -> None:
    config_path = ROOT / "examples" / "config.yaml"
    if yaml is not None:
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml)
    config = AccumulationConfig.from_yaml(config_path)
    run_dir = tmp_path / "run"
    common = ("--config", str(config_path), "--run-dir", str(run_dir))
    first = run(*common, "--stop-after", str(stop), cwd=tmp_path)
    assert f"stopped after micro-step {stop}, {held} micro-batches into a window" in first
    assert not (run_dir / "final.pt").exists()
    second = run(*common, cwd=tmp_path)
    assert f"resumed at micro-step {stop}, {held} micro-batches into a window" in second
    # Steps are numbered from 0, and the resumed run goes on from the step it stopped in.
    steps = [int(step) for step in re.findall(r": step (\d+) applied", first + second)]
    assert steps == list(range(len(steps))), steps
    params = load_checkpoint(run_dir / "final.pt")["model"]
    reference = large_batch_params(config)
    for name, value in reference.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-6)
