"""Item counts given as tensors, and the window's loss, on 2 gloo ranks (DDP and FSDP2).

Every scenario runs in one spawned pair of processes and is compared with one large batch
per window over both ranks' micro-batches: parameters and the window's loss. The counts and
the losses travel in the window's header row (one int64 all-gather per window, no other
collective); host reads are counted per micro-step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn import ConfigError, core
from accumfn.testing import HostSyncCounter

from ._counted_windows import LR, accumulated_run, large_batch_losses
from ._dist_utils import (
    CollectiveCounter,
    full_params,
    make_windows,
    run_ranks,
    sharded_token_model,
    token_loss,
    token_model,
)

LENGTHS = (3, 1, 4, 2)  # the last window is short: closed by is_final_batch
TOL = 2e-6

SCENARIOS: dict[str, dict[str, Any]] = {
    "ddp-tensor": {"how": "tensor"},
    "ddp-object-tensor": {"how": "tensor", "api": "object"},
    "ddp-mixed": {"how": "mixed"},
    "ddp-mean": {"how": None},
    "ddp-scaler-tensor": {"how": "tensor", "scaler": True},
    "fsdp2-tensor": {"how": "tensor", "wrap": "fsdp2"},
}


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)


def _data(spec: dict[str, Any]) -> Any:
    return make_windows(0, LENGTHS, 2, spec["how"] is not None)


def _scenario(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("wrap") == "fsdp2":
        model: torch.nn.Module = sharded_token_model(0)
    else:
        model = DistributedDataParallel(token_model(0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if spec.get("scaler") else None
    counter = CollectiveCounter()
    with counter.spy():
        run = accumulated_run(
            model,
            _sgd(model),
            _data(spec),
            rank=rank,
            how=spec["how"],
            api=spec.get("api", "functional"),
            scaler=scaler,
        )
    return {
        "losses": run["losses"],
        "reads": run["reads"],
        "params": full_params(model),
        "collectives": counter.summary(),
    }


def _negative(rank: int) -> dict[str, Any]:
    """Rank 1 counts -2 items on a micro-batch of the first window."""
    model = DistributedDataParallel(token_model(0))
    data = make_windows(1, (3,), 2, True)
    state = accumfn.init(3, max_grad_norm=None)
    accumfn.prepare_forward(state, model)
    for m, ranks in enumerate(data[0]):
        batch = ranks[rank]
        count = torch.tensor(-2) if rank == 1 and m == 0 else (batch[1] != -100).sum()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        try:
            loss = token_loss(model, batch, "sum")
            state, _ = accumfn.accumulate(state, loss, model, num_items=count)
        except ConfigError as exc:
            unchanged = all(
                g is not None and p.grad is not None and torch.equal(p.grad, g)
                for p, g in zip(model.parameters(), grads, strict=True)
            )
            return {"error": str(exc), "micro_step": m, "unchanged": unchanged}
    return {"error": ""}


CALLER_CLOSED = (2, 3, 1)


def _caller_closed(rank: int) -> dict[str, Any]:
    """``steps=None``: each window closed by ``is_final_batch=True``; tensor counts."""
    model = DistributedDataParallel(token_model(0))
    optimizer = _sgd(model)
    state = accumfn.init(None, max_grad_norm=None)
    accumfn.prepare_forward(state, model)
    losses, reads = [], []
    for window in make_windows(2, CALLER_CLOSED, 2, True):
        for m, ranks in enumerate(window):
            batch = ranks[rank]
            loss = token_loss(model, batch, "sum")
            with HostSyncCounter() as counter:
                state, stepped = accumfn.accumulate(
                    state,
                    loss,
                    model,
                    is_final_batch=m == len(window) - 1,
                    num_items=(batch[1] != -100).sum(),
                )
                if stepped:
                    report = accumfn.step_window(state, optimizer, model)
                    state = report.state
                    losses.append(report.window_loss)
            reads.append((stepped, counter.calls))
    return {
        "losses": [float(loss) for loss in losses],
        "reads": reads,
        "params": full_params(model),
    }


def _worker(rank: int, world: int) -> dict[str, Any]:
    results = {name: _scenario(rank, spec) for name, spec in SCENARIOS.items()}
    results["negative"] = _negative(rank)
    results["caller-closed"] = _caller_closed(rank)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(_worker, timeout=400.0)


def _reference(spec: dict[str, Any]) -> tuple[list[float], list[torch.Tensor]]:
    model = token_model(0)
    losses = large_batch_losses(model, _sgd(model), _data(spec), item_mode=spec["how"] is not None)
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_the_large_batch_over_both_ranks(ranks: list[dict[str, Any]], name: str) -> None:
    losses, params = _reference(SCENARIOS[name])
    for result in ranks:
        run = result[name]
        assert run["losses"] == pytest.approx(losses, rel=TOL, abs=TOL)
        for got, want in zip(run["params"], params, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_counts_and_loss_travel_in_the_one_header_per_window(
    ranks: list[dict[str, Any]], name: str
) -> None:
    """One int64 all-gather of ``core.WIDTH`` values per window (GradientAccumulator: one
    more after the window that ends the data), and no other small collective."""
    spec = SCENARIOS[name]
    expected = len(LENGTHS) + (1 if spec.get("api") == "object" else 0)
    for result in ranks:
        gathers = result[name]["collectives"]["all_gathers"]
        headers = [numel for _, dtype, numel in gathers if dtype == "torch.int64"]
        assert headers == [core.WIDTH] * expected
        reduces = result[name]["collectives"]["all_reduces"]
        assert not [r for r in reduces if r[1] in ("torch.int64", "torch.float64")]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_host_reads_none_inside_a_window_one_per_window(
    ranks: list[dict[str, Any]], name: str
) -> None:
    """The header's read (``tolist``) is the window's only one; the short final window
    under DDP adds the fallback reduction's (which parameters have gradients), and
    GradientAccumulator's extra comparison after the data's end one more. A GradScaler's
    step reads whether the gradients are finite (``item``: GradScaler's own)."""
    spec = SCENARIOS[name]
    scaler = ["item"] if spec.get("scaler") else []
    for result in ranks:
        reads = result[name]["reads"]
        assert all(calls == [] for closed, calls in reads if not closed)
        at_boundary = [calls for closed, calls in reads if closed]
        assert at_boundary[:-1] == [["tolist", *scaler]] * (len(LENGTHS) - 1)
        last = ["tolist"]
        if "fsdp2" not in name:
            last = [*last, "tolist"]  # the fallback reduction of the short final window
        last = [*last, *scaler]
        if spec.get("api") == "object":
            last = [*last, "tolist"]
        assert at_boundary[-1] == last


def test_a_negative_count_raises_on_every_rank_before_the_boundary_backward(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        run = result["negative"]
        assert "num_items was negative (-2) on a micro-batch of rank 1" in run["error"]
        assert run["micro_step"] == 2  # the boundary's exchange, before its backward
        assert run["unchanged"]


def test_caller_closed_windows_with_tensor_counts(ranks: list[dict[str, Any]]) -> None:
    """Each window is reduced after its last backward (DDP's forward cannot know it
    closes): its reads are the header's and the fallback reduction's."""
    model = token_model(0)
    data = make_windows(2, CALLER_CLOSED, 2, True)
    losses = large_batch_losses(model, _sgd(model), data, item_mode=True)
    for result in ranks:
        run = result["caller-closed"]
        assert run["losses"] == pytest.approx(losses, rel=TOL, abs=TOL)
        for got, want in zip(run["params"], model.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        assert all(calls == [] for closed, calls in run["reads"] if not closed)
        at_boundary = [calls for closed, calls in run["reads"] if closed]
        assert at_boundary == [["tolist", "tolist"]] * len(CALLER_CLOSED)
