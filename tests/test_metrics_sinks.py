"""TensorBoard and W&B without a login: real packages, files read back.

The TensorBoard event file is read with tensorboard's own ``EventAccumulator``. The W&B test
runs the metrics page's snippet as written in a process with no W&B login and no
``WANDB_MODE``, and reads the offline run back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from accumfn import JsonlSink, MetricsTracker, TensorBoardSink

from .test_metrics import _train, recorder, wandb_history

ROOT = Path(__file__).resolve().parents[1]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_tensorboard_event_file_holds_the_committed_rows(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    rows, sink = recorder()
    tracker = MetricsTracker(sinks=[sink, TensorBoardSink(tmp_path / "tb")])
    _train(tracker, micro_batches=10, window=4)
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == {"train/loss", "train/grad_norm"}
    for tag, points in scalars.items():
        expected = [(step, metrics[tag]) for step, metrics in rows]
        assert [step for step, _ in points] == [step for step, _ in expected] == [0, 1, 2]
        assert [value for _, value in points] == pytest.approx([v for _, v in expected])


def test_tensorboard_sink_that_never_writes_leaves_nothing(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    sink = TensorBoardSink(tmp_path / "tb")
    sink.flush()
    sink.close()
    assert not (tmp_path / "tb").exists()


def test_jsonl_sink_opens_its_file_at_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("kept\n")
    sink = JsonlSink(path)
    sink.flush()
    assert path.read_text() == "kept\n"  # made, not written: the file is untouched
    sink.write(3, {"a": 1.0})
    sink.close()
    assert path.read_text() == '{"_step": 3, "a": 1.0}\n'
    with pytest.raises(ValueError, match="closed"):
        sink.write(4, {"a": 2.0})


SETUP = """
import torch
from torch import nn
from accumfn import GradientAccumulator


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(self, batch):
        return self.net(batch).pow(2).mean()


torch.manual_seed(0)
model = Model()
loader = [torch.randn(8, 4) for _ in range(10)]
accumulator = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 4)
"""


def metrics_page_snippet() -> str:
    page = (ROOT / "docs" / "metrics.md").read_text()
    return re.findall(r"```python\n(.*?)```", page, re.S)[0]


def test_metrics_snippet_runs_as_written_without_a_wandb_login(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("WANDB_") and key not in ("NETRC",)
    }
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    code = textwrap.dedent(SETUP) + metrics_page_snippet()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "W&B has no login here, so this run logs offline to" in done.stderr
    assert "wandb login" in done.stderr and "wandb sync" in done.stderr
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    history = wandb_history(run_file)
    assert [step for step, _ in history] == [row["_step"] for row in jsonl] == [0, 1, 2]
    for (_, metrics), row in zip(history, jsonl, strict=True):
        assert metrics == {k: v for k, v in row.items() if k != "_step"}
