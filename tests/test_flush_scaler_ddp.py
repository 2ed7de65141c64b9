"""``flush`` with an enabled GradScaler on 2 gloo DDP ranks.

The exchange that closes a window carries each rank's GradScaler scale; ``flush`` is given
the scaler (``GradientAccumulator.flush`` passes its own), so a window one rank closes with
``is_final_batch=True`` and another with ``flush`` equals one large batch of both ranks'
micro-batches, ranks whose scalers are at different scales raise on every rank, and a
scaled window flushed without its scaler is a ``ConfigError`` before anything runs.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import accumfn

from ._dist_utils import run_ranks, token_loss, token_model
from .test_caller_closed import large_batch, rollouts, sgd

LENGTHS = [(2, 2)]
"""One window of 2 micro-batches on each rank."""


def _scaler(scale: float = 256.0) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=scale)


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [
        tensor.detach().clone() if tensor is not None else None
        for p in model.parameters()
        for tensor in (p, p.grad)
    ]


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


def _closed_apart(rank: int, api: str, steps: int | None) -> dict[str, Any]:
    """Rank 0 closes its last window with ``is_final_batch=True``, rank 1 with ``flush``."""
    data = rollouts(21, LENGTHS, ragged=False)
    model = DistributedDataParallel(token_model(100))
    optimizer = sgd(model)
    scaler = _scaler()
    batches = data[0][rank]
    ends_itself = rank == 0
    if api == "object":
        acc = accumfn.GradientAccumulator(optimizer, steps, max_grad_norm=None, scaler=scaler)
        acc.prepare(model)
        for i, batch in enumerate(batches):
            last = ends_itself and i == len(batches) - 1
            acc.accumulate(token_loss(model, batch, "mean"), model, is_final_batch=last)
        if not ends_itself:
            assert acc.flush()
        steps_done = acc.state.optimizer_steps
    else:
        state = accumfn.init(steps, max_grad_norm=None)
        accumfn.prepare_forward(state, model)
        stepped = False
        for i, batch in enumerate(batches):
            last = ends_itself and i == len(batches) - 1
            loss = token_loss(model, batch, "mean")
            state, stepped = accumfn.accumulate(
                state, loss, model, is_final_batch=last, scaler=scaler
            )
        if not ends_itself:
            state, stepped = accumfn.flush(state, model, scaler=scaler)
        assert stepped
        state = accumfn.apply_step(state, optimizer, model, scaler=scaler)
        steps_done = state.optimizer_steps
    return {
        "params": [p.detach().clone() for p in model.module.parameters()],
        "reference": large_batch(token_model(100), data)["params"][-1],
        "optimizer_steps": steps_done,
    }


def _scales_apart(rank: int) -> dict[str, Any]:
    """Both ranks flush, their scalers at 256 and 512: every rank raises, nothing changes."""
    model = DistributedDataParallel(token_model(100))
    acc = accumfn.GradientAccumulator(
        sgd(model), None, max_grad_norm=None, scaler=_scaler(256.0 * (rank + 1))
    )
    acc.prepare(model)
    for batch in rollouts(22, LENGTHS, ragged=False)[0][rank]:
        acc.accumulate(token_loss(model, batch, "mean"), model)
    before, state = _snapshot(model.module), acc.state
    try:
        acc.flush()
    except accumfn.AccumError as exc:
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "unchanged": _same(before, _snapshot(model.module)) and acc.state == state,
        }
    return {"type": None}


def _flushed_without_scaler(rank: int) -> dict[str, Any]:
    """A scaled window flushed without its scaler: ConfigError on every rank before any
    exchange; given the scaler, the same state then closes and steps as the large batch."""
    data = rollouts(23, LENGTHS, ragged=False)
    model = DistributedDataParallel(token_model(100))
    optimizer = sgd(model)
    scaler = _scaler()
    state = accumfn.init(None, max_grad_norm=None)
    accumfn.prepare_forward(state, model)
    for batch in data[0][rank]:
        state, _ = accumfn.accumulate(state, token_loss(model, batch, "mean"), model, scaler=scaler)
    before, kept = _snapshot(model.module), state
    result: dict[str, Any] = {"type": None}
    try:
        accumfn.flush(state, model)
    except accumfn.AccumError as exc:
        result = {"type": type(exc).__name__, "message": str(exc)}
    result["unchanged"] = _same(before, _snapshot(model.module)) and state == kept
    state, stepped = accumfn.flush(state, model, scaler=scaler)
    assert stepped
    accumfn.apply_step(state, optimizer, model, scaler=scaler)
    result["params"] = [p.detach().clone() for p in model.module.parameters()]
    result["reference"] = large_batch(token_model(100), data)["params"][-1]
    return result


CLOSED_APART = [(api, steps) for api in ("object", "functional") for steps in (None, 4)]


def _worker(rank: int, world: int) -> dict[str, Any]:
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "30"
    results: dict[str, Any] = {
        f"{api}-{steps}": _closed_apart(rank, api, steps) for api, steps in CLOSED_APART
    }
    results["scales-apart"] = _scales_apart(rank)
    results["without-scaler"] = _flushed_without_scaler(rank)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(_worker, timeout=240)


@pytest.mark.parametrize(("api", "steps"), CLOSED_APART)
def test_one_rank_flushes_the_window_another_closed_as_the_large_batch(
    ranks: list[dict[str, Any]], api: str, steps: int | None
) -> None:
    """Rank 0 ends with ``is_final_batch=True``, rank 1 with ``flush``: both carry the
    GradScaler's scale, so no false mismatch, and the update is the large batch's."""
    for result in ranks:
        run = result[f"{api}-{steps}"]
        assert run["optimizer_steps"] == 1
        for got, want in zip(run["params"], run["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ranks_flushing_at_different_scales_raise_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        run = result["scales-apart"]
        assert run["type"] == "RankMismatchError"
        assert (
            "rank 0 is at GradScaler scale 256.0, rank 1 at GradScaler scale 512.0"
            in (run["message"])
        )
        assert run["unchanged"]


def test_a_scaled_window_flushed_without_its_scaler_is_refused_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        run = result["without-scaler"]
        assert run["type"] == "ConfigError"
        assert "flush(state, model, scaler=scaler)" in run["message"]
        assert run["unchanged"]
        for got, want in zip(run["params"], run["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
