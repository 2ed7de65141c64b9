"""Checkpoints taken inside a window on 2 gloo ranks: resume exactly, or refuse on every rank.

Every resumed run is compared with the same run uninterrupted (itself equal to one large
batch over both ranks' data, see test_ddp/test_fsdp); refusals leave state unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn.checkpoint import (
    StateHolder,
    capture,
    distributed_state,
    load_checkpoint,
    restore,
    save_checkpoint,
)

from ._dist_utils import (
    full_params,
    items,
    make_windows,
    run_ranks,
    sharded_token_model,
    token_loss,
    token_model,
)

WINDOW = 3
LENGTHS = (3, 3, 2)
SAVE_AT = 4  # micro-steps taken before the checkpoint: inside the second window
LR = 0.2


def _ddp() -> nn.Module:
    return DistributedDataParallel(token_model(100))


def _fsdp() -> nn.Module:
    return sharded_token_model(100)


def _micro_batches(rank: int, item_mode: bool) -> list[tuple[Any, bool]]:
    data = make_windows(31, LENGTHS, micro_batch=2, ragged=item_mode)
    flat = [ranks[rank] for window in data for ranks in window]
    return [(batch, i == len(flat) - 1) for i, batch in enumerate(flat)]


class Run:
    """One rank's training: a model, its optimizer, and the accumulator of either API."""

    def __init__(self, wrap: Callable[[], nn.Module], api: str, item_mode: bool, sync: bool):
        self.model = wrap()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.5)
        self.item_mode = item_mode
        self.api = api
        self.acc = accumfn.GradientAccumulator(
            self.optimizer, WINDOW, max_grad_norm=None, sync_every_micro_step=sync
        )
        self.holder = StateHolder(
            accumfn.init(WINDOW, sync_every_micro_step=sync, max_grad_norm=None),
            self.optimizer,
            None,
        )
        self.acc.prepare(self.model)

    def steps(self, batches: list[tuple[Any, bool]]) -> None:
        reduction = "sum" if self.item_mode else "mean"
        for batch, final in batches:
            loss = token_loss(self.model, batch, reduction)
            num_items = items(batch) if self.item_mode else None
            if self.api == "object":
                self.acc.accumulate(loss, self.model, is_final_batch=final, num_items=num_items)
                continue
            state, stepped = accumfn.accumulate(
                self.holder.state, loss, self.model, is_final_batch=final, num_items=num_items
            )
            if stepped:
                state = accumfn.apply_step(state, self.optimizer, self.model)
            self.holder.state = state

    def accum_state(self) -> dict[str, Any]:
        if self.api == "object":
            return self.acc.state_dict()
        return capture(self.holder.state, self.optimizer)

    def load_accum(self, data: Any) -> None:
        if self.api == "object":
            self.acc.load_state_dict(data)
            self.acc.prepare(self.model)
        else:
            self.holder.state = restore(data, self.holder.state, self.optimizer)
            accumfn.prepare_forward(self.holder.state, self.model)

    def snapshot(self) -> dict[str, Any]:
        state = self.acc.state if self.api == "object" else self.holder.state
        return {
            "state": state.to_dict(),
            "grads": [None if p.grad is None else p.grad.clone() for p in self.model.parameters()],
            "params": [p.detach().clone() for p in self.model.parameters()],
        }


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _torch_save_worker(
    rank: int,
    world: int,
    folder: str,
    wrap_name: str,
    api: str,
    item_mode: bool,
    sync: bool,
    per_rank: bool,
) -> dict[str, Any]:
    """Save inside a window with torch.save (rank 0 only, or every rank its own file), then
    a fresh run on every rank loads and continues."""
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "30"
    wrap = _ddp if wrap_name == "ddp" else _fsdp
    batches = _micro_batches(rank, item_mode)
    whole = Run(wrap, api, item_mode, sync)
    whole.steps(batches)
    first = Run(wrap, api, item_mode, sync)
    first.steps(batches[:SAVE_AT])
    path = Path(folder) / (f"accum-rank{rank}.pt" if per_rank else "accum.pt")
    try:
        accum = first.accum_state()
    except accumfn.AccumError as exc:
        return {"save": _error(exc)}
    if per_rank or rank == 0:
        save_checkpoint(
            {
                "model": first.model.state_dict(),
                "optim": first.optimizer.state_dict(),
                "accum": accum,
            },
            path,
        )
    dist.barrier()
    second = Run(wrap, api, item_mode, sync)
    ckpt = load_checkpoint(path)
    second.model.load_state_dict(ckpt["model"])
    second.optimizer.load_state_dict(ckpt["optim"])
    before = second.snapshot()
    try:
        second.load_accum(ckpt["accum"])
    except accumfn.AccumError as exc:
        after = second.snapshot()
        unchanged = (
            all(
                torch.equal(a, b) if a is not None else b is None
                for key in ("grads", "params")
                for a, b in zip(before[key], after[key], strict=True)
            )
            and before["state"] == after["state"]
        )
        return {"load": _error(exc), "unchanged": unchanged}
    second.steps(batches[SAVE_AT:])
    return {"resumed": full_params(second.model), "whole": full_params(whole.model)}


def _dcp_worker(
    rank: int, world: int, folder: str, wrap_name: str, api: str, item_mode: bool, sync: bool
) -> dict[str, Any]:
    """Save inside a window with torch.distributed.checkpoint, load into a fresh run."""
    wrap = _ddp if wrap_name == "ddp" else _fsdp
    batches = _micro_batches(rank, item_mode)
    whole = Run(wrap, api, item_mode, sync)
    whole.steps(batches)
    first = Run(wrap, api, item_mode, sync)
    first.steps(batches[:SAVE_AT])

    def stateful(run: Run) -> dict[str, Any]:
        target = run.acc if api == "object" else run.holder
        model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
        return {"model": model_sd, "optim": optim_sd, "accum": distributed_state(target, run.model)}

    try:
        dcp.save(stateful(first), checkpoint_id=folder)
    except Exception as exc:  # DCP wraps errors raised while saving
        return {"save": _error(exc)}
    second = Run(wrap, api, item_mode, sync)
    loaded = stateful(second)
    dcp.load(loaded, checkpoint_id=folder)
    set_state_dict(
        second.model,
        second.optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
    )
    if api != "object":
        accumfn.prepare_forward(second.holder.state, second.model)
    second.steps(batches[SAVE_AT:])
    return {"resumed": full_params(second.model), "whole": full_params(whole.model)}


RESUMES = {
    # name: (worker, wrap, api, item_mode, sync_every, extra)
    "ddp-per-rank-object-items": (_torch_save_worker, "ddp", "object", True, False, (True,)),
    "ddp-per-rank-functional-mean": (
        _torch_save_worker,
        "ddp",
        "functional",
        False,
        False,
        (True,),
    ),
    "fsdp2-sync-every-per-rank-items": (
        _torch_save_worker,
        "fsdp2",
        "object",
        True,
        True,
        (True,),
    ),
    "dcp-ddp-object-items": (_dcp_worker, "ddp", "object", True, False, ()),
    "dcp-ddp-functional-mean": (_dcp_worker, "ddp", "functional", False, False, ()),
    "dcp-fsdp2-sync-every-items": (_dcp_worker, "fsdp2", "object", True, True, ()),
}


@pytest.mark.parametrize("name", list(RESUMES))
def test_mid_window_checkpoint_resumes_like_the_uninterrupted_run(
    name: str, tmp_path: Path
) -> None:
    worker, wrap, api, item_mode, sync, extra = RESUMES[name]
    for result in run_ranks(worker, str(tmp_path), wrap, api, item_mode, sync, *extra, timeout=150):
        assert "resumed" in result, result
        exact = wrap == "ddp"  # FSDP2: within fp32 rounding of the uninterrupted run
        tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-6, "atol": 1e-7}
        torch.testing.assert_close(result["resumed"], result["whole"], **tol)


@pytest.mark.parametrize("api", ["object", "functional"])
def test_rank0_checkpoint_inside_a_window_is_refused_on_every_rank(
    api: str, tmp_path: Path
) -> None:
    results = run_ranks(
        _torch_save_worker, str(tmp_path), "ddp", api, True, False, False, timeout=150
    )
    for result in results:  # the same message on both: rank 1 holds rank 0's open window
        assert "rank 1 of 2 loaded a checkpoint taken inside a window" in result["load"]["message"]
        assert "by rank 0 of 2, so no rank resumes" in result["load"]["message"]
        assert result["load"]["type"] == "CheckpointError"
        assert "distributed_state" in result["load"]["message"]
        assert result["unchanged"]


@pytest.mark.parametrize("worker", [_torch_save_worker, _dcp_worker])
def test_fsdp2_default_mode_refuses_a_checkpoint_inside_a_window(
    worker: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    extra = (True,) if worker is _torch_save_worker else ()
    results = run_ranks(worker, str(tmp_path), "fsdp2", "object", True, False, *extra, timeout=150)
    for result in results:
        assert "sync_every_micro_step=True" in result["save"]["message"]
        assert "window boundary" in result["save"]["message"]
