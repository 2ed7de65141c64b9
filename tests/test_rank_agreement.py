"""The ranks agree on which window they are in, and a failure on one rank stops every rank.

2 gloo ranks (3 for one world-size change). Each case either trains exactly (against one
large batch over every rank's data, or the uninterrupted run), or raises a clear error on
every rank with nothing applied, within seconds: never a hang, never ranks trained apart.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn.checkpoint import load_checkpoint, save_checkpoint
from accumfn.errors import CheckpointError, ConfigError, RankMismatchError, StepError
from accumfn.testing._spawn import RankFailedError

from ._dist_utils import items, run_ranks, token_loss, token_model
from .test_distributed_edges import RankWindows, large_batch, ranked_data, sgd

WINDOW = 4
SEED = 11


def _data(windows: int = 3, world: int = 2, length: int = WINDOW) -> RankWindows:
    return ranked_data(SEED, [[length] * windows] * world, ragged=False)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _params(model: nn.Module) -> list[torch.Tensor]:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return [p.detach().clone() for p in inner.parameters()]


def _reference(data: RankWindows) -> list[torch.Tensor]:
    model = token_model(0)
    return large_batch(model, sgd(model), data)


def _build(
    steps: int = WINDOW, scaler: torch.amp.GradScaler | None = None, **kwargs: Any
) -> tuple[nn.Module, torch.optim.Optimizer, accumfn.GradientAccumulator]:
    module = token_model(0)
    optimizer = sgd(module)
    acc = accumfn.GradientAccumulator(optimizer, steps, max_grad_norm=None, scaler=scaler, **kwargs)
    return module, optimizer, acc


# -- row 1 and 2: a rank killed between a window's step and its own save ---------------------


def _save(ckdir: str, rank: int, count: int, module: nn.Module, opt: Any, acc: Any) -> None:
    path = Path(ckdir) / f"rank{rank}-{count}.pt"
    save_checkpoint(
        {"model": module.state_dict(), "optim": opt.state_dict(), "accum": acc.state_dict()}, path
    )


def _train_and_save(rank: int, world: int, ckdir: str, kill_at: int) -> int:
    """Save every rank's own file after each micro-step; rank 1 is SIGKILLed after the step
    of the window ending at micro-step ``kill_at``, before its own save."""
    module, opt, acc = _build()
    model = DistributedDataParallel(module)
    acc.prepare(model)
    count = 0
    for window in _data()[rank]:
        for batch in window:
            count += 1
            acc.accumulate(token_loss(model, batch, "mean"), model)
            if rank == 1 and count == kill_at:
                other = Path(ckdir) / f"rank0-{kill_at}.pt"
                while not other.exists():  # rank 0 has saved this micro-step
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            _save(ckdir, rank, count, module, opt, acc)
            if count == kill_at:
                return count
    return count


def _resume(rank: int, world: int, ckdir: str, counts: list[int], train: bool) -> dict[str, Any]:
    """Restart from this rank's file ``counts[rank]``; train to the end if ``train``."""
    module, opt, acc = _build()
    ckpt = load_checkpoint(Path(ckdir) / f"rank{rank}-{counts[rank]}.pt")
    module.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    model = DistributedDataParallel(module)
    start = time.monotonic()
    try:
        acc.load_state_dict(ckpt["accum"])
    except CheckpointError as exc:
        return {**_error(exc), "seconds": time.monotonic() - start}
    acc.prepare(model)
    batches = [batch for window in _data()[rank] for batch in window]
    for count, batch in enumerate(batches, start=1):
        if count > counts[rank] and train:
            acc.accumulate(token_loss(model, batch, "mean"), model)
    return {"params": _params(model), "steps": acc.stats.optimizer_steps}


def test_rank_killed_between_step_and_save_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Rank 1 dies after window 2's step, before its save: its last file is inside window 2
    (micro-step 7), rank 0's at the boundary (8). Both restart from their last files: every
    rank raises CheckpointError within seconds, naming both steps. Restarting both from the
    step they both completed (7) equals the uninterrupted run."""
    ckdir = str(tmp_path)
    with pytest.raises(RankFailedError, match="rank 1 of 2 ended with signal SIGKILL"):
        run_ranks(_train_and_save, ckdir, 8, timeout=120)
    assert (tmp_path / "rank0-8.pt").exists() and not (tmp_path / "rank1-8.pt").exists()
    results = run_ranks(_resume, ckdir, [8, 7], False, timeout=120)
    for result in results:
        assert result["type"] == "CheckpointError", result
        assert "rank 0 is in effective step 2, rank 1 in effective step 1" in result["message"]
        assert "resume every rank from the same step" in result["message"]
        assert result["seconds"] < 20
    resumed = run_ranks(_resume, ckdir, [7, 7], True, timeout=120)
    reference = _reference(_data())
    for result in resumed:
        assert result["steps"] == 3
        for got, want in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _load_mixed(rank: int, world: int, ckdir: str, bad_rank: int) -> dict[str, Any]:
    """Every rank loads its own mid-window file; ``bad_rank``'s does not fit its optimizer."""
    module, _, acc = _build()
    ckpt = load_checkpoint(Path(ckdir) / f"rank{rank}-6.pt")
    if rank == bad_rank:
        ckpt["accum"]["partial_grads"] = ckpt["accum"]["partial_grads"][:-1]
    DistributedDataParallel(module)
    before = acc.state_dict()
    try:
        acc.load_state_dict(ckpt["accum"])
    except CheckpointError as exc:
        return {**_error(exc), "unchanged": acc.state_dict() == before}
    return {"type": None}


def test_a_checkpoint_refused_on_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    ckdir = str(tmp_path)
    with pytest.raises(RankFailedError):  # save mid-window files, then rank 1 stops
        run_ranks(_train_and_save, ckdir, 6, timeout=120)
    (tmp_path / "rank1-6.pt").write_bytes((tmp_path / "rank1-5.pt").read_bytes())
    results = run_ranks(_load_mixed, ckdir, 1, timeout=120)
    assert results[1]["type"] == "CheckpointError"
    assert "do not match the optimizer" in results[1]["message"]
    assert results[0]["type"] == "CheckpointError"
    assert "rank(s) [1] refused the checkpoint" in results[0]["message"]
    assert all(result["unchanged"] for result in results)


# -- row 3: a step that fails on one rank only -------------------------------------------------


def _fail_on_one_rank(rank: int, world: int, amp: bool) -> dict[str, Any]:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1) if amp else None
    calls = [0]

    def before_step(optimizer: object) -> None:
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise OSError("disk full while writing a gradient histogram")

    module, _, acc = _build(scaler=scaler, before_step=before_step)
    model = DistributedDataParallel(module)
    acc.prepare(model)
    out: dict[str, Any] = {"step_errors": [], "error": None}
    after: list[torch.Tensor] = []
    for w, window in enumerate(_data(windows=4)[rank]):
        for batch in window:
            loss = token_loss(model, batch, "mean")
            try:
                acc.accumulate(loss, model)
            except StepError as exc:
                out["step_errors"].append(w)
                assert "disk full" in str(exc)
            except RankMismatchError as exc:
                out["error"] = {**_error(exc), "window": w}
                out["unchanged"] = all(
                    torch.equal(a, b) for a, b in zip(after, _params(model), strict=True)
                )
                out["grads_kept"] = all(p.grad is not None for p in module.parameters())
                return out
        after = _params(model)
    return out


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "grad-scaler"])
def test_a_step_failing_on_one_rank_stops_every_rank_at_the_next_window(amp: bool) -> None:
    """Rank 1's before_step raises in window 2 (StepError there only; the GradScaler's
    scales split too). At window 3's boundary every rank raises RankMismatchError naming
    rank 1 and the cause, before window 3 is applied."""
    results = run_ranks(_fail_on_one_rank, amp, timeout=120)
    assert results[0]["step_errors"] == [] and results[1]["step_errors"] == [1]
    for result in results:
        error = result["error"]
        assert error is not None and error["window"] == 2, result
        assert "failed on rank(s) [1] and not on rank(s) [0]" in error["message"]
        assert "disk full" in error["message"]
        assert result["unchanged"]  # window 3 was not applied on any rank


# -- rows 4 and 5: ranks built with different windows ------------------------------------------


def _different_windows(rank: int, world: int, item_mode: bool, sync_every: bool) -> Any:
    steps = 3 if rank == 0 else 2  # e.g. each rank splits its batch into its own count
    module = token_model(0)
    opt = sgd(module)
    model = DistributedDataParallel(module)
    state = accumfn.init(steps, sync_every_micro_step=sync_every, max_grad_norm=None)
    accumfn.prepare_forward(state, model)
    before = _params(model)
    data = ranked_data(SEED, [[3] * 2, [2] * 2], ragged=True)[rank]
    try:
        for window in data:
            for batch in window:
                loss = token_loss(model, batch, "sum" if item_mode else "mean")
                state, stepped = accumfn.accumulate(
                    state, loss, model, num_items=items(batch) if item_mode else None
                )
                if stepped:
                    state = accumfn.apply_step(state, opt, model)
    except RankMismatchError as exc:
        return {
            **_error(exc),
            "unchanged": all(
                torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)
            ),
        }
    return {"params": _params(model), "type": None}


@pytest.mark.parametrize("sync_every", [False, True], ids=["deferred", "sync-every"])
def test_ranks_planning_different_windows_raise_on_every_rank_in_mean_mode(
    sync_every: bool,
) -> None:
    results = run_ranks(_different_windows, False, sync_every, timeout=120)
    for result in results:
        assert result["type"] == "RankMismatchError", result
        assert (
            "rank 0 is planning a window of 3, rank 1 planning a window of 2" in (result["message"])
        )
        assert result["unchanged"]


def test_per_rank_micro_batch_counts_are_exact_in_item_mode() -> None:
    """Rank 0 splits its batch into 3 micro-batches, rank 1 into 2: item mode divides by
    the items over all ranks, so this equals the large batch over both ranks' data."""
    results = run_ranks(_different_windows, True, False, timeout=120)
    data = ranked_data(SEED, [[3] * 2, [2] * 2], ragged=True)
    reference = _reference(data)
    for result in results:
        assert result["type"] is None
        for got, want in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- row 6: a wrapper built at the first forward -----------------------------------------------


def _replicate_after_prepare(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed._composable.replicate import replicate

    module, _, acc = _build()
    model = replicate(module)
    acc.prepare(model)  # before the first forward: replicate's DDP does not exist yet
    before = _params(model)
    batch = _data()[rank][0][0]
    try:
        acc.accumulate(token_loss(model, batch, "sum"), model, num_items=items(batch))
    except ConfigError as exc:
        return {
            **_error(exc),
            "unchanged": all(
                torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)
            ),
            "grads": [p.grad is None for p in module.parameters()],
        }
    return {"type": None}


def test_composable_replicate_is_refused_even_after_prepare() -> None:
    for result in run_ranks(_replicate_after_prepare, timeout=120):
        assert result["type"] == "ConfigError", result
        assert "composable replicate()" in result["message"]
        assert result["unchanged"] and all(result["grads"])


# -- world-size changes ------------------------------------------------------------------------


def _save_both(rank: int, world: int, ckdir: str) -> None:
    """Train 2 windows and 2 micro-steps of a third; rank 0 saves at micro-steps 8 and 10."""
    module, opt, acc = _build()
    model = DistributedDataParallel(module)
    acc.prepare(model)
    batches = [batch for window in _data()[rank] for batch in window][:10]
    for count, batch in enumerate(batches, start=1):
        acc.accumulate(token_loss(model, batch, "mean"), model)
        if rank == 0 and count in (8, 10):
            _save(ckdir, rank, count, module, opt, acc)


def _load_on(rank: int, world: int, ckdir: str, count: int) -> dict[str, Any]:
    module, opt, acc = _build()
    ckpt = load_checkpoint(Path(ckdir) / f"rank0-{count}.pt")
    module.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    model = DistributedDataParallel(module) if dist.is_initialized() else module
    try:
        acc.load_state_dict(ckpt["accum"])
    except CheckpointError as exc:
        return _error(exc)
    acc.prepare(model)
    data = _data(windows=1, world=world)[rank]  # one more window, on this job's ranks
    for batch in data[0]:
        acc.accumulate(token_loss(model, batch, "mean"), model)
    return {"type": None, "params": _params(model), "steps": acc.stats.optimizer_steps}


@pytest.mark.parametrize("world", [1, 3])
def test_world_size_change_resumes_at_a_boundary_and_refuses_inside_a_window(
    tmp_path: Path, world: int
) -> None:
    """Rank 0's file from 2 ranks, loaded by 1 process or 3 ranks: at a window boundary it
    resumes exactly (2 windows over 2 ranks' data, then one over the new ranks' data);
    inside a window every rank raises CheckpointError."""
    ckdir = str(tmp_path)
    run_ranks(_save_both, ckdir, timeout=120)
    model = token_model(0)
    opt = sgd(model)
    large_batch(model, opt, [rank[:2] for rank in _data()])
    reference = large_batch(model, opt, _data(windows=1, world=world))
    if world == 1:
        results = [_load_on(0, 1, ckdir, 8), _load_on(0, 1, ckdir, 10)]
        boundary, inside = [results[0]], [results[1]]
    else:
        boundary = run_ranks(_load_on, ckdir, 8, world=world, timeout=120)
        inside = run_ranks(_load_on, ckdir, 10, world=world, timeout=120)
    for result in boundary:
        assert result["type"] is None and result["steps"] == 3, result
        for got, want in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for result in inside:
        assert result["type"] == "CheckpointError", result
        assert "taken inside a window" in result["message"]
        assert "in a job of the same size" in result["message"]


# -- per-rank windows in item mode, per-model failures, groups of the model ------------------

PER_RANK = [[3] * 3, [2] * 3]  # rank 0 splits its batch into 3 micro-batches, rank 1 into 2


def _item_batches(rank: int) -> list[Any]:
    return [b for w in ranked_data(SEED, PER_RANK, ragged=True)[rank] for b in w]


def _item_train(rank: int, world: int, ckdir: str, counts: list[int] | None) -> dict[str, Any]:
    """Item mode, each rank its own window; save every micro-step, or resume from
    ``counts[rank]``; train to the end."""
    module, opt, acc = _build(PER_RANK[rank][0])
    if counts is not None:
        ckpt = load_checkpoint(Path(ckdir) / f"rank{rank}-{counts[rank]}.pt")
        module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
    model = DistributedDataParallel(module)
    acc.prepare(model)
    if counts is not None:
        acc.load_state_dict(ckpt["accum"])
    for count, batch in enumerate(_item_batches(rank), start=1):
        if counts is not None and count <= counts[rank]:
            continue
        acc.accumulate(token_loss(model, batch, "sum"), model, num_items=items(batch))
        if counts is None:
            _save(ckdir, rank, count, module, opt, acc)
    return {"params": _params(model)}


def test_item_mode_resumes_each_rank_at_its_own_micro_step(tmp_path: Path) -> None:
    """Rank 0 at micro-step 2 of its 3, rank 1 at 1 of its 2, both inside the second window:
    a resume the ranks agree on (the same window), exact against the large batch."""
    ckdir = str(tmp_path)
    run_ranks(_item_train, ckdir, None, timeout=120)
    reference = _reference(ranked_data(SEED, PER_RANK, ragged=True))
    for result in run_ranks(_item_train, ckdir, [5, 3], timeout=120):
        for got, want in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _aux_failure(rank: int, world: int) -> dict[str, Any]:
    """A DDP model, and beside it a small model each rank trains alone, whose step fails
    on rank 1 only: the DDP model's ranks agree and go on."""

    def fail_on_rank1(optimizer: object) -> None:
        if rank == 1:
            raise OSError("the side model's logger failed")

    module, _, acc = _build()
    model = DistributedDataParallel(module)
    acc.prepare(model)
    side = token_model(7)
    side_acc = accumfn.GradientAccumulator(
        sgd(side), 1, max_grad_norm=None, before_step=fail_on_rank1
    )
    errors = 0
    for w, window in enumerate(_data()[rank]):
        for batch in window:
            acc.accumulate(token_loss(model, batch, "mean"), model)
        if w == 0:
            try:
                side_acc.accumulate(token_loss(side, batch, "mean"), side)
            except StepError:
                errors += 1
    return {"params": _params(model), "errors": errors}


def test_a_failed_step_of_another_model_does_not_stop_this_one() -> None:
    results = run_ranks(_aux_failure, timeout=120)
    assert [r["errors"] for r in results] == [0, 1]
    reference = _reference(_data())
    for result in results:
        for got, want in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _ensemble(rank: int, world: int) -> dict[str, Any]:
    """Each rank trains a plain model of its own (no wrapper), rank 1 one window more, and
    reloads its own boundary checkpoint after prepare(model): nothing to agree on."""
    module, _, acc = _build(2)
    batches = [b for w in _data(windows=2 + rank)[rank] for b in w][: 2 * (2 + rank)]
    for batch in batches:
        acc.accumulate(token_loss(module, batch, "mean"), module)
    saved = acc.state_dict()
    fresh = _build(2)[2]
    fresh.prepare(module)
    fresh.load_state_dict(saved)
    return {"steps": fresh.stats.optimizer_steps}


def test_ranks_training_models_of_their_own_load_apart() -> None:
    assert [r["steps"] for r in run_ranks(_ensemble, timeout=120)] == [2, 3]


def _fsdp_replicate(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed._composable.replicate_with_fsdp import replicate

    module = token_model(0)
    replicate(module)
    opt = sgd(module)
    acc = accumfn.GradientAccumulator(opt, WINDOW, max_grad_norm=None)
    acc.prepare(module)
    for window in _data()[rank]:
        for batch in window:
            acc.accumulate(token_loss(module, batch, "mean"), module)
    from ._dist_utils import full_params

    return {"params": [p.double() for p in full_params(module)]}


def test_fsdp2_based_replicate_finds_its_group_and_is_exact() -> None:
    pytest.importorskip("torch.distributed._composable.replicate_with_fsdp")
    reference = _reference(_data())
    for result in run_ranks(_fsdp_replicate, timeout=150):
        for got, want in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)


def _fail_in_the_last_window(rank: int, world: int) -> dict[str, Any]:
    calls = [0]

    def before_step(optimizer: object) -> None:
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            raise OSError("disk full in the last window")

    module, _, acc = _build(before_step=before_step)
    model = DistributedDataParallel(module)
    acc.prepare(model)
    batches = [b for window in _data()[rank] for b in window]
    try:
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            acc.accumulate(token_loss(model, batch, "mean"), model, is_final_batch=last)
    except (RankMismatchError, StepError) as exc:
        return _error(exc)
    return {"type": None}


def test_a_step_failing_on_one_rank_in_the_last_window_stops_every_rank() -> None:
    """No later window's header would carry it: GradientAccumulator compares at once after
    a window that ended the data (is_final_batch), and every rank raises."""
    for result in run_ranks(_fail_in_the_last_window, timeout=120):
        assert result["type"] == "RankMismatchError", result
        assert "failed on rank(s) [1] and not on rank(s) [0]" in result["message"]
        assert "disk full in the last window" in result["message"]
