"""Ranks built with different settings on 2 gloo DDP ranks: every rank raises, naming them.

Each rank's window header carries a digest of the settings that change the update
(``max_grad_norm``, ``skip_nonfinite``, ``accum_dtype``, ``sync_every_micro_step``, the
kind of schedule); ranks whose digests differ raise ``RankMismatchError`` on every rank at
the first window's exchange, before its boundary backward, naming each rank's value, and
a resume from checkpoints under different settings is a ``CheckpointError`` on every rank.
Nothing is stepped either way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import accumfn

from ._dist_utils import run_ranks, token_loss, token_model
from .test_caller_closed import rollouts, sgd

SETTINGS_APART: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "max_grad_norm": (
        {"max_grad_norm": 1.0},
        {"max_grad_norm": None},
        "rank 0 clips at max_grad_norm=1.0, rank 1 at None",
    ),
    "skip_nonfinite": (
        {"skip_nonfinite": True},
        {"skip_nonfinite": False},
        "rank 0 has skip_nonfinite=True, rank 1 has False",
    ),
    "accum_dtype": (
        {"accum_dtype": torch.float64},
        {},
        "rank 0 has accum_dtype=torch.float64, rank 1 has None",
    ),
    "sync_every_micro_step": (
        {"sync_every_micro_step": True},
        {},
        "rank 0 has sync_every_micro_step=True, rank 1 has False",
    ),
    "steps": ({"steps": {0: 3}}, {}, "rank 0 has steps={epoch: steps}, rank 1 has an int"),
}
"""Rank 0's and rank 1's keywords, and what the error says."""


def _build(rank: int, name: str, functional: bool) -> tuple[Any, Any, Any, Any]:
    model = DistributedDataParallel(token_model(100))
    optimizer = sgd(model)
    mine = dict(SETTINGS_APART[name][rank])
    steps = mine.pop("steps", 3)
    mine.setdefault("max_grad_norm", None)
    if functional:
        state = accumfn.init(steps, **mine)
        accumfn.prepare_forward(state, model)
        return model, optimizer, state, None
    acc = accumfn.GradientAccumulator(optimizer, steps, **mine)
    acc.prepare(model)
    return model, optimizer, None, acc


def _apart(rank: int, name: str, functional: bool) -> dict[str, Any]:
    """Train one window of 3 micro-batches; it must raise, and change nothing stepped."""
    model, optimizer, state, acc = _build(rank, name, functional)
    initial = [p.detach().clone() for p in model.module.parameters()]
    try:
        for batch in rollouts(31, [(3, 3)], ragged=False)[0][rank]:
            loss = token_loss(model, batch, "mean")
            if acc is not None:
                acc.accumulate(loss, model)
            else:
                state, stepped = accumfn.accumulate(state, loss, model)
                if stepped:
                    state = accumfn.apply_step(state, optimizer, model)
    except accumfn.AccumError as exc:
        after = [p.detach().clone() for p in model.module.parameters()]
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "params_unchanged": all(torch.equal(a, b) for a, b in zip(initial, after, strict=True)),
            "optimizer_state": len(optimizer.state),
        }
    return {"type": None}


def _resume_apart(rank: int, folder: str) -> dict[str, Any]:
    """Checkpoints at a window boundary, loaded by ranks clipping differently."""
    model = DistributedDataParallel(token_model(100))
    acc = accumfn.GradientAccumulator(sgd(model), 2, max_grad_norm=None)
    acc.prepare(model)
    for batch in rollouts(32, [(2, 2)], ragged=False)[0][rank]:
        acc.accumulate(token_loss(model, batch, "mean"), model)
    path = Path(folder) / f"accum-rank{rank}.pt"
    torch.save(acc.state_dict(), path)
    resumed = accumfn.GradientAccumulator(sgd(model), 2, max_grad_norm=None if rank == 0 else 0.5)
    resumed.prepare(model)
    before = resumed.state
    try:
        resumed.load_state_dict(torch.load(path, weights_only=True), allow_config_change=True)
    except accumfn.AccumError as exc:
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "unchanged": resumed.state == before,
        }
    return {"type": None}


CASES = [(name, functional) for name in SETTINGS_APART for functional in (False, True)]


def _worker(rank: int, world: int, folder: str) -> dict[str, Any]:
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "30"
    results: dict[str, Any] = {
        f"{name}-{functional}": _apart(rank, name, functional) for name, functional in CASES
    }
    results["resume"] = _resume_apart(rank, folder)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        return run_ranks(_worker, folder, timeout=240)


@pytest.mark.parametrize(("name", "functional"), CASES)
def test_ranks_built_apart_raise_on_every_rank_naming_the_setting(
    ranks: list[dict[str, Any]], name: str, functional: bool
) -> None:
    for result in ranks:
        run = result[f"{name}-{functional}"]
        assert run["type"] == "RankMismatchError", run
        assert SETTINGS_APART[name][2] in run["message"]
        assert "the ranks would step apart" in run["message"]
        assert run["params_unchanged"]
        assert run["optimizer_state"] == 0  # no optimizer stepped


def test_a_resume_under_other_settings_is_refused_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        run = result["resume"]
        assert run["type"] == "CheckpointError"
        assert "rank 0 clips at max_grad_norm=None, rank 1 at 0.5" in run["message"]
        assert "Nothing was loaded" in run["message"]
        assert run["unchanged"]
