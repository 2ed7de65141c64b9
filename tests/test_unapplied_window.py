"""A window left open when training ends warns once, with how to apply it; nothing else does.

The program's end runs in a subprocess (atexit); garbage collection runs here.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import accumfn
from accumfn.errors import UnappliedWindowWarning
from tests.support import data, mlp, mse

ROOT = Path(__file__).resolve().parent.parent

_PROGRAM = textwrap.dedent(
    """
    import warnings
    import torch
    from torch import nn
    import accumfn

    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.randn(12, 3)
    kept = []

    def run(name, finish):
        model = type(name, (nn.Sequential,), {})(nn.Linear(6, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        accumulator = accumfn.GradientAccumulator(optimizer, 4, max_grad_norm=None)
        for i in range(3):
            last = finish == "final" and i == 2
            loss = nn.functional.mse_loss(model(x[i::4]), y[i::4])
            accumulator.accumulate(loss, model, is_final_batch=last)
        if finish == "flush":
            accumulator.flush()
        elif finish == "reset":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reset_epoch's own warning: it discards
                accumulator.reset_epoch()
        elif finish == "saved":
            torch.save(accumulator.state_dict(), "/dev/null")
        kept.append((model, accumulator))

    for name, finish in [("Flushed", "flush"), ("Final", "final"), ("Reset", "reset"),
                         ("Saved", "saved"), ("LeftOpen", None)]:
        run(name, finish)

    model = type("FunctionalOpen", (nn.Sequential,), {})(nn.Linear(6, 3))
    state = accumfn.init(4, max_grad_norm=None)
    for i in range(2):
        state, _ = accumfn.accumulate(state, nn.functional.mse_loss(model(x[i::4]), y[i::4]), model)
    """
)


def test_the_program_ending_with_open_windows_warns_once_for_each() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "UnappliedWindowWarning" in line]
    assert len(lines) == 2, done.stderr
    left, functional = sorted(lines, key=lambda line: "FunctionalOpen" in line)
    assert "the program ended with a window of 3 micro-batch(es) of LeftOpen never applied" in left
    assert "is_final_batch=True" in left and "flush()" in left
    assert "2 micro-batch(es) of FunctionalOpen" in functional
    assert "accumfn.flush(state, model)" in functional
    for name in ("Flushed", "Final", "Reset", "Saved"):
        assert name not in done.stderr


def _open_window(seed: int) -> tuple[nn.Module, accumfn.GradientAccumulator]:
    model = mlp(seed)
    accumulator = accumfn.GradientAccumulator(
        torch.optim.SGD(model.parameters(), lr=0.1), 4, max_grad_norm=None
    )
    x, y = data(seed, 6)
    for i in range(2):
        accumulator.accumulate(mse(model, x[3 * i : 3 * i + 3], y[3 * i : 3 * i + 3]), model)
    return model, accumulator


def test_an_accumulator_collected_with_an_open_window_warns_once() -> None:
    model, accumulator = _open_window(1)
    with pytest.warns(UnappliedWindowWarning, match=r"GradientAccumulator was garbage-collected"):
        del accumulator
        gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnappliedWindowWarning)
        del model  # the same window: told once
        gc.collect()


def test_a_model_collected_with_an_open_functional_window_warns() -> None:
    model = mlp(2)
    x, y = data(2, 3)
    state, _ = accumfn.accumulate(accumfn.init(4), mse(model, x, y), model)
    with pytest.warns(UnappliedWindowWarning, match=r"a model was garbage-collected.*1 micro"):
        del model
        gc.collect()
    assert state.micro_step == 1


def test_nothing_warns_once_the_window_is_applied() -> None:
    model, accumulator = _open_window(3)
    assert accumulator.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnappliedWindowWarning)
        del model, accumulator
        gc.collect()
