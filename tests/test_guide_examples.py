"""Every code example of the original guide runs against accumfn with only its import changed.

The examples use names the guide defines elsewhere (``model``, ``optimizer``, ``dataloader``,
``trainer``...). The fixture below provides them: ``model(batch)`` returns a loss, as in the
guide. Two edits beyond the import, both to placeholders the reader fills in: the guide's
``is_final_batch=...`` becomes ``is_final_batch=False`` and Example 2's
``accelerator='gpu'`` becomes ``'cpu'`` (this machine has no GPU; the numbers checked do
not depend on it).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accumfn
from accumfn import AccumulationStats, GradientAccumulator, MetricsTracker

from .guide_snippets import GUIDE

pl = pytest.importorskip("pytorch_lightning")
wandb = pytest.importorskip("wandb")

PLACEHOLDERS = {
    "is_final_batch=...": "is_final_batch=False",
    "accelerator='gpu'": "accelerator='cpu'",
}


class LossModel(nn.Module):
    """``loss = model(batch)``, as the guide writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def _trainer(**kwargs: Any) -> Any:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)


@pytest.fixture
def namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    x, y = torch.randn(88, 6), torch.randn(88, 2)  # 11 batches of 8: a short final window
    dataloader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = LossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    accumulator = GradientAccumulator(optimizer, accumulation_steps=4, batch_size=8)
    for batch in list(dataloader)[:6]:  # mid-window, as in a real checkpoint
        accumulator.accumulate(model(batch), model)
    run = wandb.init(project="guide", mode="offline", dir=str(tmp_path))
    ns: dict[str, Any] = {
        "torch": torch,
        "GradientAccumulator": GradientAccumulator,
        "MetricsTracker": MetricsTracker,
        "pl": pl,
        "wandb": wandb,
        "model": model,
        "optimizer": optimizer,
        "dataloader": dataloader,
        "small_dataloader": dataloader,
        "batch": next(iter(dataloader)),
        "epochs": 2,
        "epoch": 1,
        "accumulation_steps": 4,
        "batch_size": 8,
        "accumulator": accumulator,
        "trainer": _trainer(accumulate_grad_batches=4, max_epochs=10),
        "metrics_tracker": MetricsTracker(jsonl_path=tmp_path / "metrics.jsonl"),
    }
    yield ns
    for value in ns.values():
        if isinstance(value, MetricsTracker):
            value.close()
    run.finish()
    wandb.teardown()  # W&B caches WANDB_DIR process-wide; later tests set their own


def run_example(key: str, ns: dict[str, Any]) -> str:
    code = GUIDE[key]
    for placeholder, value in PLACEHOLDERS.items():
        code = code.replace(placeholder, value)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"<guide: {key}>", "exec"), ns)
    return out.getvalue()


RUNS_AS_IS = [key for key in GUIDE if not key.startswith("03 ")]


@pytest.mark.parametrize("key", RUNS_AS_IS)
def test_guide_example_runs(key: str, namespace: dict[str, Any]) -> None:
    params = [p.detach().clone() for p in namespace["model"].parameters()]
    printed = run_example(key, namespace)
    if "Optimizer step at batch" in printed or "Pre-clip norm" in printed:
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(params, namespace["model"].parameters(), strict=True)
        )
        assert changed, "the example reported optimizer steps but the model did not change"


def test_manual_example_steps_at_windows_and_short_final_window(
    namespace: dict[str, Any],
) -> None:
    printed = run_example("00 Manual Gradient Accumulation", namespace)
    steps = [line for line in printed.splitlines() if line.startswith("Optimizer step")]
    # 11 batches, window 4: steps after batches 3, 7 and the final short window at 10.
    assert steps == [f"Optimizer step at batch {i}" for i in (3, 7, 10)] * 2
    acc = namespace["accumulator"]
    assert acc.effective_step == 6 and acc.stats.total_steps == 22
    assert not acc.stats.is_accumulating


def test_conflict_example_raises_the_guide_error(namespace: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as raised:
        run_example("03 PyTorch Lightning Integration", namespace)
    message = str(raised.value)
    for line in (
        "Gradient accumulation conflict detected!",
        "Manual accumulation_steps: 4",
        "Lightning accumulate_grad_batches: 4",
        "1. Set accumulation_steps=1 (let Lightning manage)",
        "2. Set trainer.accumulate_grad_batches=1 (use manual)",
        "3. Remove trainer parameter (disable Lightning)",
    ):
        assert line in message


def test_lightning_examples_report_the_guide_numbers(namespace: dict[str, Any]) -> None:
    printed = run_example("05 Effective Batch Size Calculation", namespace)
    assert printed.splitlines() == ["Effective batch: 32", "Effective batch: 32"]
    run_example("17 Example 2: Distributed Training with Lightning", namespace)
    assert namespace["accumulator"].effective_batch_size == 64


def test_checkpoint_example_resumes_step_counts(namespace: dict[str, Any]) -> None:
    before = namespace["accumulator"]
    expected = (before.effective_step, before.stats.current_accumulation)
    printed = run_example("07 Checkpointing and State Persistence", namespace)
    after = namespace["accumulator"]
    assert after is not before
    assert (after.effective_step, after.stats.current_accumulation) == expected
    assert printed.strip() == f"Resuming from step {expected[0]}"


def test_statistics_example_prints_the_documented_fields(namespace: dict[str, Any]) -> None:
    printed = run_example("08 Accumulation Statistics", namespace).splitlines()
    assert printed[:6] == [
        "Total steps: 1",
        "Optimizer steps: 0",
        "Current accumulation: 1",
        "Effective batch: 32",
        "Is accumulating: True",
        "Last grad norm: nan",
    ]


def test_metrics_example_commits_once_per_effective_step(namespace: dict[str, Any]) -> None:
    run_example("04 Integration with MetricsTracker", namespace)
    tracker = namespace["tracker"]
    tracker.flush()
    # 11 batches with window 4 and no is_final_batch: 2 steps closed, the open window's
    # batches log at step 2: three rows instead of eleven.
    assert tracker.last_written_step == 2


def test_api_reference_signature() -> None:
    params = inspect.signature(GradientAccumulator).parameters
    assert list(params)[:6] == [
        "optimizer",
        "accumulation_steps",
        "max_grad_norm",
        "scaler",
        "batch_size",
        "trainer",
    ]
    defaults = {name: params[name].default for name in list(params)[1:6]}
    assert defaults == {
        "accumulation_steps": 1,
        "max_grad_norm": 1.0,
        "scaler": None,
        "batch_size": 1,
        "trainer": None,
    }
    fields = set(inspect.signature(AccumulationStats).parameters)
    assert {
        "total_steps",
        "optimizer_steps",
        "current_accumulation",
        "effective_batch_size",
        "is_accumulating",
        "last_grad_norm",
    } <= fields


def test_placeholder_left_in_is_a_clear_error(namespace: dict[str, Any]) -> None:
    acc = GradientAccumulator(namespace["optimizer"], accumulation_steps=4)
    model = namespace["model"]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(accumfn.ConfigError, match="is_final_batch must be True or False"):
        acc.accumulate(model(namespace["batch"]), model, is_final_batch=...)  # type: ignore[arg-type]
    assert acc.stats.total_steps == 0 and math.isnan(acc.stats.last_grad_norm)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(after) == len(grads) and all(map(torch.equal, grads, after))
