"""The functional API on real torch: equivalence, scaling, syncs, non-finite handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import accumfn
from accumfn.errors import CallOrderError

from .support import (
    HostSyncCounter,
    data,
    functional_run,
    large_batch_run,
    max_param_diff,
    mlp,
    mse,
    twin,
    windows_of,
)


@pytest.mark.parametrize("steps", [1, 3, 4])
@pytest.mark.parametrize("n_micro", [8, 10, 11])
def test_matches_large_batch_including_short_final_window(steps: int, n_micro: int) -> None:
    micro = 4
    model = mlp(0)
    ref = twin(model)
    x, y = data(0, micro * n_micro)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    state = functional_run(
        model, opt, list(zip(x.split(micro), y.split(micro), strict=True)), steps, 0.5
    )
    large_batch_run(ref, ref_opt, windows_of(x, y, micro, steps), 0.5)
    assert state.effective_step == -(-n_micro // steps)
    assert max_param_diff(model, ref) < 1e-6


def test_plain_loss_over_n_underweights_the_short_window() -> None:
    """What the guide's plain loss/N does: the last short window is not a mean. We differ."""
    micro, steps = 4, 4
    x, y = data(1, micro * 6)
    ref = mlp(1)
    large_batch_run(
        ref, torch.optim.SGD(ref.parameters(), lr=0.5), windows_of(x, y, micro, steps), None
    )
    naive = mlp(1)
    opt = torch.optim.SGD(naive.parameters(), lr=0.5)
    for i, (xb, yb) in enumerate(zip(x.split(micro), y.split(micro), strict=True)):
        (mse(naive, xb, yb) / steps).backward()
        if (i + 1) % steps == 0 or i == 5:
            opt.step()
            opt.zero_grad()
    assert max_param_diff(naive, ref) > 1e-3


def test_item_mode_matches_token_mean() -> None:
    model = mlp(2)
    ref = twin(model)
    x, y = data(2, 24)
    counts = [3, 7, 1, 5, 8]  # ragged micro-batches (sum 24), windows of 2: 10 | 6 | 8
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    state = accumfn.init(steps=2, max_grad_norm=None)
    start = 0
    for i, n in enumerate(counts):
        xb, yb = x[start : start + n], y[start : start + n]
        start += n
        loss = nn.functional.mse_loss(model(xb), yb, reduction="sum") / 3  # sum over items
        state, stepped = accumfn.accumulate(
            state, loss, model, num_items=n, is_final_batch=i == len(counts) - 1
        )
        if stepped:
            state = accumfn.apply_step(state, opt, model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    large_batch_run(ref, ref_opt, [(x[:10], y[:10]), (x[10:16], y[10:16]), (x[16:], y[16:])], None)
    assert max_param_diff(model, ref) < 1e-6


def test_input_state_is_never_mutated_and_stepped_means_closed() -> None:
    model = mlp(3)
    x, y = data(3, 8)
    state = accumfn.init(steps=2, max_grad_norm=None)
    before = state.to_dict()
    new, stepped = accumfn.accumulate(state, mse(model, x[:4], y[:4]), model)
    assert state.to_dict() == before and not stepped and new.micro_step == 1
    new, stepped = accumfn.accumulate(new, mse(model, x[4:], y[4:]), model)
    assert stepped and new.closed
    with pytest.raises(CallOrderError, match="call apply_step"):
        accumfn.accumulate(new, mse(model, x[4:], y[4:]), model)


def test_apply_step_without_closed_window_changes_nothing() -> None:
    model = mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state, _ = accumfn.accumulate(
        accumfn.init(steps=3, max_grad_norm=None), mse(model, *data(4, 4)), model
    )
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(CallOrderError, match="1 of 3 micro-steps"):
        accumfn.apply_step(state, opt, model)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    now = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads, now, strict=True))


def test_grads_are_set_to_none_after_a_step() -> None:
    model = mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state, stepped = accumfn.accumulate(
        accumfn.init(steps=1, max_grad_norm=None), mse(model, *data(5, 4)), model
    )
    assert stepped
    state = accumfn.apply_step(state, opt, model)
    assert all(p.grad is None for p in model.parameters())
    assert state.last_grad_norm is not None and state.last_grad_norm > 0


def test_non_boundary_micro_steps_make_no_host_sync() -> None:
    model = mlp(6)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    x, y = data(6, 40)
    state = accumfn.init(steps=5, max_grad_norm=1.0)
    syncs_by_step = []
    for i, (xb, yb) in enumerate(zip(x.split(4), y.split(4), strict=True)):
        loss = mse(model, xb, yb)
        with HostSyncCounter() as counter:
            state, stepped = accumfn.accumulate(state, loss, model, num_items=None, scaler=scaler)
            if stepped:
                report = accumfn.step_window(state, opt, model, scaler=scaler)
                state = report.state
        syncs_by_step.append((i, stepped, len(counter.calls)))
    non_boundary = [n for _, stepped, n in syncs_by_step if not stepped]
    assert len(non_boundary) == 8 and sum(non_boundary) == 0


def test_gradient_scaler_bf16_with_injected_inf_is_skipped_and_counted() -> None:
    model = mlp(7)
    ref = twin(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = data(7, 24)
    state = accumfn.init(steps=2, max_grad_norm=10.0)
    for i, (xb, yb) in enumerate(zip(x.split(4), y.split(4), strict=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mse(model, xb, yb)
        if i == 3:  # second window: poison it with an inf gradient
            loss = loss + model[0].weight.sum() * torch.tensor(float("inf"))
        state, stepped = accumfn.accumulate(state, loss, model, scaler=scaler)
        if stepped:
            state = accumfn.apply_step(state, opt, model, scaler=scaler, scheduler=sched)
    assert (state.effective_step, state.optimizer_steps, state.skipped_steps) == (3, 2, 1)
    assert sched.last_epoch == 2  # stepped only on applied windows
    assert scaler.get_scale() == 2.0**10 * 0.5  # backed off once, no growth yet
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max_param_diff(model, ref) > 0  # it did train


def test_skip_nonfinite_without_scaler() -> None:
    model = mlp(8)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    state = accumfn.init(steps=1, skip_nonfinite=True, max_grad_norm=None)
    loss = mse(model, *data(8, 4)) * torch.tensor(float("nan"))
    state, _ = accumfn.accumulate(state, loss, model)
    state = accumfn.apply_step(state, opt, model)
    assert (state.optimizer_steps, state.skipped_steps) == (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters()) and not opt.state


def test_reset_epoch_discards_open_window_without_leaking() -> None:
    model = mlp(9)
    ref = twin(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(9, 16)
    state = accumfn.init(steps=3, max_grad_norm=None)
    state, _ = accumfn.accumulate(state, mse(model, x[:4], y[:4]), model)
    with pytest.warns(UserWarning, match="discarded an open window of 1"):
        state = accumfn.reset_epoch(state, opt, model)
    assert state.epoch == 1 and state.dropped_micro_steps == 1 and not state.is_accumulating
    state = functional_run(model, opt, [(x[4:8], y[4:8])], steps=3, max_grad_norm=None)
    large_batch_run(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[4:8], y[4:8])], None)
    assert max_param_diff(model, ref) < 1e-7
