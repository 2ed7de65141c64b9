"""MetricsTracker on 2 gloo ranks: rank 0 writes by default; per_rank=True, one file per rank.

Each rank logs values that name it (rank * 1000 + step), so a file shows who wrote it. The
sinks are real: JSONL files, a TensorBoard event file read back with EventAccumulator, and a
W&B run in offline mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from accumfn import JsonlSink, MetricsStepError, MetricsTracker, TensorBoardSink

from ._dist_utils import run_ranks
from .test_metrics_sinks import read_scalars

STEPS = 3


def _log(tracker: MetricsTracker, rank: int, steps: range) -> None:
    for step in steps:
        tracker.log_scalar("value", float(rank * 1000 + step), step=step)


def _rank_zero_worker(rank: int, world: int, out: str) -> dict[str, Any]:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=out)
    folder = Path(out)
    # Rank 0 makes its tracker and writes first; rank 1 makes the same sinks only after:
    # a sink that truncated its file on a silent rank would erase rank 0's rows.
    for turn, run_id in enumerate(["rankzero", "rankone"]):
        if rank == turn:
            tracker = MetricsTracker(
                use_wandb=True,
                sinks=[JsonlSink(folder / "shared.jsonl"), TensorBoardSink(folder / "tb")],
                wandb_init={"project": "accumfn-test", "id": run_id},
            )
            _log(tracker, rank, range(STEPS))
            tracker.flush()
        dist.barrier()
    _log(tracker, rank, range(STEPS, 2 * STEPS))
    stale = None
    try:
        tracker.log_scalar("value", 0.0, step=0)  # a step already written: refused everywhere
    except MetricsStepError as error:
        stale = str(error)
    tracker.close()
    with MetricsTracker(jsonl_path=folder / "default.jsonl") as default:
        _log(default, rank, range(STEPS))
    return {"writes": tracker.writes, "rank": tracker.rank, "stale": stale}


def _per_rank_worker(rank: int, world: int, out: str) -> dict[str, Any]:
    folder = Path(out)
    with MetricsTracker(jsonl_path=folder / "metrics.jsonl", per_rank=True) as tracker:
        _log(tracker, rank, range(STEPS))
    with MetricsTracker(sinks=[TensorBoardSink(folder / f"tb-rank{rank}")], per_rank=True) as board:
        _log(board, rank, range(STEPS))
    return {"writes": tracker.writes, "rank": tracker.rank}


def _rows(path: Path) -> list[tuple[int, float]]:
    return [(row["_step"], row["value"]) for row in map(json.loads, path.read_text().splitlines())]


def test_only_rank_zero_writes_by_default(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from .test_metrics import wandb_history

    results = run_ranks(_rank_zero_worker, str(tmp_path), timeout=240)
    rank0 = [(step, float(step)) for step in range(2 * STEPS)]
    assert _rows(tmp_path / "shared.jsonl") == rank0
    assert _rows(tmp_path / "default.jsonl") == rank0[:STEPS]
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["default.jsonl", "shared.jsonl"]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert read_scalars(tmp_path / "tb") == {"value": rank0}
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].endswith("-rankzero"), runs
    (run_file,) = (tmp_path / "wandb" / runs[0]).glob("run-rankzero.wandb")
    assert wandb_history(run_file) == [(step, {"value": value}) for step, value in rank0]
    assert [(r["rank"], r["writes"]) for r in results] == [(0, True), (1, False)]
    assert all("already logged" in str(r["stale"]) for r in results)  # same error on both


def test_per_rank_writes_one_file_per_rank(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    results = run_ranks(_per_rank_worker, str(tmp_path), timeout=240)
    assert [(r["rank"], r["writes"]) for r in results] == [(0, True), (1, True)]
    for rank in (0, 1):
        mine = [(step, float(rank * 1000 + step)) for step in range(STEPS)]
        assert _rows(tmp_path / f"metrics.rank{rank}.jsonl") == mine
        assert read_scalars(tmp_path / f"tb-rank{rank}") == {"value": mine}
    assert not (tmp_path / "metrics.jsonl").exists()
