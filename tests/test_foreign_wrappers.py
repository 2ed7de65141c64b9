"""Data-parallel set-ups accumfn cannot steer are refused on every rank, before the first
backward, with nothing changed: a module a live DDP reduces, a module holding a DDP or FSDP2
modules, FSDP1, and DDP in Join mode (uneven inputs); on 2 gloo ranks."""

from __future__ import annotations

import gc
import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn.errors import ConfigError

from ._dist_utils import items, make_windows, reference_run, run_ranks, token_loss, token_model


class _Holder(nn.Module):
    """A user's wrapper with a DDP inside it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = DistributedDataParallel(inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def _fsdp1(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def _refused(rank: int, world: int, case: str) -> dict[str, Any]:
    """Trains 2-micro-batch windows (rank 0 has 3 micro-batches, rank 1 has 1 under Join)."""
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "20"
    module = token_model(3)
    wrapped = torch.compile(module, backend="eager") if case == "inner-compiled" else module
    ddp = DistributedDataParallel(wrapped) if case != "fsdp1" else None
    forward: nn.Module = ddp if ddp is not None else module
    given: nn.Module = forward
    if case == "fsdp1":
        forward = given = _fsdp1(module)
    elif case in ("inner", "inner-object", "inner-compiled"):
        given = module  # ddp.module, or the module compiled inside DDP(torch.compile(module))
    elif case == "holder":
        forward = given = _Holder(token_model(3))
    elif case == "child":  # DDP around a model holding this one
        forward = DistributedDataParallel(nn.Sequential(token_model(3)))
        given = forward.module[0]
    elif case == "fsdp2-child":  # fully_shard on a part only, not on the root
        from torch.distributed.fsdp import fully_shard

        forward = given = nn.Sequential(fully_shard(token_model(3)))
    elif case == "replicate":  # composable DDP: the module itself runs the reduction
        from torch.distributed._composable.replicate import replicate

        forward = given = replicate(token_model(3))
    params = list(given.parameters())
    before = [p.detach().clone() for p in params]
    batches = [window[0][rank] for window in make_windows(5, [1, 1, 1], 2, ragged=True)]
    if case == "join" and rank == 1:
        batches = batches[:1]
    state = accumfn.init(2, max_grad_norm=None)
    accumulator = accumfn.GradientAccumulator(torch.optim.SGD(params, lr=0.1), 2)
    result: dict[str, Any] = {"type": None}
    try:
        with Join([ddp]) if case == "join" and ddp is not None else _nothing():
            for batch in batches:
                loss = token_loss(forward, batch, "sum")
                if case == "inner-object":
                    accumulator.accumulate(loss, given, num_items=items(batch))
                    continue
                state, _ = accumfn.accumulate(state, loss, given, num_items=items(batch))
    except ConfigError as exc:
        result = {"type": type(exc).__name__, "message": str(exc)}
    result["unchanged"] = all(
        torch.equal(a.detach(), b) and a.grad is None for a, b in zip(params, before, strict=True)
    )
    result["state"] = (state.micro_step, accumulator.state.micro_step)
    return result


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("inner", "reduced by a DistributedDataParallel"),
        ("inner-object", "reduced by a DistributedDataParallel"),
        ("inner-compiled", "reduced by a DistributedDataParallel"),
        ("holder", "holds a DistributedDataParallel inside it"),
        ("child", "reduced by a DistributedDataParallel"),
        ("replicate", "under composable replicate()"),
        ("fsdp1", "FSDP1 (FullyShardedDataParallel)"),
        ("fsdp2-child", "holds FSDP2 modules but is not one itself"),
        ("join", "in Join mode"),
    ],
)
def test_a_wrapper_accumfn_cannot_steer_is_refused_on_every_rank(case: str, says: str) -> None:
    for result in run_ranks(_refused, case, timeout=120):
        assert result["type"] == "ConfigError", result
        assert says in result["message"]
        assert result["unchanged"]
        assert result["state"] == (0, 0)


def _hooked(rank: int, world: int) -> tuple[list[torch.Tensor], list[str]]:
    """DDP with the fp16-compression hook; the last windows hold 3 and 2 micro-batches."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = DistributedDataParallel(token_model(4))
    model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    state = accumfn.init(4, max_grad_norm=None)
    accumfn.prepare_forward(state, model)
    mine = [[ranks[rank] for ranks in window if rank < len(ranks)] for window in _hook_data()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for w, window in enumerate(mine):
            for m, batch in enumerate(window):
                last = w == len(mine) - 1 and m == len(window) - 1
                loss = token_loss(model, batch, "sum")
                state, stepped = accumfn.accumulate(
                    state, loss, model, num_items=items(batch), is_final_batch=last
                )
                if stepped:
                    state = accumfn.apply_step(state, optimizer, model)
    said = [str(w.message) for w in caught if "communication hook" in str(w.message)]
    return [p.detach().clone() for p in model.parameters()], said


def _hook_data() -> list[list[list[Any]]]:
    data = make_windows(9, [4, 3], 2, ragged=True)  # windows of 4: the last is short
    data[1][2] = data[1][2][:1]  # and 3 micro-batches long on rank 0, 2 on rank 1
    return data


def test_a_ddp_comm_hook_is_named_when_accumfn_averages_a_window_without_it() -> None:
    """The short final window is averaged by accumfn, exactly, without the hook: each rank
    warns once, naming it, and the model is the large batch's (full windows went through
    the fp16 hook: fp16 tolerance)."""
    results = run_ranks(_hooked, timeout=120)
    model = token_model(4)
    reference_run(model, torch.optim.SGD(model.parameters(), lr=0.5), _hook_data())
    for params, said in results:
        assert len(said) == 1 and "fp16_compress_hook" in said[0]
        for got, want in zip(params, model.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-3, atol=1e-3)


def _after_a_dropped_ddp(rank: int, world: int) -> dict[str, Any]:
    """A DDP built, dropped while still in a reference cycle, then rank-local training of
    its module: refused on no rank, and each rank's model is its own large batch's."""
    gc.disable()  # the dropped DDP stays uncollected garbage until accumfn looks
    try:
        module = token_model(6)
        reference = token_model(6)
        ddp = DistributedDataParallel(module)
        ddp.again = ddp  # a cycle: only the garbage collector frees it
        del ddp
        batches = [window[0][rank] for window in make_windows(7 + rank, [1, 1], 2, ragged=True)]
        state = accumfn.init(2, max_grad_norm=None)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        for m, batch in enumerate(batches):
            loss = token_loss(module, batch, "sum")
            state, stepped = accumfn.accumulate(
                state, loss, module, num_items=items(batch), is_final_batch=m == len(batches) - 1
            )
            if stepped:
                state = accumfn.apply_step(state, optimizer, module)
    finally:
        gc.enable()
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.5), [[batches]])
    return {
        "steps": state.optimizer_steps,
        "diff": max(
            float((a - b).abs().max())
            for a, b in zip(module.parameters(), reference.parameters(), strict=True)
        ),
    }


def test_a_dropped_ddp_does_not_refuse_its_module_on_any_rank() -> None:
    for result in run_ranks(_after_a_dropped_ddp, timeout=120):
        assert result["steps"] == 1
        assert result["diff"] < 1e-6
