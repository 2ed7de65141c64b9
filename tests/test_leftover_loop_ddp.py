"""DDP on 2 gloo ranks: a loop's leftover zero_grad is refused on every rank, without a hang,
and DDP's own writes to the gradients (its bucket views, rebuilt once) are let through."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn import CallOrderError

from ._dist_utils import make_windows, reference_run, run_ranks, token_loss, token_model

WINDOW = 3
LR = 0.2


def _leftover_zero_grad(rank: int) -> dict[str, Any]:
    model = DistributedDataParallel(token_model(100))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    accumulator = accumfn.GradientAccumulator(optimizer, WINDOW, max_grad_norm=None)
    accumulator.prepare(model)
    window = make_windows(seed=3, window_lengths=(WINDOW,), micro_batch=2, ragged=False)[0]
    accumulator.accumulate(token_loss(model, window[0][rank], "mean"), model)
    optimizer.zero_grad()  # the line left over from the old loop, on every rank
    loss = token_loss(model, window[1][rank], "mean")
    params = [p.detach().clone() for p in model.parameters()]
    try:
        accumulator.accumulate(loss, model)
    except CallOrderError as exc:
        error = str(exc)
    else:
        error = ""
    return {
        "error": error,
        "params_unchanged": all(
            torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True)
        ),
        "grads_none": all(p.grad is None for p in model.parameters()),
        "micro_step": accumulator.state.micro_step,
    }


def _bucket_views(rank: int, api: str) -> dict[str, Any]:
    """``gradient_as_bucket_view=True``, every micro-step synced: DDP moves the gradients
    into its rebuilt buckets at the second forward, inside the first window."""
    model = DistributedDataParallel(token_model(100), gradient_as_bucket_view=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    data = make_windows(seed=4, window_lengths=(WINDOW, WINDOW, 2), micro_batch=2, ragged=False)
    kwargs: dict[str, Any] = {"max_grad_norm": None, "sync_every_micro_step": True}
    accumulator = accumfn.GradientAccumulator(optimizer, WINDOW, **kwargs)
    state = accumfn.init(WINDOW, **kwargs)
    for w, window in enumerate(data):
        for m, ranks in enumerate(window):
            final = w == len(data) - 1 and m == len(window) - 1
            loss = token_loss(model, ranks[rank], "mean")
            if api == "object":
                accumulator.accumulate(loss, model, is_final_batch=final)
                continue
            state, stepped = accumfn.accumulate(state, loss, model, is_final_batch=final)
            if stepped:
                state = accumfn.apply_step(state, optimizer, model)
    reference = token_model(100)
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.5), data)
    return {
        "rebuilt": bool(model._has_rebuilt_buckets),
        "diff": max(
            float((p.detach() - q.detach()).abs().max())
            for p, q in zip(model.module.parameters(), reference.parameters(), strict=True)
        ),
    }


def _worker(rank: int, world: int) -> dict[str, Any]:
    return {
        "leftover": _leftover_zero_grad(rank),
        "object": _bucket_views(rank, "object"),
        "functional": _bucket_views(rank, "functional"),
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(_worker, timeout=120)


def test_leftover_zero_grad_is_refused_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        found = result["leftover"]
        assert "optimizer.zero_grad()" in found["error"], found
        assert found["params_unchanged"] and found["grads_none"] and found["micro_step"] == 1


@pytest.mark.parametrize("api", ["object", "functional"])
def test_ddp_bucket_views_are_not_taken_for_a_leftover(
    ranks: list[dict[str, Any]], api: str
) -> None:
    for result in ranks:
        assert result[api]["rebuilt"]
        assert result[api]["diff"] < 1e-5, result[api]
