"""Item counts given as tensors, and the window's loss, on one process.

Every run is compared with one large batch per window over the same micro-batches
(parameters and loss); host reads are counted with ``accumfn.testing.HostSyncCounter``.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from typing import Any

import attrs
import pytest
import torch

import accumfn
from accumfn import CallableSink, ConfigError, MetricsTracker
from accumfn.testing import HostSyncCounter

from ._counted_windows import (
    LR,
    accumulated_run,
    count_of,
    large_batch_losses,
    schedule_of,
)
from ._dist_utils import make_windows, token_loss, token_model

LENGTHS = (3, 1, 4, 2)  # the last is closed by is_final_batch before the schedule's 4
TOL = 2e-6  # fp32 rounding of a loss near 1.6


def _windows(seed: int = 0, *, ragged: bool = True, empty: bool = True) -> Any:
    data = make_windows(seed, LENGTHS, 2, ragged, world=1)
    if empty:  # a micro-batch with no item at all (count 0) in the third window
        x, y = data[2][1][0]
        data[2][1][0] = (x, torch.full_like(y, -100))
    return data


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)


def _reference(data: Any, *, item_mode: bool) -> tuple[list[float], list[torch.Tensor]]:
    model = token_model(0)
    losses = large_batch_losses(model, _sgd(model), data, item_mode=item_mode)
    return losses, [p.detach().clone() for p in model.parameters()]


def _assert_matches(run: dict[str, Any], losses: list[float], params: list[torch.Tensor]) -> None:
    assert run["losses"] == pytest.approx(losses, rel=TOL, abs=TOL)
    for got, want in zip(run["params"], params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("api", ["functional", "object"])
@pytest.mark.parametrize("how", ["tensor", "int", "mixed"])
def test_item_mode_matches_the_large_batch(api: str, how: str) -> None:
    """Ragged counts, a micro-batch of count 0, windows of 3, 1, 4 and a short final 2."""
    data = _windows()
    losses, params = _reference(data, item_mode=True)
    model = token_model(0)
    run = accumulated_run(model, _sgd(model), data, how=how, api=api)
    _assert_matches(run, losses, params)


@pytest.mark.parametrize("api", ["functional", "object"])
def test_mean_mode_window_loss_is_the_mean_over_the_window(api: str) -> None:
    data = _windows(1, ragged=False, empty=False)  # equal micro-batches: means of means
    losses, params = _reference(data, item_mode=False)
    model = token_model(0)
    run = accumulated_run(model, _sgd(model), data, how=None, api=api)
    _assert_matches(run, losses, params)


def _reads(run: dict[str, Any]) -> tuple[list[int], list[int]]:
    inside = [len(calls) for closed, calls in run["reads"] if not closed]
    boundary = [len(calls) for closed, calls in run["reads"] if closed]
    return inside, boundary


@pytest.mark.parametrize(
    ("how", "per_window"),
    [("tensor", [1, 1, 1, 1]), ("mixed", [1, 0, 1, 1]), ("int", [0] * 4), (None, [0] * 4)],
)
@pytest.mark.parametrize("api", ["functional", "object"])
def test_host_reads_none_inside_a_window_at_most_one_per_window(
    api: str, how: str | None, per_window: list[int]
) -> None:
    """Counts given as tensors are read once per window, at its boundary (``item``); the
    window's loss is never read. (``mixed``: the second window, one micro-batch, has an
    int count only.)"""
    data = _windows(2, ragged=how is not None, empty=False)
    model = token_model(0)
    run = accumulated_run(model, _sgd(model), data, how=how, api=api)
    inside, boundary = _reads(run)
    assert len(inside) == sum(LENGTHS) - len(LENGTHS)
    assert set(inside) == {0}
    assert boundary == per_window
    assert {tuple(calls) for closed, calls in run["reads"] if closed} <= {("item",), ()}


def test_counting_on_the_host_reads_every_micro_step() -> None:
    """What the counts as tensors replace: ``int((labels != -100).sum())`` per micro-step."""
    batch = _windows(2)[0][0][0]
    with HostSyncCounter() as counter:
        int((batch[1] != -100).sum())
    assert counter.calls == ["__int__"]


def test_a_window_without_items_is_skipped_and_its_loss_is_nan() -> None:
    data = make_windows(3, (2, 2), 2, True, world=1)
    for m in range(2):  # the first window has no item at all
        x, y = data[0][m][0]
        data[0][m][0] = (x, torch.full_like(y, -100))
    model = token_model(0)
    optimizer = _sgd(model)
    before = [p.detach().clone() for p in model.parameters()]
    state = accumfn.init(2, max_grad_norm=None)
    reports = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the window closed with num_items=0")
        for window in data:
            for ranks in window:
                loss = token_loss(model, ranks[0], "sum")
                num_items = (ranks[0][1] != -100).sum()
                state, stepped = accumfn.accumulate(state, loss, model, num_items=num_items)
                if stepped:
                    reports.append(accumfn.step_window(state, optimizer, model))
                    state = reports[-1].state
                    if len(reports) == 1:
                        for p, q in zip(model.parameters(), before, strict=True):
                            assert torch.equal(p, q)
    assert (state.optimizer_steps, state.skipped_steps) == (1, 1)
    assert math.isnan(float(reports[0].window_loss))  # the large batch's empty mean
    reference = token_model(0)
    want = large_batch_losses(reference, _sgd(reference), data[1:], item_mode=True)
    assert float(reports[1].window_loss) == pytest.approx(want[0], rel=TOL)


BAD_TENSORS = [
    (torch.tensor(3.0), r"got a torch\.float32 tensor"),
    (torch.tensor(True), r"got a torch\.bool tensor"),
    (torch.tensor([3]), r"tensor of shape \(1,\)"),
    (torch.empty((), dtype=torch.int64, device="meta"), "meta device"),
]


def _grads(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _same_grads(model: torch.nn.Module, grads: list[torch.Tensor | None]) -> bool:
    return all(
        (g is None and p.grad is None) or (g is not None and torch.equal(p.grad, g))
        for p, g in zip(model.parameters(), grads, strict=True)
    )


@pytest.mark.parametrize(("bad", "message"), BAD_TENSORS, ids=["float", "bool", "shape", "meta"])
def test_bad_tensor_counts_are_refused_before_anything_runs(
    bad: torch.Tensor, message: str
) -> None:
    data = _windows(4)
    model = token_model(0)
    state = accumfn.init(3, max_grad_norm=None)
    first = data[0][0][0]
    state, _ = accumfn.accumulate(
        state, token_loss(model, first, "sum"), model, num_items=count_of(first, "tensor", 0)
    )
    grads, held = _grads(model), state.to_dict()
    with HostSyncCounter() as counter, pytest.raises(ConfigError, match=message):
        accumfn.accumulate(state, token_loss(model, data[0][1][0], "sum"), model, num_items=bad)
    assert counter.calls == []  # checked without reading it
    assert _same_grads(model, grads) and state.to_dict() == held


@pytest.mark.parametrize("where", ["inside", "boundary"])
def test_a_negative_count_is_caught_at_the_boundary_before_its_backward(where: str) -> None:
    data = _windows(5)
    model = token_model(0)
    optimizer = _sgd(model)
    state = accumfn.init(3, max_grad_norm=None)
    batches = [ranks[0] for ranks in data[0]]
    for index, batch in enumerate(batches[:2]):
        count = (
            torch.tensor(-3) if where == "inside" and index == 1 else count_of(batch, "tensor", 0)
        )
        state, _ = accumfn.accumulate(
            state, token_loss(model, batch, "sum"), model, num_items=count
        )
    grads, held = _grads(model), state.to_dict()
    params = [p.detach().clone() for p in model.parameters()]
    last = torch.tensor(-3) if where == "boundary" else count_of(batches[2], "tensor", 0)
    with pytest.raises(ConfigError, match=r"num_items was negative \(-3\)"):
        accumfn.accumulate(state, token_loss(model, batches[2], "sum"), model, num_items=last)
    assert _same_grads(model, grads) and state.to_dict() == held
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert optimizer.state == {}


def _functional_step(
    state: accumfn.AccumState,
    step: tuple[torch.Tensor, torch.nn.Module, torch.optim.Optimizer],
    final: bool,
    count: Any,
    losses: list[float],
) -> accumfn.AccumState:
    """One functional micro-step; a closed window is stepped and its loss appended."""
    loss, model, optimizer = step
    state, stepped = accumfn.accumulate(state, loss, model, is_final_batch=final, num_items=count)
    if stepped:
        report = accumfn.step_window(state, optimizer, model)
        losses.append(float(report.window_loss))
        return report.state
    return state


def _checkpointed_run(api: str, data: Any, stop: int, via: str) -> dict[str, Any]:
    """Tensor counts; a checkpoint after micro-batch ``stop`` (inside a window), loaded into
    a fresh model, optimizer and accumulator, which run to the end."""
    flat = [ranks[0] for window in data for ranks in window]
    lengths = [len(window) for window in data]
    model = token_model(0)
    optimizer = _sgd(model)
    accumulator = accumfn.GradientAccumulator(optimizer, schedule_of(lengths), max_grad_norm=None)
    state = accumfn.init(schedule_of(lengths), max_grad_norm=None)
    losses: list[float] = []
    reads: list[str] = []
    for index, batch in enumerate(flat):
        final = index == len(flat) - 1
        loss = token_loss(model, batch, "sum")
        count = count_of(batch, "tensor", index)
        if api == "object":
            if accumulator.accumulate(loss, model, is_final_batch=final, num_items=count):
                losses.append(accumulator.stats.last_window_loss)
        else:
            state = _functional_step(state, (loss, model, optimizer), final, count, losses)
        if index != stop:
            continue
        with HostSyncCounter() as counter:
            if api == "object":
                saved = accumulator.state_dict()
            else:
                saved = accumfn.checkpoint.capture(state, optimizer)
        reads = counter.calls
        buffer = io.BytesIO()
        if via == "pickle" and api == "object":
            grads = [p.grad for p in model.parameters()]  # (a pickled Parameter drops .grad)
            torch.save({"acc": accumulator, "model": model, "grads": grads}, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
            model, accumulator = loaded["model"], loaded["acc"]
            optimizer = accumulator.optimizer
            for param, grad in zip(model.parameters(), loaded["grads"], strict=True):
                param.grad = grad
            continue
        torch.save(
            {"accum": saved, "model": model.state_dict(), "opt": optimizer.state_dict()}, buffer
        )
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        model = token_model(7)
        model.load_state_dict(loaded["model"])
        optimizer = _sgd(model)
        optimizer.load_state_dict(loaded["opt"])
        if api == "object":
            accumulator = accumfn.GradientAccumulator(
                optimizer, schedule_of(lengths), max_grad_norm=None
            )
            accumulator.load_state_dict(loaded["accum"])
        else:
            state = accumfn.checkpoint.restore(
                loaded["accum"], accumfn.init(schedule_of(lengths), max_grad_norm=None), optimizer
            )
    return {
        "losses": losses,
        "params": [p.detach().clone() for p in model.parameters()],
        "reads": reads,
    }


@pytest.mark.parametrize("via", ["checkpoint", "pickle"])
@pytest.mark.parametrize("api", ["functional", "object"])
def test_a_checkpoint_inside_a_window_keeps_its_tensor_counts_and_loss(api: str, via: str) -> None:
    if via == "pickle" and api == "functional":
        pytest.skip("a functional state is checkpointed with capture()")
    data = _windows(6)
    losses, params = _reference(data, item_mode=True)
    stop = LENGTHS[0] + LENGTHS[1] + 1  # two micro-batches into the third window
    run = _checkpointed_run(api, data, stop, via)
    _assert_matches(run, losses, params)
    assert run["reads"] == ["tolist"]  # the count and the loss so far, read together


def test_a_state_saved_inside_a_window_holds_the_tensor_counts() -> None:
    data = _windows(6)
    model = token_model(0)
    state = accumfn.init(4, max_grad_norm=None)
    counts = []
    for index, ranks in enumerate(data[2][:3]):
        count = count_of(ranks[0], "mixed", index)
        counts.append(int(count) if count is not None else 0)
        state, _ = accumfn.accumulate(
            state, token_loss(model, ranks[0], "sum"), model, num_items=count
        )
    saved = accumfn.checkpoint.capture(state, _sgd(model))
    assert saved["accumfn"]["window_items"] == sum(counts)
    assert saved["accumfn"]["window_device_counts"] == 0  # read into window_items
    assert state.window_device_counts == 2
    assert state.window_items == counts[1]  # the state itself holds only the ints
    assert math.isfinite(saved["window_loss"])


def test_grad_scaler_window_loss_is_unscaled() -> None:
    data = _windows(7)
    losses, params = _reference(data, item_mode=True)
    for api in ("functional", "object"):
        model = token_model(0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        run = accumulated_run(model, _sgd(model), data, how="tensor", api=api, scaler=scaler)
        _assert_matches(run, losses, params)
        assert scaler.get_scale() == 2.0**12  # no step skipped


def test_stats_before_the_first_window_and_after() -> None:
    model = token_model(0)
    accumulator = accumfn.GradientAccumulator(_sgd(model), 2, max_grad_norm=None)
    assert accumulator.window_loss is None
    assert math.isnan(accumulator.stats.last_window_loss)
    batch = _windows(8)[0][0][0]
    for _ in range(2):
        loss = token_loss(model, batch, "sum")
        accumulator.accumulate(loss, model, num_items=(batch[1] != -100).sum())
    assert accumulator.window_loss is not None and accumulator.window_loss.dtype == torch.float64
    with HostSyncCounter() as counter:
        value = accumulator.stats.last_window_loss
    assert counter.calls == ["__float__"]  # read when asked
    want = token_loss(token_model(0), batch, "mean")
    assert value == pytest.approx(float(want.detach()), rel=TOL)


def test_flush_closes_a_window_of_tensor_counts() -> None:
    data = make_windows(9, (3, 2), 2, True, world=1)  # a stream: the last window is short
    losses, params = _reference(data, item_mode=True)
    model = token_model(0)
    optimizer = _sgd(model)
    state = accumfn.init(3, max_grad_norm=None)
    got = []
    for window in data:
        for ranks in window:
            loss = token_loss(model, ranks[0], "sum")
            state, stepped = accumfn.accumulate(
                state, loss, model, num_items=(ranks[0][1] != -100).sum()
            )
            if stepped:
                report = accumfn.step_window(state, optimizer, model)
                state, got = report.state, [*got, float(report.window_loss)]
    with HostSyncCounter() as counter:
        state, stepped = accumfn.flush(state, model)
    assert stepped and counter.calls == ["item"]
    report = accumfn.step_window(state, optimizer, model)
    got.append(float(report.window_loss))
    assert got == pytest.approx(losses, rel=TOL)
    for p, q in zip(model.parameters(), params, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("api", ["functional", "object"])
def test_metrics_tracker_logs_the_window_loss_reading_only_when_a_row_is_written(
    api: str,
) -> None:
    data = _windows(10)
    losses, _ = _reference(data, item_mode=True)
    lengths = [len(window) for window in data]
    rows: list[tuple[int, dict[str, float]]] = []
    tracker = MetricsTracker(sinks=[CallableSink(lambda step, row: rows.append((step, row)))])
    model = token_model(0)
    optimizer = _sgd(model)
    accumulator = accumfn.GradientAccumulator(optimizer, schedule_of(lengths), max_grad_norm=None)
    state = accumfn.init(schedule_of(lengths), max_grad_norm=None)
    reads: list[tuple[bool, list[str]]] = []
    flat = [ranks[0] for window in data for ranks in window]
    for index, batch in enumerate(flat):
        loss = token_loss(model, batch, "sum")
        count = count_of(batch, "tensor", index)
        final = index == len(flat) - 1
        with HostSyncCounter() as counter:
            if api == "object":
                stepped = accumulator.accumulate(loss, model, is_final_batch=final, num_items=count)
                tracker.log_window_loss(accumulator, "train/loss")
            else:
                state, stepped = accumfn.accumulate(
                    state, loss, model, is_final_batch=final, num_items=count
                )
                if stepped:
                    report = accumfn.step_window(state, optimizer, model)
                    state = report.state
                    tracker.log_window_loss(report, "train/loss")
        reads.append((stepped, counter.calls))
    tracker.close()
    assert [step for step, _ in rows] == list(range(len(LENGTHS)))
    assert [row["train/loss"] for _, row in rows] == pytest.approx(losses, rel=TOL)
    assert all(calls == [] for stepped, calls in reads if not stepped)
    # a window's boundary: its count (item), and the previous window's row (tolist)
    assert [calls for stepped, calls in reads if stepped] == [["item"]] + [["item", "tolist"]] * (
        len(LENGTHS) - 1
    )


def test_log_window_loss_refuses_other_sources() -> None:
    tracker = MetricsTracker(sinks=[CallableSink(lambda step, row: None)])
    with pytest.raises(ConfigError, match="GradientAccumulator or the StepReport"):
        tracker.log_window_loss(accumfn.init(2))  # type: ignore[arg-type]
    tracker.close()


def test_a_copied_state_has_no_tally_and_its_window_loss_is_nan() -> None:
    """The tally follows the state object accumulate returned; a copy (pickle) has none, so
    its window's loss is unknown (nan) rather than a partial sum."""
    data = _windows(11)
    model = token_model(0)
    state = accumfn.init(2, max_grad_norm=None)
    state, _ = accumfn.accumulate(
        state, token_loss(model, data[0][0][0], "sum"), model, num_items=5
    )
    copied = pickle.loads(pickle.dumps(state))
    closed, stepped = accumfn.accumulate(
        copied, token_loss(model, data[0][1][0], "sum"), model, num_items=5
    )
    assert stepped
    report = accumfn.step_window(closed, _sgd(model), model)
    assert math.isnan(float(report.window_loss))


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda state: pickle.loads(pickle.dumps(state)),
    "to_dict": lambda state: accumfn.AccumState.from_dict(state.to_dict()),
    "evolve": attrs.evolve,
}
COPIED_AT = ["inside", "boundary", "flush", "capture"]


@pytest.mark.parametrize("at", COPIED_AT)
@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_a_window_with_tensor_counts_is_refused_and_changes_nothing(
    how: str, at: str
) -> None:
    """A copy of a state whose open window counted items on the device lacks those counts
    (they are kept beside the state ``accumulate`` returned): it is refused at the next
    micro-batch, the boundary, ``flush`` and ``capture``, before anything runs; the state
    ``accumulate`` returned then finishes the window as the large batch does."""
    data = _windows(12, empty=False)
    window = [ranks[0] for ranks in data[0]]  # 3 micro-batches
    model = token_model(0)
    optimizer = _sgd(model)
    state = accumfn.init(3, max_grad_norm=None)
    kept = 2 if at in ("boundary", "flush") else 1
    for index, batch in enumerate(window[:kept]):  # a tensor count, then an int one
        count = count_of(batch, "mixed", index)
        state, _ = accumfn.accumulate(
            state, token_loss(model, batch, "sum"), model, num_items=count
        )
    copied = COPIES[how](state)
    assert copied == state and copied.window_device_counts == 1
    grads, params, held = (
        _grads(model),
        [p.detach().clone() for p in model.parameters()],
        (state.to_dict()),
    )
    message = r"counted num_items on the device \(a tensor\) on 1 of its .*checkpoint\.capture"
    with pytest.raises(ConfigError, match=message):
        if at == "flush":
            accumfn.flush(copied, model)
        elif at == "capture":
            accumfn.checkpoint.capture(copied, optimizer)
        else:
            batch = window[kept]
            loss = token_loss(model, batch, "sum")
            accumfn.accumulate(copied, loss, model, num_items=count_of(batch, "tensor", 0))
    assert _same_grads(model, grads) and state.to_dict() == held == copied.to_dict()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert optimizer.state == {}
    for index, batch in enumerate(window[kept:], start=kept):  # the state accumulate returned
        count = count_of(batch, "mixed", index)
        state, stepped = accumfn.accumulate(
            state, token_loss(model, batch, "sum"), model, num_items=count
        )
    assert stepped
    report = accumfn.step_window(state, optimizer, model)
    losses, want = _reference(data[:1], item_mode=True)
    assert float(report.window_loss) == pytest.approx(losses[0], rel=TOL, abs=TOL)
    for got, expected in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def test_a_copy_with_only_int_counts_continues_and_an_old_dict_counts_none_on_the_device() -> None:
    """Ints are in the state itself, so its copy goes on (its window's loss unknown); a dict
    saved before the device counts were recorded loads with none."""
    model = token_model(0)
    batch = _windows(13)[0][0][0]
    state, _ = accumfn.accumulate(
        accumfn.init(3, max_grad_norm=None), token_loss(model, batch, "sum"), model, num_items=4
    )
    assert state.window_device_counts == 0
    accumfn.accumulate(copy.deepcopy(state), token_loss(model, batch, "sum"), model, num_items=4)
    old = state.to_dict()
    del old["window_device_counts"]
    assert accumfn.AccumState.from_dict(old) == state
    with pytest.raises(ConfigError, match=r"window_device_counts \(2\) must be at most"):
        attrs.evolve(state, window_device_counts=2)


def test_a_copied_accumulator_keeps_its_tensor_counts() -> None:
    """``copy.deepcopy`` of a GradientAccumulator inside a window carries what its state
    keeps on the device: the copy finishes the window as the large batch does."""
    data = _windows(14, empty=False)
    window = [ranks[0] for ranks in data[0]]
    model = token_model(0)
    accumulator = accumfn.GradientAccumulator(_sgd(model), 3, max_grad_norm=None)
    for index, batch in enumerate(window[:2]):
        loss = token_loss(model, batch, "sum")
        accumulator.accumulate(loss, model, num_items=count_of(batch, "tensor", index))
    grads = [p.grad for p in model.parameters()]
    both = copy.deepcopy({"acc": accumulator, "model": model, "grads": grads})
    twin, twin_model = both["acc"], both["model"]
    for param, grad in zip(twin_model.parameters(), both["grads"], strict=True):
        param.grad = grad  # (a copied Parameter drops .grad)
    loss = token_loss(twin_model, window[2], "sum")
    assert twin.accumulate(loss, twin_model, num_items=count_of(window[2], "tensor", 2))
    losses, want = _reference(data[:1], item_mode=True)
    assert twin.stats.last_window_loss == pytest.approx(losses[0], rel=TOL, abs=TOL)
    for got, expected in zip(twin_model.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("item_mode", [True, False], ids=["items", "mean"])
@pytest.mark.parametrize("api", ["functional", "object"])
def test_caller_closed_windows_with_tensor_counts(api: str, item_mode: bool) -> None:
    """``steps=None``: windows of 1, 5, 3 and 2 micro-batches closed by
    ``is_final_batch=True``, the last one by ``flush``; counts as tensors, one read per
    window; the update and the window's loss those of the large batch."""
    data = make_windows(12, (1, 5, 3, 2), 2, item_mode, world=1)
    losses, params = _reference(data, item_mode=item_mode)
    model = token_model(0)
    optimizer = _sgd(model)
    accumulator = accumfn.GradientAccumulator(optimizer, None, max_grad_norm=None)
    state = accumfn.init(None, max_grad_norm=None)
    got: list[float] = []
    reads: list[list[str]] = []
    for w, window in enumerate(data):
        for m, ranks in enumerate(window):
            batch = ranks[0]
            closes = m == len(window) - 1 and w < len(data) - 1  # the last: flush
            loss = token_loss(model, batch, "sum" if item_mode else "mean")
            count = count_of(batch, "tensor" if item_mode else None, m)
            with HostSyncCounter() as counter:
                if api == "object":
                    if accumulator.accumulate(loss, model, is_final_batch=closes, num_items=count):
                        got.append(accumulator.stats.last_window_loss)
                else:
                    state = _functional_step(state, (loss, model, optimizer), closes, count, got)
            if not closes:
                reads.append(counter.calls)
    if api == "object":
        assert accumulator.flush(model)
        got.append(accumulator.stats.last_window_loss)
    else:
        state, stepped = accumfn.flush(state, model)
        assert stepped
        got.append(float(accumfn.step_window(state, optimizer, model).window_loss))
    assert all(calls == [] for calls in reads)
    assert got == pytest.approx(losses, rel=TOL, abs=TOL)
    for p, q in zip(model.parameters(), params, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
