"""Keywords combined on 2 gloo ranks: a window dropped under FSDP2 leaves nothing behind,
and an optimizer over parameters outside the data-parallel model is refused on every rank."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn.errors import ConfigError

from ._dist_utils import full_params, run_ranks, sharded_token_model, token_loss, token_model
from .test_distributed_edges import large_batch, ranked_data, sgd

SEED = 5


def _drop_a_window(rank: int, world: int, pass_model: bool) -> dict[str, Any]:
    """Window 1 (3 micro-batches), 2 micro-batches of window 2 dropped by reset_epoch (the
    data ran out inside it), window 3."""
    model = sharded_token_model(0)
    opt = sgd(model)
    data = ranked_data(SEED, [[3, 2, 3]] * world, ragged=False)[rank]
    state = accumfn.init(3, max_grad_norm=None)
    for w, window in enumerate(data):
        for batch in window:
            state, stepped = accumfn.accumulate(state, token_loss(model, batch, "mean"), model)
            if stepped:
                state = accumfn.apply_step(state, opt, model)
        if w == 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "reset_epoch discarded an open window"
                try:
                    state = accumfn.reset_epoch(state, opt, model if pass_model else None)
                except ConfigError as exc:
                    return {"error": str(exc), "micro_step": state.micro_step}
    return {"params": full_params(model), "steps": state.optimizer_steps}


def test_reset_epoch_under_fsdp2_drops_the_window_inside_fsdp2_too() -> None:
    """FSDP2's default mode sums an open window's gradients inside its own modules:
    reset_epoch clears them there, so the next window equals the large batch without the
    dropped micro-batches."""
    data = ranked_data(SEED, [[3, 2, 3]] * 2, ragged=False)
    reference = token_model(0)
    want = large_batch(reference, sgd(reference), [[rank[0], rank[2]] for rank in data])
    for result in run_ranks(_drop_a_window, True, timeout=150):
        assert result["steps"] == 2
        for got, expected in zip(result["params"], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_reset_epoch_under_fsdp2_without_the_model_is_refused() -> None:
    for result in run_ranks(_drop_a_window, False, timeout=150):
        assert "reset_epoch inside a window under FSDP2 needs the model" in result["error"]
        assert result["micro_step"] == 2  # the state was not changed


def _head_outside(rank: int, world: int, added: bool) -> dict[str, Any]:
    """The optimizer holds a head outside the DDP model, from the start or added to it with
    add_param_group after a window has stepped."""
    torch.manual_seed(0)
    body = token_model(0)
    head = nn.Linear(5, 5)
    model = DistributedDataParallel(body)
    held = [*body.parameters()] if added else [*body.parameters(), *head.parameters()]
    opt = torch.optim.SGD(held, lr=0.1)
    acc = accumfn.GradientAccumulator(opt, 2, max_grad_norm=None)
    acc.prepare(model)
    data = ranked_data(SEED, [[2, 2]] * world, ragged=False)[rank]

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(model(x))
        return nn.functional.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))

    if added:
        for x, y in data[0]:
            acc.accumulate(loss_of(x, y), model)
        opt.add_param_group({"params": list(head.parameters())})
    before = [p.detach().clone() for p in [*body.parameters(), *head.parameters()]]
    steps = acc.stats.optimizer_steps
    try:
        for x, y in data[1]:
            acc.accumulate(loss_of(x, y), model)
    except ConfigError as exc:
        after = [p.detach().clone() for p in [*body.parameters(), *head.parameters()]]
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        return {
            "error": str(exc),
            "unchanged": unchanged,
            "new_steps": acc.stats.optimizer_steps - steps,
        }
    return {"error": None}


@pytest.mark.parametrize("added", [False, True], ids=["from-the-start", "added-later"])
def test_an_optimizer_over_parameters_outside_the_ddp_model_is_refused_on_every_rank(
    added: bool,
) -> None:
    """The head is outside the DDP: nothing would average its gradients over the ranks."""
    for result in run_ranks(_head_outside, added, timeout=120):
        assert result["error"] is not None
        assert (
            "2 of the optimizer's 8 parameters are not parameters of the model" in (result["error"])
        )
        assert result["unchanged"] and result["new_steps"] == 0
