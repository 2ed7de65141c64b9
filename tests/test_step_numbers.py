"""One step numbering (docs/metrics.md, "Step numbers"): a window's step counts from 0 and is
``effective_step`` while the window is open; the counters count windows closed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import accumfn
from accumfn import CallableSink, GradientAccumulator, JsonlSink, MetricsTracker


def _schedule(asked: list[int]) -> Callable[[int], int]:
    def window(step: int) -> int:
        asked.append(step)
        return 2 if step < 2 else 3

    return window


def test_a_window_has_one_step_number_in_the_schedule_the_logs_and_the_counters(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    asked: list[int] = []
    accumulator = GradientAccumulator(optimizer, _schedule(asked), max_grad_norm=None)
    written: list[int] = []
    tracker = MetricsTracker(
        sinks=[
            JsonlSink(tmp_path / "metrics.jsonl"),
            CallableSink(lambda step, _: written.append(step)),
        ]
    )
    closed = []
    for index in range(10):  # windows of 2, 2, 3 and 3
        step = accumulator.effective_step
        loss = model(torch.randn(4, 3)).pow(2).mean()
        tracker.log_scalar("train/loss", loss.detach(), step=step)
        if accumulator.accumulate(loss, model, is_final_batch=index == 9):
            closed.append(step)
            stats = accumulator.stats
            assert accumulator.effective_step == stats.optimizer_steps == step + 1
    tracker.close()

    assert closed == [0, 1, 2, 3]
    assert asked[:4] == [0, 1, 2, 3]  # the schedule sizes each window by its step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["_step"] for row in rows] == written == [0, 1, 2, 3]


def test_the_functional_state_numbers_windows_as_the_accumulator() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    asked: list[int] = []
    state = accumfn.init(_schedule(asked))
    closed = []
    for index in range(10):
        step = state.effective_step
        loss = model(torch.randn(4, 3)).pow(2).mean()
        state, stepped = accumfn.accumulate(state, loss, model, is_final_batch=index == 9)
        if stepped:
            state = accumfn.apply_step(state, optimizer, model)
            closed.append(step)
            assert state.effective_step == state.optimizer_steps == step + 1
    assert closed == asked[:4] == [0, 1, 2, 3]


def test_the_demo_plot_numbers_epochs_from_0_as_its_summary_does() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from accumfn.cli.demo._report import _mark_windows
    from accumfn.cli.demo._runs import StepRecord

    rows = [
        StepRecord("regression", step, epoch, 4, False, 1.0, 1.0, 0.0, 0.0)
        for step, epoch in [(0, 0), (1, 0), (2, 1), (3, 1)]
    ]
    figure, ax = plt.subplots()
    try:
        _mark_windows(ax, rows)
        assert [text.get_text() for text in ax.texts] == ["epoch 1"]
    finally:
        plt.close(figure)
