"""End of data without looking ahead (``flush``), and micro-batches with no items.

Every run is compared with a hand-written large-batch loop over the same samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import accumfn

from ._dist_utils import CLASSES, FEATURES, SEQ, Batch, items, token_loss, token_model

WINDOW = 4
LR = 0.3


def _batches(seed: int, count: int, empty: set[int] | None = None) -> list[Batch]:
    """Ragged token batches; those in ``empty`` have every label masked (no items)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        x = torch.randn(2, SEQ, FEATURES, generator=g)
        y = torch.randint(0, CLASSES, (2, SEQ), generator=g)
        keep = torch.randint(1, SEQ + 1, (2, 1), generator=g)
        y = y.masked_fill(torch.arange(SEQ) >= keep, -100)
        if empty and i in empty:
            y = torch.full_like(y, -100)
        out.append((x, y))
    return out


def _stream(batches: list[Batch]) -> Iterator[Batch]:
    """A loader with no len(): the end of data is only known when it is reached."""
    yield from batches


def _large_batch(windows: list[list[Batch]], item_mode: bool) -> tuple[list[torch.Tensor], int]:
    """One step per window on all its samples; a window without items is skipped."""
    model = token_model(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    applied = 0
    for window in windows:
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        if int((y != -100).sum()) == 0:
            continue
        if item_mode:
            token_loss(model, (x, y), "mean").backward()
        else:  # mean of the micro-batch means
            torch.stack([token_loss(model, b, "mean") for b in window]).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        applied += 1
    return [p.detach().clone() for p in model.parameters()], applied


def _windows(batches: list[Batch]) -> list[list[Batch]]:
    return [batches[i : i + WINDOW] for i in range(0, len(batches), WINDOW)]


def _functional(batches: list[Batch], item_mode: bool) -> tuple[list[torch.Tensor], int, int]:
    model = token_model(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    state = accumfn.init(WINDOW, max_grad_norm=None)
    reduction = "sum" if item_mode else "mean"
    for batch in _stream(batches):
        num_items = items(batch) if item_mode else None
        loss = token_loss(model, batch, reduction)
        state, stepped = accumfn.accumulate(state, loss, model, num_items=num_items)
        if stepped:
            state = accumfn.apply_step(state, optimizer, model)
    state, stepped = accumfn.flush(state, model)
    if stepped:
        state = accumfn.apply_step(state, optimizer, model)
    return (
        [p.detach().clone() for p in model.parameters()],
        state.optimizer_steps,
        state.skipped_steps,
    )


def _object(batches: list[Batch], item_mode: bool) -> tuple[list[torch.Tensor], int, int]:
    model = token_model(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    accumulator = accumfn.GradientAccumulator(optimizer, WINDOW, max_grad_norm=None)
    reduction = "sum" if item_mode else "mean"
    for batch in _stream(batches):
        num_items = items(batch) if item_mode else None
        accumulator.accumulate(token_loss(model, batch, reduction), model, num_items=num_items)
    accumulator.flush()
    stats = accumulator.stats
    return (
        [p.detach().clone() for p in model.parameters()],
        stats.optimizer_steps,
        stats.skipped_steps,
    )


@pytest.mark.parametrize("remainder", range(WINDOW))
@pytest.mark.parametrize("item_mode", [False, True], ids=["mean", "items"])
@pytest.mark.parametrize("run", [_functional, _object], ids=["functional", "object"])
def test_flush_after_a_loader_of_unknown_length_equals_large_batch(
    remainder: int, item_mode: bool, run: object
) -> None:
    batches = _batches(remainder, 2 * WINDOW + remainder)
    expected, applied = _large_batch(_windows(batches), item_mode)
    params, steps, skipped = run(batches, item_mode)  # type: ignore[operator]
    torch.testing.assert_close(params, expected, rtol=1e-5, atol=1e-6)
    assert (steps, skipped) == (applied, 0)
    assert applied == 2 + (remainder > 0)


def test_flush_with_no_window_open_changes_nothing() -> None:
    model = token_model(3)
    state = accumfn.init(WINDOW, max_grad_norm=None)
    flushed, stepped = accumfn.flush(state, model)
    assert (flushed, stepped) == (state, False)
    assert flushed is state
    with pytest.raises(accumfn.CallOrderError, match="already closed"):
        loss = token_loss(model, _batches(0, 1)[0], "mean")
        closed, _ = accumfn.accumulate(state, loss, model, is_final_batch=True)
        accumfn.flush(closed, model)


def test_flush_takes_the_windows_grad_scaler_on_one_process() -> None:
    """On one process ``flush`` needs no scaler (nothing is exchanged) and takes the one the
    window was scaled by; one given to a window scaled by none is refused, changing nothing.
    (Under data parallelism: tests/test_flush_scaler_ddp.py.)"""
    batches = _batches(9, 2)
    expected, _ = _large_batch([batches], item_mode=False)
    for passed in (None, "same"):
        model = token_model(3)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        state = accumfn.init(WINDOW, max_grad_norm=None)
        for batch in batches:
            loss = token_loss(model, batch, "mean")
            state, _ = accumfn.accumulate(state, loss, model, scaler=scaler)
        state, stepped = accumfn.flush(state, model, scaler=scaler if passed else None)
        assert stepped
        accumfn.apply_step(state, optimizer, model, scaler=scaler)
        torch.testing.assert_close(
            [p.detach() for p in model.parameters()], expected, rtol=1e-5, atol=1e-6
        )
    model = token_model(3)
    state, _ = accumfn.accumulate(
        accumfn.init(WINDOW), token_loss(model, batches[0], "mean"), model
    )
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(accumfn.ConfigError, match="flush was given a GradScaler"):
        accumfn.flush(state, model, scaler=torch.amp.GradScaler("cpu"))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert state.is_accumulating and not state.closed


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 3 * WINDOW),
    empty=st.sets(st.integers(0, 3 * WINDOW - 1), max_size=3 * WINDOW),
    seed=st.integers(0, 10_000),
)
def test_micro_batches_without_items_equal_large_batch_over_the_rest(
    count: int, empty: set[int], seed: int
) -> None:
    """Any micro-batches may have no items; a window with none at all is skipped."""
    batches = _batches(seed, count, empty)
    expected, applied = _large_batch(_windows(batches), item_mode=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        params, steps, skipped = _functional(batches, item_mode=True)
    torch.testing.assert_close(params, expected, rtol=1e-5, atol=1e-6)
    assert steps == applied
    assert steps + skipped == len(_windows(batches))
    assert all(torch.isfinite(p).all() for p in params)


def test_a_window_without_items_is_skipped_with_a_warning_and_no_scheduler_step() -> None:
    model = token_model(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    accumulator = accumfn.GradientAccumulator(optimizer, 2, scheduler=scheduler)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="num_items=0 on every micro-batch"):
        for batch in _batches(5, 2, empty={0, 1}):
            accumulator.accumulate(token_loss(model, batch, "sum"), model, num_items=0)
    torch.testing.assert_close([p.detach() for p in model.parameters()], before, rtol=0, atol=0)
    assert accumulator.stats.skipped_steps == 1
    assert accumulator.stats.optimizer_steps == 0
    assert scheduler.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", "1e20", "0"])
def test_a_bad_sync_timeout_is_refused_before_any_collective(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accumfn.parallel import _strategy as _distributed

    monkeypatch.setenv("ACCUMFN_SYNC_TIMEOUT", raw)
    with pytest.raises(accumfn.ConfigError, match="ACCUMFN_SYNC_TIMEOUT must be a number"):
        _distributed._timeout()


def test_sync_timeout_inf_waits_as_long_as_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    from accumfn.parallel import _strategy as _distributed

    monkeypatch.setenv("ACCUMFN_SYNC_TIMEOUT", "inf")
    assert _distributed._timeout() is None
    monkeypatch.setenv("ACCUMFN_SYNC_TIMEOUT", "2.5")
    assert _distributed._timeout() == __import__("datetime").timedelta(seconds=2.5)
