"""MetricsTracker: one row per effective step, strictly increasing, to JSONL, callables and W&B.

W&B runs for real in offline mode; its run file (LevelDB-log framed protobuf records) is read
back and its history rows compared with the expected (step, metrics).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import accumfn
from accumfn import (
    CallableSink,
    ConfigError,
    GradientAccumulator,
    JsonlSink,
    MetricsStepError,
    MetricsTracker,
)

from .guide_snippets import GUIDE
from .support import HostSyncCounter

ROOT = Path(__file__).resolve().parents[1]


# -- reading a W&B offline run back ----------------------------------------------------------
_BLOCK = 32768
_HEADER = struct.Struct("<4sHB")  # ":W&B", 0xBEE1, version
_CHUNK = struct.Struct("<IHB")  # crc32, length, type


def _wandb_payloads(path: Path) -> list[bytes]:
    data = path.read_bytes()
    ident, magic, _ = _HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    payloads, pending, pos = [], b"", _HEADER.size
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if left < _CHUNK.size or (kind == 0 and length == 0):  # block trailer
            pos += left
            continue
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at {pos}"
        pos += _CHUNK.size + length
        if kind == 1:  # FULL
            payloads.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            payloads.append(pending + chunk)
    return payloads


def wandb_history(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The (``_step``, user metrics) of every history record of an offline run file."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _wandb_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            "/".join(item.nested_key) or item.key: json.loads(item.value_json)
            for item in record.history.item
        }
        step = items.pop("_step")
        assert record.history.step.num == step
        rows.append((step, {k: v for k, v in items.items() if not k.startswith("_")}))
    return rows


def wandb_config(path: Path) -> dict[str, Any]:
    """The config an offline run file records (its config updates, in order)."""
    from wandb.proto import wandb_internal_pb2

    config: dict[str, Any] = {}
    for payload in _wandb_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return config


def run_file(wandb_dir: Path, run_id: str) -> Path:
    """The run file of a finished offline run, once W&B has written all of it."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # waits for the W&B service to write everything
    (found,) = wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    return found


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("wandb")  # the suite also runs without wandb (tests/test_no_wandb.py)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def recorder() -> tuple[list[tuple[int, dict[str, float]]], CallableSink]:
    rows: list[tuple[int, dict[str, float]]] = []
    return rows, CallableSink(lambda step, metrics: rows.append((step, metrics)))


# -- merging and committing -----------------------------------------------------------------
def test_rows_merge_within_a_step_and_commit_when_the_step_advances(tmp_path: Path) -> None:
    rows, sink = recorder()
    jsonl = tmp_path / "m.jsonl"
    tracker = MetricsTracker(sinks=[sink, JsonlSink(jsonl)])
    tracker.log_scalar("loss", 1.0, step=0)
    tracker.log_scalar("loss", 2.0, step=0)
    tracker.log_scalar("loss", 6.0, step=0)
    assert rows == []  # nothing committed while step 0 is open
    tracker.log_scalar("loss", 4.0, step=1)
    assert rows == [(0, {"loss": 3.0})]
    tracker.log_scalar("lr", 0.5, step=1)
    tracker.log_scalar("loss", 5.0, step=3)  # steps may jump
    tracker.close()
    expected = [(0, {"loss": 3.0}), (1, {"loss": 4.0, "lr": 0.5}), (3, {"loss": 5.0})]
    assert rows == expected
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines == [{"_step": step, **metrics} for step, metrics in expected]


@pytest.mark.parametrize(
    ("how", "expected"), [("mean", 2.5), ("sum", 10.0), ("last", 4.0)], ids=str
)
def test_reductions(how: str, expected: float) -> None:
    rows, sink = recorder()
    with MetricsTracker(sinks=[sink], reduce=how) as tracker:  # type: ignore[arg-type]
        for value in (1.0, 2.0, 3.0, 4.0):
            tracker.log_scalar("x", value, step=7)
    assert rows == [(7, {"x": expected})]


def test_reduce_by_name_overrides_the_default() -> None:
    rows, sink = recorder()
    with MetricsTracker(sinks=[sink], reduce_by_name={"tokens": "sum", "lr": "last"}) as t:
        for value in (1.0, 3.0):
            t.log({"loss": value, "tokens": 10 * value, "lr": value / 10}, step=0)
    assert rows == [(0, {"loss": 2.0, "tokens": 40.0, "lr": 0.3})]


def test_tensor_values_are_reduced_and_read_at_commit() -> None:
    rows, sink = recorder()
    with MetricsTracker(sinks=[sink]) as tracker:
        tracker.log_scalar("loss", torch.tensor(1.0, requires_grad=True) * 1, step=0)
        tracker.log_scalar("loss", torch.tensor([3.0], dtype=torch.float16), step=0)
        tracker.log_scalar("loss", 2.0, step=0)
        tracker.log_scalar("n", torch.tensor(4), step=0)
    assert rows == [(0, {"loss": 2.0, "n": 4.0})]
    assert all(type(v) is float for v in rows[0][1].values())


def test_tensor_values_are_not_read_on_the_hot_path() -> None:
    # A meta tensor has no data: any read fails. Logging it succeeds; only the commit reads.
    rows, sink = recorder()
    tracker = MetricsTracker(sinks=[sink])
    for _ in range(8):
        tracker.log_scalar("loss", torch.ones((), device="meta"), step=0)
    with pytest.raises(NotImplementedError, match="meta"):
        tracker.log_scalar("loss", 1.0, step=1)
    assert rows == []


def test_tensor_values_cost_one_host_read_per_committed_row() -> None:
    rows, sink = recorder()
    tracker = MetricsTracker(sinks=[sink], reduce_by_name={"n": "sum", "lr": "last"})
    values = torch.arange(1.0, 9.0)
    with HostSyncCounter() as counter:
        for index in range(4):  # four micro-batches of window 0: no read
            tracker.log({"loss": values[index], "n": values[index] * 2, "lr": 0.1}, step=0)
    assert counter.calls == []
    with HostSyncCounter() as counter:
        tracker.log_scalar("loss", values[4], step=1)  # step 0 commits: one read for the row
    assert counter.calls == ["tolist"]
    tracker.close()
    assert rows == [(0, {"loss": 2.5, "n": 20.0, "lr": 0.1}), (1, {"loss": 5.0})]


def test_a_step_going_backwards_raises_and_keeps_the_tracker_usable() -> None:
    rows, sink = recorder()
    tracker = MetricsTracker(sinks=[sink])
    tracker.log_scalar("loss", 1.0, step=2)
    tracker.log_scalar("loss", 2.0, step=3)
    with pytest.raises(MetricsStepError, match="step 1, but step 3 was already logged"):
        tracker.log_scalar("loss", 9.0, step=1)
    tracker.flush()
    with pytest.raises(MetricsStepError, match="strictly increase"):
        tracker.log_scalar("loss", 9.0, step=3)  # step 3 was written by flush()
    tracker.log_scalar("loss", 4.0, step=4)
    tracker.close()
    assert rows == [(2, {"loss": 1.0}), (3, {"loss": 2.0}), (4, {"loss": 4.0})]


def test_on_stale_step_warn_drops_the_value() -> None:
    rows, sink = recorder()
    tracker = MetricsTracker(sinks=[sink], on_stale_step="warn")
    tracker.log_scalar("loss", 1.0, step=5)
    with pytest.warns(UserWarning, match="dropped"):
        tracker.log_scalar("loss", 100.0, step=4)
    tracker.close()
    assert rows == [(5, {"loss": 1.0})]


@pytest.mark.parametrize(
    ("name", "value", "step", "match"),
    [
        ("loss", 1.0, -1, "step must be an int >= 0"),
        ("loss", 1.0, 1.5, "step must be an int"),
        ("loss", 1.0, True, "step must be an int"),
        ("", 1.0, 0, "non-empty str"),
        ("_step", 1.0, 0, "reserves"),
        ("loss", "1.0", 0, "must be a number"),
        ("loss", True, 0, "must be a number"),
        ("loss", torch.ones(2), 0, "log a scalar"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    name: str, value: object, step: object, match: str
) -> None:
    rows, sink = recorder()
    tracker = MetricsTracker(sinks=[sink])
    tracker.log_scalar("loss", 1.0, step=0)
    with pytest.raises(ConfigError, match=match):
        tracker.log_scalar(name, value, step)  # type: ignore[arg-type]
    tracker.close()
    assert rows == [(0, {"loss": 1.0})]


def test_log_checks_every_value_before_adding_any() -> None:
    rows, sink = recorder()
    tracker = MetricsTracker(sinks=[sink])
    with pytest.raises(ConfigError, match="'b' must be a number"):
        tracker.log({"a": 1.0, "b": None}, step=0)  # type: ignore[dict-item]
    tracker.close()
    assert rows == []


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reduce must be one of"):
        MetricsTracker(sinks=[], reduce="median")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"gradient_accumulation_steps must be >= 1.*or None when the caller"
    ):
        MetricsTracker(sinks=[], gradient_accumulation_steps=0)
    with pytest.raises(ConfigError, match="CallableSink"):
        MetricsTracker(sinks=[print])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="on_stale_step"):
        MetricsTracker(sinks=[], on_stale_step="ignore")  # type: ignore[arg-type]


def test_close_is_idempotent_and_logging_after_it_is_an_error(tmp_path: Path) -> None:
    tracker = MetricsTracker(jsonl_path=tmp_path / "default.jsonl")
    tracker.log_scalar("a", 1.0, step=0)
    tracker.close()
    tracker.close()
    with pytest.raises(accumfn.CallOrderError, match="closed"):
        tracker.log_scalar("a", 1.0, step=1)
    assert (tmp_path / "default.jsonl").read_text() == '{"_step": 0, "a": 1.0}\n'


def test_jsonl_sink_appends_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.jsonl"
    with MetricsTracker(sinks=[JsonlSink(path)]) as tracker:
        tracker.log_scalar("a", 1.0, step=0)
    with MetricsTracker(sinks=[JsonlSink(path, append=True)]) as tracker:
        tracker.log_scalar("a", 2.0, step=1)
    assert path.read_text().splitlines() == ['{"_step": 0, "a": 1.0}', '{"_step": 1, "a": 2.0}']


# -- with the accumulator -------------------------------------------------------------------
def _train(tracker: MetricsTracker, micro_batches: int, window: int) -> list[float]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = GradientAccumulator(optimizer, accumulation_steps=window, batch_size=2)
    losses = []
    for index in range(micro_batches):
        x = torch.randn(2, 3)
        step = accumulator.effective_step  # the window this micro-batch belongs to
        loss = model(x).pow(2).mean()
        losses.append(loss.item())
        tracker.log_scalar("train/loss", loss.detach(), step=step)
        if accumulator.accumulate(loss, model, is_final_batch=index == micro_batches - 1):
            tracker.log_scalar("train/grad_norm", accumulator.stats.last_grad_norm, step=step)
    tracker.close()
    return losses


def _expected_rows(losses: list[float], window: int) -> list[tuple[int, list[float]]]:
    return [
        (start // window, losses[start : start + window]) for start in range(0, len(losses), window)
    ]


def test_one_row_per_window_with_the_mean_micro_batch_loss() -> None:
    rows, sink = recorder()
    losses = _train(MetricsTracker(sinks=[sink]), micro_batches=10, window=4)
    expected = _expected_rows(losses, 4)
    assert [step for step, _ in rows] == [0, 1, 2]
    for (step, metrics), (want_step, window_losses) in zip(rows, expected, strict=True):
        assert step == want_step
        assert set(metrics) == {"train/loss", "train/grad_norm"}
        assert metrics["train/loss"] == pytest.approx(sum(window_losses) / len(window_losses))
        assert metrics["train/grad_norm"] > 0


# -- W&B, for real (offline) ------------------------------------------------------------------
def test_wandb_offline_history_equals_the_committed_rows(offline_wandb: Path) -> None:
    rows, sink = recorder()
    tracker = MetricsTracker(
        use_wandb=True,
        gradient_accumulation_steps=4,
        sinks=[sink],
        wandb_init={"project": "accumfn-test", "id": "histrows"},
    )
    losses = _train(tracker, micro_batches=10, window=4)
    history = wandb_history(run_file(offline_wandb, "histrows"))
    assert len(rows) == 3
    assert history == rows  # same steps, same metrics, exactly
    assert [step for step, _ in history] == [0, 1, 2]
    for (_, metrics), (_, window_losses) in zip(history, _expected_rows(losses, 4), strict=True):
        assert metrics["train/loss"] == pytest.approx(sum(window_losses) / len(window_losses))


@pytest.mark.parametrize("steps", [None, 4])
def test_wandb_config_records_the_planned_window_or_none(
    offline_wandb: Path, steps: int | None
) -> None:
    """``gradient_accumulation_steps=None`` (windows the caller closes) is accepted and
    recorded as such, not as the default 1."""
    run_id = f"planned{steps}"
    tracker = MetricsTracker(
        use_wandb=True,
        gradient_accumulation_steps=steps,
        wandb_init={"project": "accumfn-test", "id": run_id},
    )
    assert tracker.gradient_accumulation_steps == steps
    tracker.log_scalar("a", 1.0, step=0)
    tracker.close()
    config = wandb_config(run_file(offline_wandb, run_id))
    assert config["gradient_accumulation_steps"] == steps


def test_wandb_sink_uses_the_active_run_and_leaves_it_open(offline_wandb: Path) -> None:
    import wandb

    run = wandb.init(project="accumfn-test", id="activerun")
    try:
        with MetricsTracker(use_wandb=True) as tracker:
            tracker.log_scalar("a", 1.0, step=0)
            tracker.log_scalar("a", 3.0, step=0)
            tracker.log_scalar("a", 5.0, step=2)
        assert wandb.run is run  # not finished by the tracker
        run.log({"b": 1.0}, step=3)
    finally:
        run.finish()
    history = wandb_history(run_file(offline_wandb, "activerun"))
    assert history == [(0, {"a": 2.0}), (2, {"a": 5.0}), (3, {"b": 1.0})]


# -- the guide's examples, only the import changed -------------------------------------------
GUIDE_SETUP = """
import os
import torch
from torch import nn
from accumfn import GradientAccumulator
from accumfn import MetricsTracker

torch.manual_seed(0)
seen = []

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(self, batch):
        loss = self.net(batch).pow(2).mean()
        seen.append(loss.item())
        return loss

model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
dataloader = [torch.randn(8, 4) for _ in range(10)]
epochs = 2
"""

GUIDE_INTEGRATION = GUIDE["04 Integration with MetricsTracker"]
GUIDE_EXAMPLE_3 = GUIDE["18 Example 3: Metrics Logging with Accumulation"]


def _means_by_step(losses: list[float], window: int) -> dict[int, float]:
    """The guide logs after accumulate: micro-batch i (1-based) lands at step i // window."""
    groups: dict[int, list[float]] = {}
    for index, value in enumerate(losses, start=1):
        groups.setdefault(index // window, []).append(value)
    return {step: sum(values) / len(values) for step, values in groups.items()}


def test_guide_examples_run_against_real_wandb(offline_wandb: Path) -> None:
    script = "\n".join(
        [
            GUIDE_SETUP,
            "os.environ['WANDB_RUN_ID'] = 'guideint'",
            GUIDE_INTEGRATION,
            "tracker.close()",  # the next example starts its own run, with a new id:
            "import wandb; wandb.teardown()",  # W&B reads WANDB_RUN_ID once per session
            "print('SEEN1', seen); seen.clear()",
            "os.environ['WANDB_RUN_ID'] = 'guideex3'",
            GUIDE_EXAMPLE_3,
            "print('SEEN2', seen)",
            # no close(): the last step is committed at interpreter exit
        ]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()}
    seen1, seen2 = json.loads(lines["SEEN1"]), json.loads(lines["SEEN2"])

    integration = wandb_history(run_file(offline_wandb, "guideint"))
    assert [step for step, _ in integration] == [0, 1, 2]  # 10 micro-batches, 3 rows not 10
    assert {s: m["train/batch_loss"] for s, m in integration} == _means_by_step(seen1, 4)

    example3 = wandb_history(run_file(offline_wandb, "guideex3"))
    assert [step for step, _ in example3] == [0, 1, 2, 3, 4, 5]  # 20 micro-batches, 5 windows
    assert {s: m["train/batch_loss"] for s, m in example3} == _means_by_step(seen2, 4)
    assert "train/grad_norm" not in example3[0][1]
    assert all(m["train/grad_norm"] > 0 for _, m in example3[1:])


# -- import cost ------------------------------------------------------------------------------
def test_importing_accumfn_does_not_import_wandb() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys, accumfn, accumfn.metrics; print('wandb' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "False", done.stderr
