"""Checkpoint at any point of a run, resume with fresh objects, get the same run bit for bit.

Both APIs (functional ``capture``/``restore``, ``GradientAccumulator.state_dict``), with a
GradScaler whose scale changes (and overflows), an LR scheduler, clipping, dropout, an epoch
or a callable schedule; every checkpoint goes through a file read back with
``torch.load(weights_only=True)``. Also: config changes on resume, and the atomic save.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.amp import GradScaler
from torch.nn import functional as F

import accumfn
from accumfn import CheckpointError, GradientAccumulator
from accumfn.checkpoint import capture, restore, save_checkpoint
from examples.checkpoint_resume import resume  # the same resume users copy

EPOCHS, PER_EPOCH = 2, 7
LOSS_WEIGHT = 2.0**10  # with the scaler's init scale, some windows overflow (skipped)


def schedule(effective_step: int) -> int:
    return 2 if effective_step < 2 else 3


def build(api: str, seed: int = 0) -> dict[str, Any]:
    """Model, optimizer, scheduler, scaler and accumulation state; ``seed`` sets the init."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
    scaler = GradScaler("cpu", init_scale=2.0**115, growth_interval=1)
    parts: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    parts["scaler"] = scaler
    if api == "accumulator":
        parts["acc"] = GradientAccumulator(
            optimizer, {0: 3, 1: 2}, max_grad_norm=0.5, scaler=scaler, scheduler=scheduler
        )
    else:
        parts["state"] = accumfn.init(schedule, max_grad_norm=1.0)
    return parts


def batches() -> list[tuple[int, torch.Tensor, torch.Tensor, bool]]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(EPOCHS * PER_EPOCH * 3, 5, generator=gen)
    y = torch.randn(len(x), 2, generator=gen)
    rows = list(zip(x.split(3), y.split(3), strict=True))
    return [
        (i // PER_EPOCH, xb, yb, i % PER_EPOCH == PER_EPOCH - 1) for i, (xb, yb) in enumerate(rows)
    ]


Op = Callable[[dict[str, Any]], None]


def ops(api: str) -> list[Op]:
    """The run as a list of operations; a checkpoint may be taken between any two."""

    def micro(xb: torch.Tensor, yb: torch.Tensor, last: bool) -> Op:
        def op(parts: dict[str, Any]) -> None:
            model = parts["model"]
            loss = F.mse_loss(model(xb), yb) * LOSS_WEIGHT
            if api == "accumulator":
                parts["acc"].accumulate(loss, model, is_final_batch=last)
            else:
                state = parts["state"]
                parts["state"], _ = accumfn.accumulate(
                    state, loss, model, is_final_batch=last, scaler=parts["scaler"]
                )

        return op

    def apply(parts: dict[str, Any]) -> None:  # functional: a closed window may be checkpointed
        if api == "functional" and parts["state"].closed:
            parts["state"] = accumfn.apply_step(
                parts["state"],
                parts["optimizer"],
                parts["model"],
                scaler=parts["scaler"],
                scheduler=parts["scheduler"],
            )

    def new_epoch(parts: dict[str, Any]) -> None:
        if api == "accumulator":
            parts["acc"].reset_epoch()
        else:
            parts["state"] = accumfn.reset_epoch(parts["state"], parts["optimizer"], parts["model"])

    run: list[Op] = []
    for epoch, xb, yb, last in batches():
        run += [micro(xb, yb, last), apply]
        if last and epoch < EPOCHS - 1:
            run.append(new_epoch)
    return run


def state_of(parts: dict[str, Any]) -> accumfn.AccumState:
    return parts["acc"].state if "acc" in parts else parts["state"]


def checkpoint(parts: dict[str, Any], position: int) -> dict[str, Any]:
    if "acc" in parts:
        accum = parts["acc"].state_dict()
    else:
        accum = capture(parts["state"], parts["optimizer"], parts["scaler"])
    return {
        "model": parts["model"].state_dict(),
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": parts["scheduler"].state_dict(),
        "accum": accum,
        "position": position,
        "rng": torch.get_rng_state(),
    }


def plain_state(parts: dict[str, Any]) -> dict[str, Any]:
    """``state.to_dict()`` with nan (the norm of a skipped window) made comparable."""
    data = state_of(parts).to_dict()
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}


def outcome(parts: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, Any], float]:
    params = [p.detach().clone() for p in parts["model"].parameters()]
    return params, plain_state(parts), parts["scaler"].get_scale()


@pytest.mark.parametrize("api", ["functional", "accumulator"])
def test_resume_at_every_point_is_bit_exact(tmp_path: Path, api: str) -> None:
    run = ops(api)
    reference = build(api)
    for op in run:
        op(reference)
    want_params, want_state, want_scale = outcome(reference)
    assert want_state["skipped_steps"] > 0 and want_state["optimizer_steps"] > 0
    assert want_scale != 2.0**115  # the scaler state changed: resuming must carry it

    closed_seen = mid_window_seen = 0
    for stop in range(len(run) + 1):
        first = build(api)
        for op in run[:stop]:
            op(first)
        state, saved_state = state_of(first), plain_state(first)
        closed_seen += state.closed
        mid_window_seen += state.is_accumulating and not state.closed
        path = save_checkpoint(checkpoint(first, stop), tmp_path / "ckpt.pt")
        del first
        ckpt = torch.load(path, weights_only=True)

        second = build(api, seed=1)  # other init: everything must come from the checkpoint
        resume(second, ckpt)
        assert plain_state(second) == saved_state
        for op in run[ckpt["position"] :]:
            op(second)
        params, got_state, scale = outcome(second)
        assert got_state == want_state, f"checkpoint after op {stop}"
        assert scale == want_scale, f"checkpoint after op {stop}"
        for got, want in zip(params, want_params, strict=True):
            assert torch.equal(got, want), f"checkpoint after op {stop}"
    assert mid_window_seen > 5
    assert closed_seen == (want_state["optimizer_steps"] + want_state["skipped_steps"]) * (
        api == "functional"
    )


def train_accumulator(acc: GradientAccumulator, model: nn.Module, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(3, 5, generator=gen), torch.randn(3, 2, generator=gen)
        acc.accumulate(F.mse_loss(model(x), y), model)


def small(steps: int) -> tuple[nn.Module, torch.optim.Optimizer, GradientAccumulator]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, GradientAccumulator(optimizer, steps)


def test_other_config_is_refused_by_default_and_nothing_changes() -> None:
    model, _, acc = small(3)
    train_accumulator(acc, model, 6, seed=0)  # a boundary
    saved = acc.state_dict()
    _, _, other = small(2)
    before = other.state
    with pytest.raises(CheckpointError) as info:
        other.load_state_dict(saved)
    message = str(info.value)
    assert "'steps': 3" in message and "'steps': 2" in message
    assert "allow_config_change=True" in message
    assert other.state == before


def test_config_change_from_a_boundary_continues_under_the_new_config() -> None:
    model, optimizer, acc = small(3)
    train_accumulator(acc, model, 6, seed=0)
    saved = acc.state_dict()
    # reference: the same model and optimizer carry on with a new accumulator of window 2
    model_b, optimizer_b, _ = small(2)
    model_b.load_state_dict(model.state_dict())
    optimizer_b.load_state_dict(optimizer.state_dict())
    fresh = GradientAccumulator(optimizer_b, 2)
    train_accumulator(fresh, model_b, 4, seed=1)

    resumed_model, resumed_optimizer, resumed = small(2)
    resumed_model.load_state_dict(model.state_dict())
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(saved, allow_config_change=True)
    assert resumed.state.window == 2 and resumed.state.config == fresh.state.config
    assert resumed.state.optimizer_steps == 2 and resumed.state.total_micro_steps == 6
    train_accumulator(resumed, resumed_model, 4, seed=1)
    assert resumed.state.optimizer_steps == 4
    for got, want in zip(resumed_model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(got, want)


def test_config_change_mid_window_is_refused_even_when_allowed() -> None:
    model, _, acc = small(3)
    train_accumulator(acc, model, 4, seed=0)  # 1 of 3 in the open window
    saved = acc.state_dict()
    other_model, _, other = small(2)
    train_accumulator(other, other_model, 1, seed=5)  # its own open window
    before = other.state
    grads = [p.grad.clone() for p in other_model.parameters() if p.grad is not None]
    with pytest.raises(CheckpointError, match=r"inside a window.*window boundary") as info:
        other.load_state_dict(saved, allow_config_change=True)
    assert "1 of 3" in str(info.value)
    assert other.state == before
    after = [p.grad for p in other_model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads, after, strict=True))


def test_scaler_on_off_needs_a_boundary_and_allow_config_change() -> None:
    model, optimizer, _ = small(2)
    state = accumfn.init(2, max_grad_norm=None)
    scaler = GradScaler("cpu")
    loss = F.mse_loss(model(torch.ones(3, 5)), torch.zeros(3, 2))
    state, _ = accumfn.accumulate(state, loss, model, scaler=scaler)
    with pytest.raises(CheckpointError, match=r"with an enabled GradScaler.*has none"):
        restore(capture(state, optimizer, scaler), accumfn.init(2, max_grad_norm=None), optimizer)
    boundary = capture(accumfn.init(2, max_grad_norm=None), optimizer, scaler)
    with pytest.raises(CheckpointError, match="allow_config_change=True"):
        restore(boundary, accumfn.init(2, max_grad_norm=None), optimizer)
    assert (
        restore(
            boundary, accumfn.init(2, max_grad_norm=None), optimizer, allow_config_change=True
        ).window
        == 2
    )


def test_save_is_atomic_temp_fsync_replace_fsync_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"n": torch.tensor(1)}, target)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    seen: list[Path] = []
    save_checkpoint({"n": torch.tensor(2)}, target, before_replace=seen.append)
    (temp,) = seen
    assert temp.parent == tmp_path and temp.name.startswith(".ckpt.pt.")
    assert events == [
        ("fsync", str(temp)),
        ("replace", f"{temp} -> {target}"),
        ("fsync", str(tmp_path)),
    ]
    assert int(torch.load(target, weights_only=True)["n"]) == 2
    assert not temp.exists()


def test_crash_before_the_rename_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    save_checkpoint({"n": torch.tensor(1)}, target)

    def crash(temp: Path) -> None:
        assert int(torch.load(temp, weights_only=True)["n"]) == 2  # complete before rename
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"n": torch.tensor(2)}, target, before_replace=crash)
    assert int(torch.load(target, weights_only=True)["n"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
