"""FSDP2 (``fully_shard``) on 2 gloo ranks: accumulation equals one large batch.

One reduce-scatter per sharded layer per window by default; one per micro-step with
``sync_every_micro_step=True`` (less memory: no unsharded gradients kept between syncs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

import accumfn

from ._dist_utils import (
    CollectiveCounter,
    full_params,
    items,
    make_windows,
    reference_run,
    run_ranks,
    token_loss,
    token_model,
)

WINDOW = 3
LENGTHS = (3, 3, 2)  # the last window is short (is_final_batch)
LR = 0.2

SCENARIOS: dict[str, dict[str, Any]] = {
    "functional-mean": {"api": "functional", "items": False},
    "functional-items": {"api": "functional", "items": True},
    "object-items": {"api": "object", "items": True, "clip": 1.0},
    "object-mean-sync-every": {"api": "object", "items": False, "clip": 1.0, "sync_every": True},
    "functional-items-sync-every": {"api": "functional", "items": True, "sync_every": True},
}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)


def _sharded() -> tuple[nn.Module, int]:
    """The token model with each linear layer and the root under ``fully_shard``."""
    model = token_model(100)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model, len(layers)


def _accumulated(rank: int, spec: dict[str, Any], data: Any) -> dict[str, Any]:
    counter = CollectiveCounter()
    model, groups = _sharded()
    optimizer = _optimizer(model)
    item_mode, clip, sync_every = spec["items"], spec.get("clip"), spec.get("sync_every", False)
    reduction = "sum" if item_mode else "mean"
    accumulator = None
    state = accumfn.init(WINDOW, max_grad_norm=clip, sync_every_micro_step=sync_every)
    if spec["api"] == "object":
        accumulator = accumfn.GradientAccumulator(
            optimizer, WINDOW, max_grad_norm=clip, sync_every_micro_step=sync_every
        )
    with counter.spy():
        for w, window in enumerate(data):
            counter.window = w
            for m, ranks in enumerate(window):
                batch = ranks[rank]
                final = w == len(data) - 1 and m == len(window) - 1
                num_items = items(batch) if item_mode else None
                loss = token_loss(model, batch, reduction)
                if accumulator is not None:
                    accumulator.accumulate(loss, model, is_final_batch=final, num_items=num_items)
                else:
                    state, stepped = accumfn.accumulate(
                        state, loss, model, is_final_batch=final, num_items=num_items
                    )
                    if stepped:
                        state = accumfn.apply_step(state, optimizer, model)
    final_state = accumulator.state if accumulator is not None else state
    grad_types = {type(p.grad).__name__ for p in model.parameters() if p.grad is not None}
    return {
        "params": full_params(model),
        "groups": groups,
        "last_grad_norm": final_state.last_grad_norm,
        "optimizer_steps": final_state.optimizer_steps,
        "grads_left": sorted(grad_types),
        **counter.summary(),
    }


def _fsdp_worker(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, spec in SCENARIOS.items():
        data = make_windows(len(name), LENGTHS, micro_batch=2, ragged=spec["items"])
        reference = token_model(100)
        norms = reference_run(reference, _optimizer(reference), data, spec.get("clip"))
        results[name] = _accumulated(rank, spec, data)
        results[name]["reference"] = [p.detach().clone() for p in reference.parameters()]
        results[name]["reference_norms"] = norms
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(_fsdp_worker, timeout=150)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_params_equal_large_batch(ranks: list[dict[str, Any]], name: str) -> None:
    for result in ranks:
        run = result[name]
        torch.testing.assert_close(run["params"], run["reference"], rtol=1e-5, atol=1e-6)
        assert run["optimizer_steps"] == len(LENGTHS)
        assert run["grads_left"] == []  # zero_grad(set_to_none=True) after every window


@pytest.mark.parametrize("name", ["object-items", "object-mean-sync-every"])
def test_pre_clip_norm_of_sharded_grads_matches_large_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for result in ranks:
        run = result[name]
        assert run["last_grad_norm"] == pytest.approx(run["reference_norms"][-1], rel=1e-5)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_reduce_scatters_per_window(ranks: list[dict[str, Any]], name: str) -> None:
    sync_every = SCENARIOS[name].get("sync_every", False)
    for result in ranks:
        run = result[name]
        per_window = [run["reduce_scatters"].count(w) for w in range(len(LENGTHS))]
        if sync_every:  # every micro-step reduce-scatters each sharded layer
            assert per_window == [run["groups"] * n for n in LENGTHS]
        else:  # one reduce-scatter per sharded layer per window, the short one included
            assert per_window == [run["groups"]] * len(LENGTHS)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_window_header_gathered_once_per_window(ranks: list[dict[str, Any]], name: str) -> None:
    """Once when the window closes; with sync_every_micro_step also at its first micro-step;
    GradientAccumulator once more after the window that ends the data."""
    opens = SCENARIOS[name].get("sync_every", False)
    expected = [w for w, n in enumerate(LENGTHS) for _ in range(2 if opens and n > 1 else 1)]
    if SCENARIOS[name]["api"] == "object":  # it compares once more after the data's end
        expected.append(len(LENGTHS) - 1)
    for result in ranks:
        counts = [w for w, dtype, _ in result[name]["all_gathers"] if dtype == "torch.int64"]
        assert counts == expected
