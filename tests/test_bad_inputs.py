"""Every bad input tried, and what it gets: one table, one test per row.

Each row asserts the error type, that the message names the problem and the fix, and that
nothing changed: the states (``to_dict()`` equal), the model's parameters and gradients, the
optimizer and GradScaler state, the checkpoint files. ``python -m tests.test_bad_inputs``
prints the table of docs/bad-inputs.md from the messages the rows actually get.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import nn
from torch.amp import GradScaler
from torch.nn import functional as F

import accumfn
from accumfn import (
    AccumState,
    AccumulationConfig,
    CallOrderError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    GradientAccumulator,
    LossError,
    StateFormatError,
    core,
)
from accumfn.checkpoint import capture, load_checkpoint, restore, save_checkpoint

from .support import same


class NotWeights:
    """A custom class: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self) -> None:
        self.value = 1


def tiny(hidden: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 2))


@dataclass
class World:
    """A run in the middle of things: states open, closed and fresh, grads held, files saved."""

    dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: GradScaler
    fresh: AccumState
    open: AccumState  # 2 of 4 micro-steps accumulated
    closed: AccumState  # boundary reached, apply_step not called yet
    acc: GradientAccumulator  # 1 of 4, same model and optimizer

    def loss(self) -> torch.Tensor:
        return F.mse_loss(self.model(torch.ones(3, 5)), torch.zeros(3, 2))

    def open_dict(self, **changes: Any) -> dict[str, Any]:
        data = self.open.to_dict()
        data.update(changes)
        return data

    def config_dict(self, **changes: Any) -> dict[str, Any]:
        data = self.open.to_dict()
        data["config"].update(changes)
        return data


def make_world(directory: Path) -> World:
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = GradScaler("cpu", init_scale=1024.0)
    fresh = accumfn.init(4, max_grad_norm=None)
    world = World(directory, model, optimizer, scaler, fresh, fresh, fresh, None)  # type: ignore[arg-type]
    state = fresh
    for _ in range(2):
        state, _ = accumfn.accumulate(state, world.loss(), model)
    world.open = state
    world.closed, _ = accumfn.accumulate(state, world.loss(), model, is_final_batch=True)
    world.acc = GradientAccumulator(optimizer, 4, max_grad_norm=None)
    world.acc.accumulate(world.loss(), model)
    good = save_checkpoint({"accum": world.acc.state_dict()}, directory / "good.pt")
    data = good.read_bytes()
    (directory / "truncated.pt").write_bytes(data[: len(data) // 2])
    (directory / "corrupted.pt").write_bytes(data[:40] + bytes(64) + data[104:])
    (directory / "empty.pt").write_bytes(b"")
    torch.save({"obj": NotWeights()}, directory / "unsafe.pt")
    for name, text in CONFIG_FILES.items():
        (directory / name).write_text(text)
    return world


CONFIG_FILES = {
    "no_section.yaml": "model:\n  hidden: 16\n",
    "quoted.yaml": 'training:\n  batch_size: 8\n  gradient_accumulation_steps: "4"\n',
    "typo.yaml": "training:\n  batch_size: 8\n  gradient_accumulation_step: 4\n",
    "negative.yaml": "training:\n  batch_size: -8\n  gradient_accumulation_steps: 4\n",
    "scaling.yaml": "training:\n  batch_size: 8\n  lr_scaling: squareroot\n",
}


def snapshot(world: World) -> dict[str, Any]:
    params = list(world.model.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "optimizer": copy.deepcopy(world.optimizer.state_dict()),
        "scaler": world.scaler.state_dict(),
        "states": [s.to_dict() for s in (world.fresh, world.open, world.closed, world.acc.state)],
        "files": {p.name: p.read_bytes() for p in sorted(world.dir.iterdir())},
    }


# -- actions --------------------------------------------------------------------------------


def other_model_checkpoint(world: World) -> dict[str, Any]:
    """A mid-window checkpoint of a model with other shapes (same number of parameters)."""
    other = tiny(hidden=6)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    acc = GradientAccumulator(other_opt, 4, max_grad_norm=None)
    acc.accumulate(F.mse_loss(other(torch.ones(3, 5)), torch.zeros(3, 2)), other)
    return acc.state_dict()


def scaled_checkpoint(world: World, **scaler_changes: Any) -> dict[str, Any]:
    data = capture(world.open, world.optimizer, GradScaler("cpu"))
    data["scaler"].update(scaler_changes)
    return data


def with_grads(world: World, change: Callable[[torch.Tensor], Any]) -> dict[str, Any]:
    data = world.acc.state_dict()
    data["partial_grads"] = [change(g) for g in data["partial_grads"]]
    return data


def future_format(world: World) -> dict[str, Any]:
    data = world.acc.state_dict()
    data["accumfn"]["format"] = 2
    return data


def hand_edited(world: World) -> dict[str, Any]:
    data = capture(world.fresh, world.optimizer)
    data["partial_grads"] = [p.grad for p in world.model.parameters()]
    return data


def apply(world: World, state: AccumState) -> Any:
    return accumfn.apply_step(state, world.optimizer, world.model)


def accumulate(world: World, state: object = None, loss: object = None, **kwargs: Any) -> Any:
    state = world.open if state is None else state
    loss = world.loss() if loss is None else loss
    return accumfn.accumulate(state, loss, world.model, **kwargs)  # type: ignore[arg-type]


def no_grad_loss(world: World) -> torch.Tensor:
    with torch.no_grad():
        return world.loss()


def backwarded_loss(world: World) -> torch.Tensor:
    """A loss the user already ran backward on (through a copy, so the world is untouched)."""
    copy_of_model = copy.deepcopy(world.model)
    loss = F.mse_loss(copy_of_model(torch.ones(3, 5)), torch.zeros(3, 2))
    loss.backward()
    return loss


def lone_optimizer(dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2, dtype=dtype))], lr=0.1)


def plateau() -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(lone_optimizer())


def zero_next_window(world: World) -> AccumState:
    """The closed state, under a schedule that returns 0 for the next window."""
    config = attrs.evolve(world.closed.config, schedule=lambda step: 4 if step == 0 else 0)
    return attrs.evolve(world.closed, config=config)


def counted_on_device_copy(world: World) -> AccumState:
    """A copy of an item-mode state whose window counted one micro-batch on the device
    (a tensor): the tally ``accumulate`` kept beside the original is not beside it."""
    return attrs.evolve(world.open, window_norm=core.Normalization.ITEMS, window_device_counts=1)


def second_accumulator_on_scaler(world: World) -> None:
    GradientAccumulator(world.optimizer, 4, scaler=world.scaler)
    GradientAccumulator(lone_optimizer(), 4, scaler=world.scaler)


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    bad: str
    """The bad input, as docs/bad-inputs.md shows it."""
    call: Callable[[World], object]
    error: type[BaseException]
    problem: str
    """Regex the message must match: what was wrong."""
    fix: str
    """Regex the message must match: what to do."""


NAN = float("nan")
ROWS = [
    # configuration
    Row(
        "`steps='4'`",
        lambda w: accumfn.init("4"),
        ConfigError,
        r"steps must be an int.*'4'",
        r"pass a whole number",
    ),  # type: ignore[arg-type]
    Row(
        "`steps=1.5`",
        lambda w: accumfn.init(1.5),
        ConfigError,
        r"got 1\.5 of type float",
        r"pass a whole number",
    ),  # type: ignore[arg-type]
    Row(
        "`steps=True`",
        lambda w: accumfn.init(True),
        ConfigError,
        r"got True of type bool",
        r"pass a whole number",
    ),
    Row("`steps=0`", lambda w: accumfn.init(0), ConfigError, r"steps must be >= 1, got 0", r">= 1"),
    Row("`steps=-3`", lambda w: accumfn.init(-3), ConfigError, r"got -3", r">= 1"),
    Row(
        "`steps={}`",
        lambda w: accumfn.init({}),
        ConfigError,
        r"got \{\}",
        r"non-empty mapping \{epoch: steps\}",
    ),
    Row(
        "`steps={0: 0}`",
        lambda w: accumfn.init({0: 0}),
        ConfigError,
        r"schedule steps .* got 0",
        r">= 1",
    ),
    Row(
        "`steps={-1: 2}`",
        lambda w: accumfn.init({-1: 2}),
        ConfigError,
        r"schedule epoch .* got -1",
        r">= 0",
    ),
    Row(
        "schedule callable returns 0",
        lambda w: accumfn.init(lambda step: 0),
        ConfigError,
        r"returned 0 for effective step 0",
        r"must return an int >= 1",
    ),
    Row(
        "`max_grad_norm=0`",
        lambda w: accumfn.init(2, max_grad_norm=0),
        ConfigError,
        r"max_grad_norm .* got 0\.0",
        r"finite number > 0.*None to turn clipping off",
    ),
    Row(
        "`max_grad_norm=-1.0`",
        lambda w: accumfn.init(2, max_grad_norm=-1.0),
        ConfigError,
        r"got -1\.0",
        r"finite number > 0",
    ),
    Row(
        "`max_grad_norm=nan`",
        lambda w: accumfn.init(2, max_grad_norm=NAN),
        ConfigError,
        r"got nan",
        r"finite number > 0",
    ),
    Row(
        "`max_grad_norm=inf`",
        lambda w: accumfn.init(2, max_grad_norm=math.inf),
        ConfigError,
        r"got inf",
        r"finite number > 0",
    ),
    Row(
        "`max_grad_norm='1.0'`",
        lambda w: accumfn.init(2, max_grad_norm="1.0"),
        ConfigError,
        r"got '1\.0' of type str",
        r"positive number or None",
    ),  # type: ignore[arg-type]
    Row(
        "`batch_size=0`",
        lambda w: accumfn.init(2, batch_size=0),
        ConfigError,
        r"batch_size must be >= 1, got 0",
        r">= 1",
    ),
    Row(
        "`batch_size=2.5`",
        lambda w: accumfn.init(2, batch_size=2.5),
        ConfigError,
        r"batch_size .* got 2\.5",
        r"whole number",
    ),  # type: ignore[arg-type]
    Row(
        "`skip_nonfinite='yes'`",
        lambda w: accumfn.init(2, skip_nonfinite="yes"),
        ConfigError,
        r"skip_nonfinite .* got 'yes'",
        r"True or False",
    ),  # type: ignore[arg-type]
    Row(
        "`GradientAccumulator(model.parameters())`",
        lambda w: GradientAccumulator(w.model.parameters()),
        ConfigError,
        r"got generator",
        r"must be a torch\.optim\.Optimizer",
    ),  # type: ignore[arg-type]
    Row(
        "`GradientAccumulator(opt, '4')`",
        lambda w: GradientAccumulator(w.optimizer, "4"),
        ConfigError,
        r"got '4'",
        r"whole number",
    ),  # type: ignore[arg-type]
    # the loss
    Row(
        "non-scalar loss (shape `(3,)`)",
        lambda w: accumulate(w, loss=torch.ones(3, requires_grad=True)),
        LossError,
        r"scalar \(0-dim\).*shape \(3,\)",
        r"reduce it first",
    ),
    Row(
        "loss under `torch.no_grad()`",
        lambda w: accumulate(w, loss=no_grad_loss(w)),
        LossError,
        r"does not require grad",
        r"with grad enabled",
    ),
    Row(
        "`loss.item()` (a float)",
        lambda w: accumulate(w, loss=w.loss().item()),
        LossError,
        r"got float",
        r"not loss\.item\(\)",
    ),
    Row(
        "non-scalar loss, object API",
        lambda w: w.acc.accumulate(torch.ones(2, requires_grad=True), w.model),
        LossError,
        r"shape \(2,\)",
        r"reduce it first",
    ),
    # other arguments
    Row(
        "`is_final_batch='yes'`",
        lambda w: accumulate(w, is_final_batch="yes"),
        ConfigError,
        r"is_final_batch .* got 'yes'",
        r"True or False",
    ),
    Row(
        "`num_items=-1`",
        lambda w: accumulate(w, state=w.fresh, num_items=-1),
        ConfigError,
        r"num_items must be >= 0, got -1",
        r">= 0",
    ),
    Row(
        "`num_items=2.5`",
        lambda w: accumulate(w, state=w.fresh, num_items=2.5),
        ConfigError,
        r"got 2\.5 of type float",
        r"0-dim integer tensor",
    ),
    Row(
        "`num_items=torch.tensor(5.0)`",
        lambda w: accumulate(w, state=w.fresh, num_items=torch.tensor(5.0)),
        ConfigError,
        r"got a torch\.float32 tensor",
        r"integer sum",
    ),
    Row(
        "`num_items=torch.tensor([5])`",
        lambda w: accumulate(w, state=w.fresh, num_items=torch.tensor([5])),
        ConfigError,
        r"tensor of shape \(1,\)",
        r"sum it first",
    ),
    Row(
        "`num_items` in a mean-mode window",
        lambda w: accumulate(w, num_items=4),
        ConfigError,
        r"opened in mean mode",
        r"on every micro-batch of a window, or on none",
    ),
    Row(
        "`scaler=True`",
        lambda w: accumulate(w, scaler=True),
        ConfigError,
        r"got bool",
        r"GradScaler or None",
    ),
    Row(
        "`scaler=` on a micro-batch of a window accumulated without one",
        lambda w: accumulate(w, scaler=w.scaler),
        ConfigError,
        r"scaled by a GradScaler but the window's earlier ones were not",
        r"same scaler= to accumulate on every micro-batch of a window, or on none",
    ),
    Row(
        "no `scaler=` on a micro-batch of a window scaled by one",
        lambda w: accumulate(w, state=attrs.evolve(w.open, window_scaled=True)),
        ConfigError,
        r"without the GradScaler the window's earlier losses were scaled by",
        r"same scaler= to accumulate on every micro-batch of a window",
    ),
    Row(
        "`apply_step` without the GradScaler the window's losses were scaled by",
        lambda w: apply(w, attrs.evolve(w.closed, window_scaled=True)),
        ConfigError,
        r"losses were scaled by a GradScaler .* but its step was given none",
        r"Pass the same GradScaler to the step",
    ),
    Row(
        "`apply_step(..., scaler=...)` on a window accumulated without one",
        lambda w: accumfn.apply_step(w.closed, w.optimizer, w.model, scaler=w.scaler),
        ConfigError,
        r"given a GradScaler but its losses were accumulated without one",
        r"Pass the GradScaler to accumulate on every micro-batch as well",
    ),
    Row(
        "`flush(..., scaler=...)` on a window accumulated without one",
        lambda w: accumfn.flush(w.open, w.model, scaler=w.scaler),
        ConfigError,
        r"flush was given a GradScaler but this window's losses were accumulated without one",
        r"Pass the GradScaler to accumulate on every micro-batch as well",
    ),
    Row(
        "a copy of a mid-window state whose counts were tensors (`copy.deepcopy(state)`, "
        "`AccumState.from_dict(state.to_dict())`, `attrs.evolve(state)`)",
        lambda w: accumulate(w, state=counted_on_device_copy(w), num_items=3),
        ConfigError,
        r"counted num_items on the device .* this state is a copy of it .* too few items",
        r"Continue from the state accumulate returned.*checkpoint\.capture",
    ),
    Row(
        "`(state, stepped)` passed as the state",
        lambda w: accumulate(w, state=(w.open, False)),
        ConfigError,
        r"got tuple",
        r"unpack it",
    ),
    Row(
        "`apply_step(state, model, optimizer)` (swapped)",
        lambda w: accumfn.apply_step(w.closed, w.model, w.optimizer),
        ConfigError,
        r"got Sequential",
        r"order is \(state, optimizer, model",
    ),  # type: ignore[arg-type]
    # the window step: optimizers, schedulers, what it is checked for before it changes anything
    Row(
        "`optimizer=[]`",
        lambda w: GradientAccumulator([]),
        ConfigError,
        r"optimizer is an empty sequence",
        r"pass a torch\.optim\.Optimizer, or a list",
    ),
    Row(
        "`apply_step(state, [opt, model], model)`",
        lambda w: accumfn.apply_step(w.closed, [w.optimizer, w.model], w.model),
        ConfigError,
        r"optimizer\[1\] must be a torch\.optim\.Optimizer.*got Sequential",
        r"order is \(state, optimizer, model",
    ),  # type: ignore[list-item]
    Row(
        "the same optimizer twice",
        lambda w: accumfn.apply_step(w.closed, [w.optimizer, w.optimizer], w.model),
        ConfigError,
        r"the same optimizer appears twice",
        r"pass each once",
    ),
    Row(
        "a parameter in two optimizers",
        lambda w: GradientAccumulator(
            [w.optimizer, torch.optim.SGD(list(w.model.parameters())[:1], lr=0.1)]
        ),
        ConfigError,
        r"shape \(4, 5\) is in optimizer 0 and optimizer 1",
        r"Give each parameter to one optimizer",
    ),
    Row(
        "`GradientAccumulator(LBFGS(...))`",
        lambda w: GradientAccumulator(torch.optim.LBFGS(w.model.parameters())),
        ConfigError,
        r"LBFGS\.step\(\) needs closure",
        r"optimizer that steps without a closure",
    ),
    Row(
        "`apply_step` with LBFGS",
        lambda w: accumfn.apply_step(w.closed, torch.optim.LBFGS(w.model.parameters()), w.model),
        ConfigError,
        r"LBFGS\.step\(\) needs closure",
        r"optimizer that steps without a closure",
    ),
    Row(
        "`scheduler=ReduceLROnPlateau(...)`",
        lambda w: GradientAccumulator(w.optimizer, 4, scheduler=plateau()),
        ConfigError,
        r"ReduceLROnPlateau\.step\(\) needs metrics",
        r"step it yourself.*zero-argument callable",
    ),
    Row(
        "`apply_step(..., scheduler=ReduceLROnPlateau(...))`",
        lambda w: accumfn.apply_step(w.closed, w.optimizer, w.model, scheduler=plateau()),
        ConfigError,
        r"ReduceLROnPlateau\.step\(\) needs metrics",
        r"step it yourself.*zero-argument callable",
    ),
    Row(
        "`scheduler=0.1`",
        lambda w: GradientAccumulator(w.optimizer, 4, scheduler=0.1),
        ConfigError,
        r"got float",
        r"step\(\) method or be a zero-argument callable",
    ),
    Row(
        "schedule callable returns 0 for the next window",
        lambda w: accumfn.apply_step(zero_next_window(w), w.optimizer, w.model),
        ConfigError,
        r"returned 0 for effective step 1",
        r"must return an int >= 1",
    ),
    Row(
        "schedule callable returns 0 for the next window, object API",
        lambda w: GradientAccumulator(w.optimizer, lambda s: 1 if s == 0 else 0).accumulate(
            w.loss(), w.model
        ),
        ConfigError,
        r"returned 0 for effective step 1",
        r"must return an int >= 1",
    ),
    Row(
        "two accumulators on one GradScaler",
        second_accumulator_on_scaler,
        ConfigError,
        r"already serves another optimizer set \(SGD\)",
        r"optimizer=\[opt_a, opt_b\].*own GradScaler",
    ),
    Row(
        "fp16 parameters with a GradScaler",
        lambda w: GradientAccumulator(lone_optimizer(torch.float16), 4, scaler=w.scaler),
        ConfigError,
        r"Attempting to unscale FP16 gradients",
        r"torch\.autocast.*drop the GradScaler",
    ),
    Row(
        "`loss.backward()` before `accumulate`",
        lambda w: accumulate(w, loss=backwarded_loss(w)),
        LossError,
        r"already used by a backward pass",
        r"accumulate runs backward itself.*remove your loss\.backward\(\)",
    ),
    # call order
    Row(
        "`apply_step` mid-window",
        lambda w: apply(w, w.open),
        CallOrderError,
        r"needs a closed window.*2 of 4",
        r"only after accumulate\(\.\.\.\) returned stepped=True",
    ),
    Row(
        "`apply_step` before any micro-step",
        lambda w: apply(w, w.fresh),
        CallOrderError,
        r"needs a closed window.*0 of 4",
        r"stepped=True",
    ),
    Row(
        "`accumulate` after a closed window",
        lambda w: accumulate(w, state=w.closed),
        CallOrderError,
        r"the window is closed",
        r"call apply_step",
    ),
    Row(
        "`reset_epoch` with a closed window",
        lambda w: accumfn.reset_epoch(w.closed, w.optimizer),
        CallOrderError,
        r"the window is closed",
        r"call apply_step",
    ),
    # states and checkpoints from elsewhere
    Row(
        "checkpoint of another config",
        lambda w: w.acc.load_state_dict(GradientAccumulator(w.optimizer, 8).state_dict()),
        CheckpointError,
        r"another accumulation config.*'steps': 8.*'steps': 4",
        r"allow_config_change=True",
    ),
    Row(
        "mid-window checkpoint of another config, `allow_config_change=True`",
        lambda w: restore(
            capture(core.micro_step(accumfn.init(8, max_grad_norm=None))[0], w.optimizer),
            w.open,
            w.optimizer,
            allow_config_change=True,
        ),
        CheckpointError,
        r"inside a window \(1 of 8",
        r"resume under the old config up to the next boundary",
    ),
    Row(
        "checkpoint of another model",
        lambda w: w.acc.load_state_dict(other_model_checkpoint(w)),
        CheckpointError,
        r"shape \(6, 5\).*\(4, 5\)",
        r"load it into the model it was saved from",
    ),
    Row(
        "checkpoint of other parameter groups",
        lambda w: w.acc.load_state_dict(
            capture(w.open, torch.optim.SGD(list(w.model.parameters())[:2]))
        ),
        CheckpointError,
        r"gradients \(2\) do not match the optimizer's 4",
        r"same parameter groups",
    ),
    Row(
        "checkpoint grads in float64",
        lambda w: w.acc.load_state_dict(with_grads(w, lambda g: g.double())),
        CheckpointError,
        r"torch\.float64.*torch\.float32",
        r"cast the model",
    ),
    Row(
        "GradScaler checkpoint, run without one",
        lambda w: w.acc.load_state_dict(scaled_checkpoint(w)),
        CheckpointError,
        r"with an enabled GradScaler and this run has none",
        r"pass the same kind of GradScaler",
    ),
    Row(
        "scaler state with `scale='big'`",
        lambda w: restore(scaled_checkpoint(w, scale="big"), w.open, w.optimizer, w.scaler),
        CheckpointError,
        r"scaler state is malformed",
        r"what GradScaler\.state_dict\(\) returned",
    ),
    Row(
        "`model.state_dict()` given as the accumulator's",
        lambda w: w.acc.load_state_dict(w.model.state_dict()),
        CheckpointError,
        r"not an accumfn checkpoint",
        r"Pass what GradientAccumulator\.state_dict\(\)",
    ),
    Row(
        "checkpoint of a future format",
        lambda w: w.acc.load_state_dict(future_format(w)),
        CheckpointError,
        r"state format 2 is not supported",
        r"Upgrade accumfn",
    ),
    Row(
        "grads in a checkpoint with no open window",
        lambda w: restore(hand_edited(w), w.fresh, w.optimizer),
        CheckpointError,
        r"has no open window",
        r"Pass what state_dict\(\)/capture\(\) returned",
    ),
    Row(
        "`allow_config_change='yes'`",
        lambda w: w.acc.load_state_dict(w.acc.state_dict(), allow_config_change="yes"),
        ConfigError,
        r"got 'yes'",
        r"True or False",
    ),  # type: ignore[arg-type]
    # AccumState.from_dict
    Row(
        "`from_dict` of a future format",
        lambda w: AccumState.from_dict(w.open_dict(format=2)),
        StateFormatError,
        r"state format 2 is not supported",
        r"Upgrade accumfn",
    ),
    Row(
        "`from_dict` without `format`",
        lambda w: AccumState.from_dict({"window": 4}),
        StateFormatError,
        r"state format None",
        r"Upgrade accumfn or start from a fresh state",
    ),
    Row(
        "`from_dict` of a list",
        lambda w: AccumState.from_dict([1, 2]),
        StateFormatError,
        r"got list",
        r"pass that dict, unchanged",
    ),
    Row(
        "`from_dict` with a key missing",
        lambda w: AccumState.from_dict({k: v for k, v in w.open_dict().items() if k != "closed"}),
        StateFormatError,
        r"missing \['closed'\]",
        r"unchanged",
    ),
    Row(
        "`from_dict` with an extra key",
        lambda w: AccumState.from_dict(w.open_dict(extra=1)),
        StateFormatError,
        r"unexpected \['extra'\]",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `micro_step='1'`",
        lambda w: AccumState.from_dict(w.open_dict(micro_step="1")),
        StateFormatError,
        r"\['micro_step'\] must be int, got '1'",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `closed=1`",
        lambda w: AccumState.from_dict(w.open_dict(closed=1)),
        StateFormatError,
        r"\['closed'\] must be bool, got 1",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `grad_scale='x'`",
        lambda w: AccumState.from_dict(w.open_dict(grad_scale="x")),
        StateFormatError,
        r"\['grad_scale'\] must be float",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `grad_scale=nan`",
        lambda w: AccumState.from_dict(w.open_dict(grad_scale=NAN)),
        StateFormatError,
        r"grad_scale must be a finite number >= 0, got nan",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `window_scaled='yes'`",
        lambda w: AccumState.from_dict(w.open_dict(window_scaled="yes")),
        StateFormatError,
        r"\['window_scaled'\] must be bool or None, got 'yes'",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `window_scaled=True` with the window empty",
        lambda w: AccumState.from_dict(w.fresh.to_dict() | {"window_scaled": True}),
        StateFormatError,
        r"window_scaled must be None while the window is empty",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `window_norm='median'`",
        lambda w: AccumState.from_dict(w.open_dict(window_norm="median")),
        StateFormatError,
        r"'median' is not a valid Normalization",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `micro_step` > `window`",
        lambda w: AccumState.from_dict(w.open_dict(micro_step=5)),
        StateFormatError,
        r"micro_step \(5\) exceeds the window \(4\)",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `epoch=-1`",
        lambda w: AccumState.from_dict(w.open_dict(epoch=-1)),
        StateFormatError,
        r"epoch must be an int >= 0, got -1",
        r"unchanged",
    ),
    Row(
        "`from_dict`: `batch_size=2.0`",
        lambda w: AccumState.from_dict(w.config_dict(batch_size=2.0)),
        StateFormatError,
        r"\['batch_size'\] must be int, got 2\.0",
        r"unchanged",
    ),
    Row(
        "`from_dict`: unknown schedule kind",
        lambda w: AccumState.from_dict(w.config_dict(schedule={"kind": "cosine"})),
        StateFormatError,
        r"not a schedule of format 1",
        r"unchanged",
    ),
    Row(
        "`from_dict` of a callable schedule, none given",
        lambda w: AccumState.from_dict(w.config_dict(schedule={"kind": "callable", "name": "f"})),
        StateFormatError,
        r"saved with a callable accumulation schedule \(f\)",
        r"schedule=your_function",
    ),
    Row(
        "`from_dict(schedule=f)` of a constant schedule",
        lambda w: AccumState.from_dict(w.open_dict(), schedule=lambda s: 2),
        StateFormatError,
        r"only for states saved with a callable",
        r"the dict already holds",
    ),
    # config files
    Row(
        "no config file",
        lambda w: AccumulationConfig.from_yaml(w.dir / "missing.yaml"),
        ConfigError,
        r"no config file at .*missing\.yaml' \(it does not exist",
        r"check the path",
    ),
    Row(
        "config file without a `training:` section",
        lambda w: AccumulationConfig.from_yaml(w.dir / "no_section.yaml"),
        ConfigError,
        r"no_section\.yaml has no 'training' section \(top-level keys: model\)",
        r"put the accumulation settings under 'training:', or pass section=",
    ),
    Row(
        '`gradient_accumulation_steps: "4"`',
        lambda w: AccumulationConfig.from_yaml(w.dir / "quoted.yaml"),
        ConfigError,
        r"quoted\.yaml \[training\]: gradient_accumulation_steps must be an int >= 1, got '4' "
        r"of type str",
        r"Write it as a number, without quotes \(gradient_accumulation_steps: 4\)",
    ),
    Row(
        "unknown key `gradient_accumulation_step: 4`",
        lambda w: AccumulationConfig.from_yaml(w.dir / "typo.yaml"),
        ConfigError,
        r"typo\.yaml \[training\]: unknown key 'gradient_accumulation_step' with value 4",
        r"did you mean 'gradient_accumulation_steps'\?\)\. Known keys: "
        r"gradient_accumulation_steps, batch_size, .*Fix the spelling, or pass ignore=",
    ),
    Row(
        "`batch_size: -8`",
        lambda w: AccumulationConfig.from_yaml(w.dir / "negative.yaml"),
        ConfigError,
        r"negative\.yaml \[training\]: batch_size must be >= 1, got -8",
        r"batch_size is the number of samples per micro-batch on each process, an int >= 1",
    ),
    Row(
        "`lr_scaling: squareroot`",
        lambda w: AccumulationConfig.from_yaml(w.dir / "scaling.yaml"),
        ConfigError,
        r"lr_scaling must be one of 'none', 'linear', 'sqrt', got 'squareroot'",
        r"did you mean 'sqrt'\?",
    ),
    Row(
        "`lr_scaling='linear'` without `base_batch_size`",
        lambda w: AccumulationConfig(learning_rate=0.1, lr_scaling="linear"),
        ConfigError,
        r"lr_scaling='linear' needs base_batch_size",
        r"set learning_rate to the rate tuned at base_batch_size samples per step, or set "
        r"lr_scaling to 'none'",
    ),
    Row(
        "`from_mapping({'learning_rate': '3e-4'})`",
        lambda w: AccumulationConfig.from_mapping({"learning_rate": "3e-4"}),
        ConfigError,
        r"learning_rate must be a positive number, got '3e-4' of type str",
        r"without quotes \(learning_rate: 3e-4\)",
    ),
    # files
    Row(
        "corrupted checkpoint file",
        lambda w: load_checkpoint(w.dir / "corrupted.pt"),
        CheckpointError,
        r"corrupted\.pt.*corrupted or truncated",
        r"Resume from an earlier checkpoint",
    ),
    Row(
        "truncated checkpoint file",
        lambda w: load_checkpoint(w.dir / "truncated.pt"),
        CheckpointError,
        r"truncated\.pt.*corrupted or truncated",
        r"Resume from an earlier checkpoint",
    ),
    Row(
        "empty checkpoint file",
        lambda w: load_checkpoint(w.dir / "empty.pt"),
        CheckpointError,
        r"\(0 bytes\) is corrupted or truncated",
        r"Resume from an earlier checkpoint",
    ),
    Row(
        "checkpoint holding a custom class",
        lambda w: load_checkpoint(w.dir / "unsafe.pt"),
        CheckpointError,
        r"refuses to unpickle",
        r"save state_dict\(\)s and plain values",
    ),
    Row(
        "no checkpoint file",
        lambda w: load_checkpoint(w.dir / "missing.pt"),
        CheckpointNotFoundError,
        r"no checkpoint at .*missing\.pt",
        r"check the path, or start from scratch",
    ),
    Row(
        "save into a missing directory",
        lambda w: save_checkpoint({}, w.dir / "nope" / "c.pt"),
        CheckpointError,
        r"directory .*nope' does not exist",
        r"create it first",
    ),
    Row(
        "save a lambda",
        lambda w: save_checkpoint({"f": lambda: 0}, w.dir / "good.pt"),
        CheckpointError,
        r"cannot save checkpoint .*good\.pt.*pickle",
        r"Save state_dict\(\)s and plain values.*was not touched",
    ),
]


def row_id(row: Row | NonFinite) -> str:
    return re.sub(r"[^a-zA-Z0-9=.,()_'-]+", "_", row.bad.replace("`", "")).strip("_")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_bad_input_gets_a_clear_error_and_changes_nothing(world: World, row: Row) -> None:
    before = snapshot(world)
    with pytest.raises(row.error) as info:
        row.call(world)
    assert type(info.value) is row.error  # not a subclass: the exact type the table names
    message = str(info.value)
    assert re.search(row.problem, message, re.S), f"no problem in: {message}"
    assert re.search(row.fix, message, re.S), f"no fix in: {message}"
    after = snapshot(world)
    for key, value in before.items():
        assert same(value, after[key]), f"{key} changed"
    assert not list(world.dir.glob(".*.tmp"))


def test_rows_are_distinct() -> None:
    assert len({row.bad for row in ROWS}) == len(ROWS)


# -- non-finite losses and gradients: no error (that would read a value every micro-step) --


@dataclass(frozen=True)
class NonFinite:
    bad: str
    outcome: str
    """What you get, for docs/bad-inputs.md."""
    skip_nonfinite: bool
    scaler: bool
    loss_value: float


NONFINITE = [
    NonFinite(
        "NaN loss, `skip_nonfinite=True`",
        "the window is skipped: no optimizer or scheduler step, `skipped_steps` + 1, "
        "grads cleared, params unchanged",
        skip_nonfinite=True,
        scaler=False,
        loss_value=NAN,
    ),
    NonFinite(
        "inf loss (inf grads) with a GradScaler",
        "GradScaler skips the step and backs its scale off; `skipped_steps` + 1, "
        "no scheduler step, params unchanged",
        skip_nonfinite=False,
        scaler=True,
        loss_value=math.inf,
    ),
    NonFinite(
        "NaN loss, default config",
        "not checked (a check reads a value back from the device): the NaN reaches the "
        "params; pass `skip_nonfinite=True` or use a GradScaler",
        skip_nonfinite=False,
        scaler=False,
        loss_value=NAN,
    ),
]


@pytest.mark.parametrize("case", NONFINITE, ids=[row_id(c) for c in NONFINITE])
def test_nonfinite_loss(case: NonFinite) -> None:
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = GradScaler("cpu", init_scale=1024.0) if case.scaler else None
    state = accumfn.init(2, skip_nonfinite=case.skip_nonfinite, max_grad_norm=None)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.ones(3, 5), torch.zeros(3, 2)
    state, _ = accumfn.accumulate(state, F.mse_loss(model(x), y), model, scaler=scaler)
    bad = F.mse_loss(model(x), y) * case.loss_value
    state, stepped = accumfn.accumulate(state, bad, model, scaler=scaler)
    assert stepped
    state = accumfn.apply_step(state, optimizer, model, scaler=scaler, scheduler=scheduler)
    assert all(p.grad is None for p in model.parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if case.skip_nonfinite or case.scaler:
        assert (state.optimizer_steps, state.skipped_steps) == (0, 1)
        assert scheduler.get_last_lr() == [0.1]
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        if scaler is not None:
            assert scaler.get_scale() == 512.0
    else:
        assert (state.optimizer_steps, state.skipped_steps) == (1, 0)
        assert not finite


def gist_of(message: str, directory: str, limit: int = 220) -> str:
    """The message for a Markdown cell: no temporary paths, at most ``limit`` characters."""
    gist = message.replace(directory + os.sep, "").replace("|", "\\|").replace("\n", " ")
    return gist if len(gist) <= limit else gist[: gist.rindex(" ", 0, limit)] + " …"


def catalogue() -> str:
    """The table of docs/bad-inputs.md, from the messages the rows get now."""
    lines = ["| bad input | what you get |", "|---|---|"]
    for row in ROWS:
        with tempfile.TemporaryDirectory() as directory:
            try:
                row.call(make_world(Path(directory)))
            except row.error as exc:
                gist = gist_of(str(exc), directory)
                lines.append(f"| {row.bad} | `{type(exc).__name__}`: {gist} |")
    lines += [f"| {case.bad} | no error: {case.outcome} |" for case in NONFINITE]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(catalogue() + "\n")
