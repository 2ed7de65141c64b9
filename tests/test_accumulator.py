"""GradientAccumulator: the guide's object API on the step functions."""

from __future__ import annotations

import math

import pytest
import torch

import accumfn
from accumfn import AccumulationConflictError, GradientAccumulator
from accumfn.errors import CheckpointError, ConfigError

from .support import data, large_batch_run, max_param_diff, mlp, mse, twin, windows_of


def trainer(accumulate_grad_batches: int) -> object:
    """A real Lightning Trainer on CPU (detection is duck-typed, but use the real thing)."""
    lightning = pytest.importorskip("lightning")
    return lightning.Trainer(
        accelerator="cpu",
        accumulate_grad_batches=accumulate_grad_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_matches_functional_and_large_batch() -> None:
    model = mlp(0)
    ref = twin(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    acc = GradientAccumulator(opt, accumulation_steps=3, max_grad_norm=1.0, batch_size=4)
    x, y = data(0, 4 * 7)
    micro = list(zip(x.split(4), y.split(4), strict=True))
    stepped = [
        acc.accumulate(mse(model, xb, yb), model, is_final_batch=i == len(micro) - 1)
        for i, (xb, yb) in enumerate(micro)
    ]
    assert stepped == [False, False, True, False, False, True, True]
    large_batch_run(ref, torch.optim.Adam(ref.parameters(), lr=0.02), windows_of(x, y, 4, 3), 1.0)
    assert max_param_diff(model, ref) < 1e-6


def test_stats_follow_the_guide() -> None:
    model = mlp(1)
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 4, batch_size=8)
    assert math.isnan(acc.stats.last_grad_norm)
    x, y = data(1, 8 * 5)
    seen = []
    for xb, yb in zip(x.split(8), y.split(8), strict=True):
        acc.accumulate(mse(model, xb, yb), model)
        s = acc.stats
        seen.append((s.total_steps, s.optimizer_steps, s.current_accumulation, s.is_accumulating))
    assert seen == [(1, 0, 1, True), (2, 0, 2, True), (3, 0, 3, True), (4, 1, 0, False),
                    (5, 1, 1, True)]  # fmt: skip
    assert acc.stats.effective_batch_size == 32 == acc.effective_batch_size
    assert acc.effective_step == 1 and acc.stats.last_grad_norm > 0


def test_conflict_error_names_both_values_and_the_ways_out() -> None:
    model = mlp(2)
    with pytest.raises(ValueError, match="Gradient accumulation conflict detected") as err:
        GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 4, trainer=trainer(8))
    assert isinstance(err.value, AccumulationConflictError)
    text = str(err.value)
    assert "Manual accumulation_steps: 4" in text and "accumulate_grad_batches: 8" in text
    assert "1. Set accumulation_steps=1" in text and "3. Remove trainer parameter" in text


def test_lightning_managed_does_nothing_and_reports_trainer_counts() -> None:
    model = mlp(3)
    acc = GradientAccumulator(
        torch.optim.SGD(model.parameters(), lr=0.1), 1, batch_size=8, trainer=trainer(4)
    )
    assert acc.is_lightning_managed and acc.effective_batch_size == 32
    loss = mse(model, *data(3, 8))
    assert acc.accumulate(loss, model) is True
    assert all(p.grad is None for p in model.parameters())  # no backward
    assert acc.effective_step == 0 and acc.stats.optimizer_steps == 0 and acc.stats.total_steps == 1


def test_manual_with_trainer_that_does_not_accumulate() -> None:
    model = mlp(4)
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 4, trainer=trainer(1))
    assert not acc.is_lightning_managed and acc.accumulation_steps == 4


def test_trainer_without_accumulate_grad_batches_is_refused() -> None:
    model = mlp(5)
    with pytest.raises(ConfigError, match="no int accumulate_grad_batches"):
        GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 1, trainer=object())


def test_optimizer_type_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"torch\.optim\.Optimizer"):
        GradientAccumulator("adam", 4)  # type: ignore[arg-type]


def test_zero_overhead_mode_steps_every_batch() -> None:
    model = mlp(6)
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    x, y = data(6, 12)
    assert all(
        acc.accumulate(mse(model, xb, yb), model)
        for xb, yb in zip(x.split(4), y.split(4), strict=True)
    )
    assert acc.effective_step == 3


def test_state_dict_round_trip_mid_window_and_mismatch() -> None:
    model = mlp(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, 4, batch_size=2)
    x, y = data(7, 8)
    acc.accumulate(mse(model, x[:2], y[:2]), model)
    saved = acc.state_dict()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.zero_grad(set_to_none=True)
    fresh = GradientAccumulator(opt, 4, batch_size=2)
    fresh.load_state_dict(saved)
    assert fresh.state == acc.state
    restored = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads, restored, strict=True))
    other = GradientAccumulator(opt, 8, batch_size=2)
    with pytest.raises(CheckpointError, match=r"'steps': 4.*'steps': 8"):
        other.load_state_dict(saved)
    assert other.state == accumfn.GradientAccumulator(opt, 8, batch_size=2).state
