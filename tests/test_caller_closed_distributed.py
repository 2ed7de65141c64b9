"""Windows the caller closes (``steps=None``) under DDP and FSDP2 on 2 gloo ranks.

Under DDP each rank puts its own number of micro-batches in each window (1 to 64); the
update equals one large batch of all micro-batches of all ranks: in mean mode the mean of
their means, in item mode the mean over the items of both ranks. Under FSDP2, whose
forwards are collectives, the ranks run the same number per window. A mid-window checkpoint taken at
different micro-steps on each rank resumes exactly; ranks that do not close together
raise on every rank. All scenarios run in one spawned pair (``_worker``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import accumfn

from ._dist_utils import (
    CollectiveCounter,
    full_params,
    items,
    run_ranks,
    sharded_token_model,
    token_loss,
    token_model,
)
from .test_caller_closed import large_batch, rollouts, sgd

LENGTHS = [(3, 5), (1, 2), (64, 1), (2, 2)]
"""Micro-batches of each window on (rank 0, rank 1)."""
FSDP2_LENGTHS = [(3, 3), (1, 1), (6, 6)]
"""FSDP2 gathers the parameters in every forward: the ranks run the same number."""
RESUME_LENGTHS = [(4, 3), (5, 6), (2, 3)]
CUT = {0: 2, 1: 4}
"""Each rank checkpoints inside window 1, after this many of its micro-batches."""

SCENARIOS: dict[str, dict[str, Any]] = {
    "mean-functional": {"api": "functional", "items": False},
    "items-functional-clip": {"api": "functional", "items": True, "clip": 0.05},
    "mean-object": {"api": "object", "items": False},
    "items-object": {"api": "object", "items": True},
    "mean-flush": {"api": "flush", "items": False},
    "items-flush": {"api": "flush", "items": True},
    "fsdp2-mean": {"api": "object", "items": False, "fsdp2": True},
    "fsdp2-items": {"api": "functional", "items": True, "fsdp2": True},
}


def _ddp(rank: int, counter: CollectiveCounter | None = None) -> DistributedDataParallel:
    ddp = DistributedDataParallel(token_model(rank + 100))  # DDP broadcasts rank 0's weights
    if counter is not None:
        ddp.register_comm_hook(None, lambda group, bucket: counter.hook(group, bucket))
    return ddp


def _train(rank: int, spec: dict[str, Any], data: Any) -> dict[str, Any]:
    counter = CollectiveCounter()
    model = sharded_token_model(100) if spec.get("fsdp2") else _ddp(rank, counter)
    optimizer = sgd(model)
    api, item_mode, clip = spec["api"], spec["items"], spec.get("clip")
    acc = None
    state = accumfn.init(None, max_grad_norm=clip)
    if api == "functional":
        accumfn.prepare_forward(state, model)
    else:
        acc = accumfn.GradientAccumulator(optimizer, None, max_grad_norm=clip)
        acc.prepare(model)
    params = []
    with counter.spy():
        for w, window in enumerate(data):
            counter.window = w
            batches = window[rank]
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1 and api != "flush"
                loss = token_loss(model, batch, "sum" if item_mode else "mean")
                num_items = items(batch) if item_mode else None
                if acc is None:
                    state, stepped = accumfn.accumulate(
                        state, loss, model, is_final_batch=last, num_items=num_items
                    )
                    if stepped:
                        state = accumfn.apply_step(state, optimizer, model)
                else:
                    stepped = acc.accumulate(loss, model, is_final_batch=last, num_items=num_items)
                assert stepped == last
            if api == "flush":
                assert acc is not None and acc.flush()
            params.append(
                full_params(model.module if isinstance(model, DistributedDataParallel) else model)
            )
    final = acc.state if acc is not None else state
    return {
        "params": params,
        "optimizer_steps": final.optimizer_steps,
        "total_micro_steps": final.total_micro_steps,
        **counter.summary(),
    }


def _continue(
    model: nn.Module,
    acc: accumfn.GradientAccumulator,
    data: Any,
    rank: int,
    start: tuple[int, int],
    stop: tuple[int, int] | None = None,
) -> None:
    for w, window in enumerate(data):
        batches = window[rank]
        for m, batch in enumerate(batches):
            if (w, m) < start or (stop is not None and (w, m) >= stop):
                continue
            loss = token_loss(model, batch, "mean")
            acc.accumulate(loss, model, is_final_batch=m == len(batches) - 1)


def _resume(rank: int, folder: str) -> dict[str, Any]:
    """Checkpoint inside window 1 at a different micro-step on each rank, each rank into a
    file of its own; resume into new objects; train to the end."""
    data = rollouts(12, RESUME_LENGTHS, ragged=False)
    model = _ddp(rank)
    acc = accumfn.GradientAccumulator(sgd(model), None, max_grad_norm=None)
    acc.prepare(model)
    cut = (1, CUT[rank])
    _continue(model, acc, data, rank, (0, 0), stop=cut)
    path = Path(folder) / f"accum-rank{rank}.pt"
    optimizer = acc.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    accumfn.save_checkpoint(
        {
            "model": model.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "acc": acc.state_dict(),
        },
        path,
    )
    saved_micro_step = acc.state.micro_step

    fresh = _ddp(rank + 10)
    fresh_optimizer = sgd(fresh)
    resumed = accumfn.GradientAccumulator(fresh_optimizer, None, max_grad_norm=None)
    resumed.prepare(fresh)
    saved = accumfn.load_checkpoint(path)
    fresh.module.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["acc"])
    _continue(fresh, resumed, data, rank, cut)
    return {
        "saved_micro_step": saved_micro_step,
        "params": [p.detach().clone() for p in fresh.module.parameters()],
        "reference": large_batch(token_model(100), data)["params"][-1],
    }


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _planned_on_one_rank(rank: int) -> dict[str, Any]:
    """Rank 0 closes its windows itself, rank 1 plans windows of 2."""
    model = _ddp(rank)
    before = [p.detach().clone() for p in model.parameters()]
    acc = accumfn.GradientAccumulator(sgd(model), None if rank == 0 else 2, max_grad_norm=None)
    acc.prepare(model)
    result: dict[str, Any] = {"type": None}
    try:
        for i, batch in enumerate(rollouts(13, [(2, 2)], ragged=False)[0][rank]):
            acc.accumulate(token_loss(model, batch, "mean"), model, is_final_batch=i == 1)
    except accumfn.AccumError as exc:
        result = _error(exc)
    after = [p.detach().clone() for p in model.parameters()]
    result["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return result


def _closing_alone(rank: int) -> dict[str, Any]:
    """Rank 0 closes a window while rank 1, with nothing accumulated, flushes."""
    model = _ddp(rank)
    acc = accumfn.GradientAccumulator(sgd(model), None, max_grad_norm=None)
    acc.prepare(model)
    try:
        if rank == 0:
            for i, batch in enumerate(rollouts(14, [(2, 0)], ragged=False)[0][0]):
                acc.accumulate(token_loss(model, batch, "mean"), model, is_final_batch=i == 1)
        else:
            acc.flush()
    except accumfn.AccumError as exc:
        return _error(exc)
    return {"type": None}


def _waiting_alone(rank: int) -> dict[str, Any]:
    """Rank 0 closes a window, rank 1 never does: rank 0's header waits, then says why."""
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "3"
    model = token_model(100)
    state = accumfn.init(None)
    accumfn.prepare_forward(state, model, process_group=dist.new_group([0, 1]))
    if rank == 1:
        time.sleep(8)  # busy elsewhere, longer than the timeout
        return {"type": None}
    batch = rollouts(15, [(1, 0)], ragged=False)[0][0][0]
    try:
        accumfn.accumulate(state, token_loss(model, batch, "mean"), model, is_final_batch=True)
    except accumfn.AccumError as exc:
        return _error(exc)
    return {"type": None}


def _worker(rank: int, world: int, folder: str) -> dict[str, Any]:
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "30"
    results: dict[str, Any] = {}
    for name, spec in SCENARIOS.items():
        lengths = FSDP2_LENGTHS if spec.get("fsdp2") else LENGTHS
        data = rollouts(11, lengths, ragged=spec["items"])
        results[name] = _train(rank, spec, data)
        results[name]["reference"] = large_batch(
            token_model(100), data, max_grad_norm=spec.get("clip")
        )["params"]
    results["resume"] = _resume(rank, folder)
    results["planned-on-one-rank"] = _planned_on_one_rank(rank)
    results["closing-alone"] = _closing_alone(rank)
    results["waiting-alone"] = _waiting_alone(rank)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        return run_ranks(_worker, folder, timeout=300)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_ranks_with_their_own_micro_batch_counts_equal_the_large_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for rank, result in enumerate(ranks):
        run = result[name]
        for got, want in zip(run["params"], run["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        windows = FSDP2_LENGTHS if SCENARIOS[name].get("fsdp2") else LENGTHS
        assert run["optimizer_steps"] == len(windows)
        assert run["total_micro_steps"] == sum(lengths[rank] for lengths in windows)


def test_one_header_and_one_reduction_per_window(ranks: list[dict[str, Any]]) -> None:
    """No backward reduces (no window has a planned end): the window's gradients are
    averaged once after its last backward, with the header exchanged before it."""
    for result in ranks:
        run = result["mean-functional"]
        assert run["buckets"] == []
        assert [w for w, _, _ in run["all_gathers"]] == list(range(len(LENGTHS)))
        per_window = [sum(1 for w, _, _ in run["all_reduces"] if w == i) for i in range(4)]
        assert per_window == [2] * len(LENGTHS)  # which grads exist, then one bucket


def test_a_mid_window_checkpoint_at_different_micro_steps_resumes_exactly(
    ranks: list[dict[str, Any]],
) -> None:
    assert [result["resume"]["saved_micro_step"] for result in ranks] == [CUT[0], CUT[1]]
    for result in ranks:
        run = result["resume"]
        torch.testing.assert_close(run["params"], run["reference"], rtol=1e-5, atol=1e-6)


def test_a_rank_planning_windows_beside_one_closing_them_raises_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        run = result["planned-on-one-rank"]
        assert run["type"] == "RankMismatchError"
        assert "rank(s) [0] close their windows themselves (steps=None)" in run["message"]
        assert "rank(s) [1] plan windows of 2" in run["message"]
        assert run["unchanged"]


def test_a_rank_closing_while_the_other_has_nothing_open_raises_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        run = result["closing-alone"]
        assert run["type"] == "RankMismatchError"
        assert "1 of 2 ranks have an open window" in run["message"]


def test_a_rank_closing_while_the_other_stopped_gets_a_timeout_error(
    ranks: list[dict[str, Any]],
) -> None:
    assert ranks[0]["waiting-alone"]["type"] == "RankMismatchError"
    assert "did not come" in ranks[0]["waiting-alone"]["message"]
    assert ranks[1]["waiting-alone"] == {"type": None}
