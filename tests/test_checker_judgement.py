"""assert_equivalent judges relative to what it compares, before clipping, and skips windows
without items as accumfn does: wrong setups fail at any gradient scale, correct ones pass.

Everything the ranks run is defined at module level: the ranks are spawned processes that
import this module to find it.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accumfn.errors import ConfigError
from accumfn.testing import assert_equivalent, plan_windows

Batch = tuple[torch.Tensor, torch.Tensor]
CLASSES = 4
ROWS = 4
"""Rows of every micro-batch: a batch with more is a large batch."""


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def regression(count: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(ROWS, 6, generator=g), torch.randn(ROWS, CLASSES, generator=g))
        for _ in range(count)
    ]


def scaled_mse(model: nn.Module, batch: Batch, scale: float, error: float = 1.0) -> torch.Tensor:
    """A mean loss times ``scale`` (so are the gradients); a micro-batch's also times
    ``error``: the accumulated run alone is wrong by that factor."""
    x, y = batch
    factor = scale * (error if x.shape[0] == ROWS else 1.0)
    return nn.functional.mse_loss(model(x), y) * factor


def tokens(items: list[int], seed: int = 0) -> list[Batch]:
    """Micro-batches of (inputs (2, 5, 6), labels (2, 5)) with ``items[i]`` labels kept in
    micro-batch ``i`` (the rest are -100): 0 makes a micro-batch without items."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for count in items:
        x = torch.randn(2, 5, 6, generator=g)
        y = torch.randint(0, CLASSES, (2, 5), generator=g)
        keep = torch.randperm(10, generator=g)[:count]
        mask = torch.ones(10, dtype=torch.bool)
        mask[keep] = False
        out.append((x, y.masked_fill(mask.reshape(2, 5), -100)))
    return out


def token_sum_loss(model: nn.Module, batch: Batch, scale: float = 1.0) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, CLASSES), y.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss * scale


def token_count(batch: Batch) -> int:
    return int((batch[1] != -100).sum())


def leave_unwrapped(model: nn.Module) -> nn.Module:
    """Forgets data parallelism: each rank keeps its own gradients, nothing is averaged."""
    return model


# DDP checks a comm hook's annotations against the real classes, which string annotations
# (from __future__ import annotations) are not: the hook is left unannotated.
def summing_hook(state, bucket):  # type: ignore[no-untyped-def]
    """All-reduces but does not divide by the world size."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def ddp_with_hook(model: nn.Module, hook: Any) -> nn.Module:
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, hook)
    return ddp


def skipped_windows(items: list[int], steps: int, world: int = 1) -> tuple[int, ...]:
    """Windows whose micro-batches (on every rank) have no items."""
    per_rank = len(items) // world
    windows = plan_windows(steps, per_rank)
    return tuple(
        number
        for number, window in enumerate(windows)
        if not any(items[local * world + rank] for local in window for rank in range(world))
    )


# -- a scale error fails at any gradient magnitude, clipped or not -----------------------------
@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e3])
@pytest.mark.parametrize("error", [2.0, 100.0])
def test_scale_error_fails_naming_the_factor(
    error: float, scale: float, max_grad_norm: float | None
) -> None:
    loss = functools.partial(scaled_mse, scale=scale, error=error)
    with pytest.raises(AssertionError) as failure:
        assert_equivalent(
            make_model, adam, regression(4), steps=2, loss_fn=loss, max_grad_norm=max_grad_norm
        )
    message = str(failure.value)
    assert "gradient 0.weight.grad" in message and "gradients before clipping" in message
    assert f"gradients of window 0 are {error:.4g} times the large batch's" in message


@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e3])
def test_correct_setup_passes_at_any_gradient_scale(
    scale: float, max_grad_norm: float | None
) -> None:
    loss = functools.partial(scaled_mse, scale=scale)
    report = assert_equivalent(
        make_model, adam, regression(7), steps=3, loss_fn=loss, max_grad_norm=max_grad_norm
    )
    assert report.windows == (3, 3, 1)
    assert report.max_rel < 1e-5 and not report.failed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    exponent=st.floats(-9.0, 3.0),
    error=st.sampled_from([1.0, 2.0, 0.5, 100.0, 0.01, 1.01]),
    max_grad_norm=st.sampled_from([None, 0.1, 10.0]),
    optimizer=st.sampled_from([adam, sgd]),
)
def test_verdict_does_not_depend_on_gradient_scale(
    exponent: float, error: float, max_grad_norm: float | None, optimizer: Any
) -> None:
    scale = 10.0**exponent
    if optimizer is sgd:  # SGD's updates grow with the gradients: keep the weights sane
        scale = min(scale, 1.0)
    loss = functools.partial(scaled_mse, scale=scale, error=error)
    run = functools.partial(
        assert_equivalent,
        make_model,
        optimizer,
        regression(4, seed=3),
        steps=2,
        loss_fn=loss,
        max_grad_norm=max_grad_norm,
    )
    if error == 1.0:
        run()
        return
    with pytest.raises(AssertionError, match=f"are {error:.4g} times the large batch's"):
        run()


# -- windows without items are skipped, as accumfn skips them ----------------------------------
@pytest.mark.parametrize(
    ("items", "steps"),
    [
        ([0, 0, 0, 0], 2),  # every micro-batch empty: every window skipped
        ([0, 0, 3, 5, 0], 2),  # the first window empty, the short last window too
        ([4, 0, 0, 0, 2, 7], 3),  # some micro-batches empty, no window
        ([0], 1),
    ],
)
def test_windows_without_items_pass_on_one_process(items: list[int], steps: int) -> None:
    report = assert_equivalent(
        make_model,
        adam,
        tokens(items),
        steps=steps,
        loss_fn=token_sum_loss,
        num_items=token_count,
        max_grad_norm=1.0,
        make_scheduler=halving,
    )
    assert report.skipped == skipped_windows(items, steps)
    assert not report.failed


@settings(max_examples=25, deadline=None)
@given(
    items=st.lists(st.sampled_from([0, 0, 1, 4, 10]), min_size=1, max_size=8),
    steps=st.integers(1, 4),
    exponent=st.sampled_from([-9.0, 0.0, 3.0]),
    optimizer=st.sampled_from([adam, sgd]),
    max_grad_norm=st.sampled_from([None, 0.1]),
)
def test_any_windows_without_items_pass(
    items: list[int], steps: int, exponent: float, optimizer: Any, max_grad_norm: float | None
) -> None:
    scale = 10.0**exponent if optimizer is adam else 1.0
    report = assert_equivalent(
        make_model,
        optimizer,
        tokens(items, seed=len(items)),
        steps=steps,
        loss_fn=functools.partial(token_sum_loss, scale=scale),
        num_items=token_count,
        max_grad_norm=max_grad_norm,
        make_scheduler=halving,
    )
    assert report.skipped == skipped_windows(items, steps)


def test_a_step_on_one_side_only_fails() -> None:
    # a num_items that counts 1 item for the accumulated run's micro-batches and none when
    # asked again for the large batch: one run steps, the other skips
    calls = itertools.count()

    def fickle_count(batch: Batch) -> int:
        return 1 if next(calls) < 2 else 0

    with pytest.raises(AssertionError, match="window 0: accumulated training stepped, but"):
        assert_equivalent(
            make_model, adam, tokens([3, 3]), steps=2, loss_fn=token_sum_loss,
            num_items=fickle_count,
        )  # fmt: skip


def test_tolerances_must_be_fractions() -> None:
    with pytest.raises(ConfigError, match="atol=2 would let a gradient twice"):
        assert_equivalent(make_model, adam, regression(2), atol=2)
    with pytest.raises(ConfigError, match="rtol must be a number >= 0"):
        assert_equivalent(make_model, adam, regression(2), rtol=-1e-5)


# -- on 2 ranks --------------------------------------------------------------------------------
def test_no_averaging_with_tiny_gradients_fails_on_two_ranks() -> None:
    loss = functools.partial(scaled_mse, scale=1e-7)  # every gradient below 1e-6
    with pytest.raises(AssertionError) as failure:
        assert_equivalent(
            make_model, adam, regression(8), steps=2, loss_fn=loss, world_size=2,
            wrap=leave_unwrapped,
        )  # fmt: skip
    message = str(failure.value)
    assert "rank 0 gradient 0.weight.grad" in message
    assert "different gradients (window 0: rank 0 and rank 1" in message
    assert "not averaged over the ranks" in message


def test_summing_hook_with_clipping_fails_on_two_ranks() -> None:
    wrap = functools.partial(ddp_with_hook, hook=summing_hook)
    with pytest.raises(AssertionError) as failure:
        assert_equivalent(
            make_model, sgd, regression(8), steps=2, world_size=2, wrap=wrap, max_grad_norm=0.1
        )
    message = str(failure.value)
    assert "rank 0 gradient 0.weight.grad" in message
    assert "rank 0's gradients in window 0 are 2 times the large batch's" in message
    assert "summed over the 2 ranks and not divided by the world size" in message


# rank r takes micro-batches r, r + 2, ...: per rank [a, b | c, d | e] in windows of 2
TWO_RANK_ITEMS = [
    0, 0, 0, 0,  # window 0: nothing on either rank: skipped
    0, 6, 0, 3,  # window 1: rank 0 has no items, rank 1 has
    5, 0,  # window 2 (short): one rank empty
]  # fmt: skip


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_windows_without_items_pass_on_two_ranks(wrap: str) -> None:
    report = assert_equivalent(
        make_model,
        adam,
        tokens(TWO_RANK_ITEMS),
        steps=2,
        loss_fn=token_sum_loss,
        num_items=token_count,
        max_grad_norm=1.0,
        make_scheduler=halving,
        world_size=2,
        wrap=wrap,
    )
    assert report.windows == (2, 2, 1)
    assert report.skipped == (0,) == skipped_windows(TWO_RANK_ITEMS, 2, world=2)
    assert not report.failed
