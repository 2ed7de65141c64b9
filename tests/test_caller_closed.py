"""Windows the caller closes (``steps=None``) on one process, against one large batch.

Each window holds a different number of micro-batches (1 to 64); the caller closes it with
``is_final_batch=True`` on its last micro-batch, or with ``flush`` after it. Mean mode
equals the mean over the window's micro-batches, item mode the mean over its items.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import accumfn
from accumfn import core

from ._dist_utils import Batch, items, token_batch, token_loss, token_model

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (1, 7, 64, 3, 2, 33)
"""Micro-batches per window: a different number every window."""
MICRO = 2
LR = 0.1


def rollouts(
    seed: int, lengths: Sequence[Sequence[int]], ragged: bool, micro: int = MICRO
) -> list[list[list[Batch]]]:
    """``data[w][r]``: the micro-batches of window ``w`` on rank ``r`` (``lengths[w][r]`` of
    them). With ``ragged`` every sequence masks a random tail (at least one label stays)."""
    g = torch.Generator().manual_seed(seed)
    return [
        [[token_batch(g, micro, ragged) for _ in range(count)] for count in per_rank]
        for per_rank in lengths
    ]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)


def large_batch(
    model: nn.Module, data: list[list[list[Batch]]], max_grad_norm: float | None = None
) -> dict[str, list[Any]]:
    """By hand: one step per window on all its micro-batches of all ranks as one batch
    (token mean; equal-sized unmasked micro-batches make it the mean of their means).
    Returns the parameters after each window, each window's loss and pre-clip norm."""
    optimizer = sgd(model)
    params, losses, norms = [], [], []
    for window in data:
        batches = [batch for rank in window for batch in rank]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        loss = token_loss(model, (x, y), "mean")
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        params.append([p.detach().clone() for p in model.parameters()])
    return {"params": params, "losses": losses, "norms": norms}


def one_rank(lengths: Sequence[int]) -> list[list[int]]:
    return [[length] for length in lengths]


def train(
    model: nn.Module,
    data: list[list[list[Batch]]],
    *,
    api: str,
    item_mode: bool,
    rank: int = 0,
    max_grad_norm: float | None = None,
) -> dict[str, list[Any]]:
    """Caller-closed windows: ``api`` is "functional", "object", or "flush" (the object API,
    each window closed by ``flush`` after its last micro-batch)."""
    optimizer = sgd(model)
    reduction = "sum" if item_mode else "mean"
    acc = None
    state = accumfn.init(None, max_grad_norm=max_grad_norm)
    if api == "functional":
        accumfn.prepare_forward(state, model)
    else:
        acc = accumfn.GradientAccumulator(
            optimizer, None, max_grad_norm=max_grad_norm, track_grad_norm=True
        )
        acc.prepare(model)
    params, losses, norms = [], [], []
    for window in data:
        batches = window[rank]
        sums = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1 and api != "flush"
            loss = token_loss(model, batch, reduction)
            sums.append(float(loss.detach()))
            num_items = items(batch) if item_mode else None
            if acc is None:
                state, stepped = accumfn.accumulate(
                    state, loss, model, is_final_batch=last, num_items=num_items
                )
                if stepped:
                    report = accumfn.step_window(state, optimizer, model, grad_norm=True)
                    state = report.state
                    norms.append(float(report.grad_norm))  # type: ignore[arg-type]
            else:
                stepped = acc.accumulate(loss, model, is_final_batch=last, num_items=num_items)
            assert stepped == last
        if api == "flush":
            assert acc is not None and acc.flush(model)
        if acc is not None:
            norms.append(acc.stats.last_grad_norm)
            state = acc.state
        count = state.micro_step  # 0: the window was stepped
        assert count == 0 and not state.is_accumulating
        losses.append(sum(sums) / len(sums))
        params.append([p.detach().clone() for p in _plain(model).parameters()])
    return {"params": params, "losses": losses, "norms": norms, "state": state}


def _plain(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def assert_same(run: dict[str, list[Any]], reference: dict[str, list[Any]]) -> float:
    """Parameters after every window and every window's pre-clip norm; the largest
    parameter difference."""
    worst = 0.0
    for got, want in zip(run["params"], reference["params"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)))
    torch.testing.assert_close(run["norms"], reference["norms"], rtol=1e-5, atol=1e-7)
    return worst


@pytest.mark.parametrize("api", ["functional", "object", "flush"])
@pytest.mark.parametrize("item_mode", [False, True], ids=["mean", "items"])
def test_caller_closed_windows_equal_the_large_batch(api: str, item_mode: bool) -> None:
    data = rollouts(1, one_rank(LENGTHS), ragged=item_mode)
    run = train(token_model(3), data, api=api, item_mode=item_mode)
    reference = large_batch(token_model(3), data)
    assert_same(run, reference)
    if not item_mode:  # the mean of the micro-batch means is the large batch's loss
        torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-6, atol=1e-7)
    state = run["state"]
    assert state.optimizer_steps == len(LENGTHS) and state.total_micro_steps == sum(LENGTHS)
    assert state.window == 0 and state.caller_closed


def test_caller_closed_windows_clip_the_window_s_gradient_once() -> None:
    data = rollouts(2, one_rank((5, 1, 12)), ragged=True)
    run = train(token_model(4), data, api="object", item_mode=True, max_grad_norm=0.05)
    assert_same(run, large_batch(token_model(4), data, max_grad_norm=0.05))


def test_the_core_plans_no_division_and_rescales_by_one_over_k() -> None:
    state = accumfn.init(None)
    for k in (1, 5, 64):
        for i in range(k):
            assert not core.sync_next_forward(state)
            assert core.closes_window(state, i == k - 1) == (i == k - 1)
            state, plan = core.micro_step(state, is_final_batch=i == k - 1)
            assert plan.loss_divisor == 1 and plan.boundary == (i == k - 1)
        closed = core.close_window(state, averaged_over=2, global_micro_steps=k + 3)
        assert closed.grad_scale == 2 / (k + 3)
        state = core.finish_step(closed, applied=True)
        assert (state.window, state.micro_step) == (0, 0)
    state, dropped = core.start_epoch(core.micro_step(state)[0])
    assert (dropped, state.window, state.epoch) == (1, 0, 1)


def test_accumulator_reports_no_planned_window() -> None:
    model = token_model(0)
    acc = accumfn.GradientAccumulator(sgd(model), None, batch_size=4)
    assert acc.accumulation_steps is None and acc.stats.effective_batch_size is None
    with pytest.raises(accumfn.ConfigError, match="no fixed effective batch size"):
        acc.effective_batch_size  # noqa: B018
    with pytest.raises(accumfn.ConfigError, match="no fixed effective batch size"):
        acc.state.effective_batch_size  # noqa: B018
    assert "of a window the caller closes" in core.window_progress(core.micro_step(acc.state)[0])


def test_is_final_batch_closes_only_this_window() -> None:
    """Under steps=None a closed window is not the end of the data: the next micro-batch
    opens the next window, and no extra exchange is made for it."""
    data = rollouts(5, one_rank((2, 3)), ragged=False)
    model = token_model(5)
    acc = accumfn.GradientAccumulator(sgd(model), None, max_grad_norm=None)
    for window in data:
        for i, batch in enumerate(window[0]):
            acc.accumulate(token_loss(model, batch, "mean"), model, is_final_batch=i == 1)
    assert acc.stats.optimizer_steps == 2 and acc.stats.current_accumulation == 1
    assert acc.flush(model) and acc.stats.optimizer_steps == 3


# -- checkpoints inside a window ----------------------------------------------------------------

CUT = (1, 2)
"""Checkpoint after micro-batch 2 of window 1."""
RESUME_LENGTHS = (4, 5, 3)


def _resume_data(item_mode: bool) -> list[list[list[Batch]]]:
    return rollouts(6, one_rank(RESUME_LENGTHS), ragged=item_mode)


def _continue(
    model: nn.Module,
    acc: accumfn.GradientAccumulator,
    data: list[list[list[Batch]]],
    item_mode: bool,
    start: tuple[int, int],
    stop: tuple[int, int] | None = None,
) -> None:
    """Micro-batches from ``start`` (window, index) up to ``stop`` (not included)."""
    for w, window in enumerate(data):
        batches = window[0]
        for m, batch in enumerate(batches):
            if (w, m) < start:
                continue
            if stop is not None and (w, m) >= stop:
                return
            loss = token_loss(model, batch, "sum" if item_mode else "mean")
            acc.accumulate(
                loss,
                model,
                is_final_batch=m == len(batches) - 1,
                num_items=items(batch) if item_mode else None,
            )


def _fresh(seed: int = 7) -> tuple[nn.Module, accumfn.GradientAccumulator]:
    model = token_model(seed)
    return model, accumfn.GradientAccumulator(sgd(model), None, max_grad_norm=None)


def _save(path: Path, model: nn.Module, acc: accumfn.GradientAccumulator) -> None:
    optimizer = acc.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    accumfn.save_checkpoint(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "acc": acc.state_dict()},
        path,
    )


def _load(path: Path, model: nn.Module, acc: accumfn.GradientAccumulator) -> None:
    saved = accumfn.load_checkpoint(path)
    model.load_state_dict(saved["model"])
    optimizer = acc.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    optimizer.load_state_dict(saved["optimizer"])
    acc.load_state_dict(saved["acc"])


def resume_in_fresh_process(path: str, item_mode: str, out: str) -> None:
    """Run by ``python -c`` in a new process: load the mid-window checkpoint into new
    objects, train to the end, save the parameters."""
    mode = item_mode == "1"
    model, acc = _fresh(seed=99)  # other weights: the checkpoint must bring the saved ones
    _load(Path(path), model, acc)
    _continue(model, acc, _resume_data(mode), mode, CUT)
    torch.save([p.detach() for p in model.parameters()], out)


@pytest.mark.parametrize("item_mode", [False, True], ids=["mean", "items"])
def test_a_checkpoint_inside_a_caller_closed_window_resumes_exactly(
    item_mode: bool, tmp_path: Path
) -> None:
    data = _resume_data(item_mode)
    reference = large_batch(token_model(7), data)["params"][-1]
    model, acc = _fresh()
    _continue(model, acc, data, item_mode, (0, 0), stop=CUT)
    assert acc.state.micro_step == CUT[1] and acc.state.window == 0
    path = tmp_path / "mid-window.pt"
    _save(path, model, acc)
    saved = accumfn.load_checkpoint(path)
    assert saved["acc"]["accumfn"]["config"]["schedule"] == {"kind": "caller"}

    # in this process, into new objects
    model2, acc2 = _fresh(seed=98)
    _load(path, model2, acc2)
    assert acc2.state == acc.state
    _continue(model2, acc2, data, item_mode, CUT)
    torch.testing.assert_close(list(model2.parameters()), reference, rtol=1e-5, atol=1e-6)

    # in a fresh process
    out = tmp_path / "params.pt"
    code = (
        "from tests.test_caller_closed import resume_in_fresh_process; "
        f"resume_in_fresh_process({str(path)!r}, {str(int(item_mode))!r}, {str(out)!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), reference, rtol=1e-5, atol=1e-6)


def test_a_state_dict_of_a_caller_closed_state_round_trips_and_is_strict() -> None:
    state = core.micro_step(accumfn.init(None, batch_size=3), num_items=4)[0]
    data = state.to_dict()
    assert accumfn.AccumState.from_dict(data) == state
    bad = {**data, "config": {**data["config"], "schedule": {"kind": "caller", "steps": 2}}}
    with pytest.raises(accumfn.StateFormatError, match="not a schedule"):
        accumfn.AccumState.from_dict(bad)
    with pytest.raises(accumfn.StateFormatError, match="must be 0 when the caller closes"):
        accumfn.AccumState.from_dict({**data, "window": 4})
    old = accumfn.init(4).to_dict()  # a file written before steps=None existed loads as it did
    del old["window_scaled"], old["config"]["accum_dtype"]
    assert accumfn.AccumState.from_dict(old) == accumfn.init(4)


# -- refusals, with nothing changed ------------------------------------------------------------


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Any]:
    return [
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        repr(optimizer.state_dict()),
    ]


def _same(a: list[Any], b: list[Any]) -> bool:
    params = all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    grads = all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a[1], b[1], strict=True)
    )
    return params and grads and a[2] == b[2]


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"accumulation_steps": {0: None, 2: 4}}, "is for the whole run"),
        ({"accumulation_steps": None, "sync_every_micro_step": True}, "do not combine"),
    ],
)
def test_refused_settings_build_nothing(kwargs: dict[str, Any], says: str) -> None:
    model = token_model(0)
    optimizer = sgd(model)
    before = _snapshot(model, optimizer)
    with pytest.raises(accumfn.ConfigError, match=says):
        accumfn.GradientAccumulator(optimizer, **kwargs)
    init_kwargs = {("steps" if k == "accumulation_steps" else k): v for k, v in kwargs.items()}
    with pytest.raises(accumfn.ConfigError, match=says):
        accumfn.init(**init_kwargs)
    assert _same(before, _snapshot(model, optimizer))


def test_a_schedule_returning_none_is_refused_before_the_step() -> None:
    model = token_model(0)
    acc = accumfn.GradientAccumulator(sgd(model), lambda step: 2 if step == 0 else None)
    batch = rollouts(0, [[2]], ragged=False)[0][0]
    acc.accumulate(token_loss(model, batch[0], "mean"), model)
    state = acc.state
    before = _snapshot(model, acc.optimizer)  # type: ignore[arg-type]
    with pytest.raises(accumfn.ConfigError, match="is for the whole run"):
        acc.accumulate(token_loss(model, batch[1], "mean"), model)
    assert acc.state == state and _same(before, _snapshot(model, acc.optimizer))  # type: ignore[arg-type]


def test_a_config_file_cannot_ask_for_caller_closed_windows() -> None:
    with pytest.raises(accumfn.ConfigError, match=r"accumulation_steps=None to GradientAccumul"):
        accumfn.AccumulationConfig(gradient_accumulation_steps=None)  # type: ignore[arg-type]
    with pytest.raises(accumfn.ConfigError, match="cannot come from a config"):
        accumfn.AccumulationConfig.from_mapping({"gradient_accumulation_steps": None})


def test_the_core_refuses_a_planned_next_window() -> None:
    closed = core.close_window(core.micro_step(accumfn.init(None))[0])
    with pytest.raises(accumfn.ConfigError, match="must be 0"):
        core.finish_step(closed, applied=True, window=3)


def test_mixing_modes_inside_a_caller_closed_window_changes_nothing() -> None:
    model = token_model(0)
    acc = accumfn.GradientAccumulator(sgd(model), None, max_grad_norm=None)
    batches = rollouts(0, [[2]], ragged=False)[0][0]
    acc.accumulate(token_loss(model, batches[0], "mean"), model)
    state, before = acc.state, _snapshot(model, acc.optimizer)  # type: ignore[arg-type]
    with pytest.raises(accumfn.ConfigError, match="opened in mean mode"):
        acc.accumulate(token_loss(model, batches[1], "sum"), model, num_items=items(batches[1]))
    assert acc.state == state and _same(before, _snapshot(model, acc.optimizer))  # type: ignore[arg-type]


def test_a_checkpoint_of_another_window_kind_is_refused_with_nothing_changed(
    tmp_path: Path,
) -> None:
    data = _resume_data(False)
    model, acc = _fresh()
    _continue(model, acc, data, False, (0, 0), stop=CUT)
    caller_closed = acc.state_dict()
    planned_model = token_model(7)
    planned = accumfn.GradientAccumulator(sgd(planned_model), 4, max_grad_norm=None)
    _continue(planned_model, planned, data, False, (0, 0), stop=(0, 2))
    state = planned.state
    before = _snapshot(planned_model, planned.optimizer)  # type: ignore[arg-type]
    with pytest.raises(accumfn.CheckpointError, match="schedule") as raised:
        planned.load_state_dict(caller_closed)
    assert "another accumulation config" in str(raised.value)
    with pytest.raises(accumfn.CheckpointError, match="taken inside a window"):
        planned.load_state_dict(caller_closed, allow_config_change=True)
    assert planned.state == state
    assert _same(before, _snapshot(planned_model, planned.optimizer))  # type: ignore[arg-type]

    # at a boundary the config may change, either way
    acc.flush(model)
    boundary = acc.state_dict()
    planned.flush(planned_model)
    planned.load_state_dict(boundary, allow_config_change=True)
    assert planned.accumulation_steps == 4 and planned.state.effective_step == 2
    _, again = _fresh()
    again.load_state_dict(planned.state_dict(), allow_config_change=True)
    assert again.accumulation_steps is None and again.state.window == 0
