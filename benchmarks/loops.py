"""The training loops compared, as per-micro-step functions on a given model and optimizer.

Every loop divides the loss by the window (or lets its library do it), clips the
accumulated gradient once per window when the workload clips, steps at the boundary and
zeroes the gradients (``set_to_none``). Loops built on the same model and optimizer can
run alternately, a window at a time: each leaves no gradient behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import accumfn

from .workloads import WINDOW, Batch, Workload

__all__ = [
    "LOOPS",
    "LoopMaker",
    "MicroStep",
    "MissingPackage",
    "StepLoop",
    "accumulator_loop",
    "functional_loop",
    "make_loop",
    "make_step",
]

MicroStep = Callable[[int, Batch, bool], None]
"""One micro-step: (index in the window, batch, is the last batch of the data)."""


class MissingPackage(RuntimeError):
    """The library a loop compares against is not installed."""


def hand_step(workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
    """The loop people write by hand: loss / N, backward, clip and step every N."""
    clip = workload.max_grad_norm

    def step(index: int, batch: Batch, last: bool) -> None:
        torch.autograd.backward(workload.loss(model, batch) / WINDOW)
        if (index + 1) % WINDOW == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


LoopMaker = Callable[[Workload, nn.Module, torch.optim.Optimizer], MicroStep]
"""Builds a loop's micro-step function on a model and optimizer."""


def functional_loop(lib: Any = accumfn, *, read_norm: bool = False) -> LoopMaker:
    """accumfn's functional API (of ``lib``: this tree's, or another revision's imported
    under another name): ``accumulate``, then ``step_window`` (no norm read) or, with
    ``read_norm``, ``apply_step`` (reads the norm: 1 sync per window)."""

    def make(workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
        state = lib.init(WINDOW, max_grad_norm=workload.max_grad_norm)

        def step(index: int, batch: Batch, last: bool) -> None:
            nonlocal state
            loss = workload.loss(model, batch)
            state, stepped = lib.accumulate(state, loss, model, is_final_batch=last)
            if stepped:
                state = (
                    lib.apply_step(state, optimizer, model)
                    if read_norm
                    else lib.step_window(state, optimizer, model).state
                )

        return step

    return make


def accumulator_loop(lib: Any = accumfn, window: int = WINDOW, *, clip: bool = True) -> LoopMaker:
    """accumfn's object API (of ``lib``): ``GradientAccumulator(optimizer, window)``,
    clipped as the workload is (``clip=False``: ``max_grad_norm=None``); ``window=1`` makes
    every micro-step a window."""

    def make(workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
        clipped = workload.max_grad_norm if clip else None
        accumulator = lib.GradientAccumulator(optimizer, window, max_grad_norm=clipped)

        def step(index: int, batch: Batch, last: bool) -> None:
            accumulator.accumulate(workload.loss(model, batch), model, is_final_batch=last)

        return step

    return make


_ACCELERATOR: Any = None


def accelerate_step(
    workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer
) -> MicroStep:
    """Accelerate's ``accelerator.accumulate(model)`` on CPU."""
    global _ACCELERATOR
    try:
        from accelerate import Accelerator  # type: ignore[import-untyped, unused-ignore]
    except ImportError as error:
        raise MissingPackage("accelerate is not installed (pip install accelerate)") from error
    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator(gradient_accumulation_steps=WINDOW, cpu=True)
    accelerator = _ACCELERATOR
    prepared, wrapped = accelerator.prepare(model, optimizer)
    if prepared is model:
        # The model is shared with the other loops, which run outside this Accelerator: the
        # mark prepare() leaves on it would have accumfn refuse it as a model Accelerate
        # accumulates for.
        model.__dict__.pop("_is_accelerate_prepared", None)
    clip = workload.max_grad_norm

    def step(index: int, batch: Batch, last: bool) -> None:
        with accelerator.accumulate(prepared):
            accelerator.backward(workload.loss(prepared, batch))
            if accelerator.sync_gradients and clip is not None:
                accelerator.clip_grad_norm_(prepared.parameters(), clip)
            wrapped.step()
            wrapped.zero_grad(set_to_none=True)

    return step


def large_batch_step(
    workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer
) -> MicroStep:
    """One large batch per optimizer step (the batches given are the large ones)."""
    clip = workload.max_grad_norm

    def step(index: int, batch: Batch, last: bool) -> None:
        torch.autograd.backward(workload.loss(model, batch))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


LOOPS: dict[str, LoopMaker] = {
    "hand": hand_step,
    "hand_control": hand_step,
    "accumfn": functional_loop(),
    "accumfn_apply_step": functional_loop(read_norm=True),
    "accumulator": accumulator_loop(),
    "plain": large_batch_step,  # on micro-batches: no accumulation, a step each
    "accumulator_steps1": accumulator_loop(window=1, clip=False),
    "accelerate": accelerate_step,
    "large_batch": large_batch_step,
}
"""Loops that run a micro-step at a time (Lightning drives its own loop: see ``timing``)."""


def make_step(
    name: str, workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer
) -> MicroStep:
    """The loop ``name`` as a micro-step function on this model and optimizer."""
    return LOOPS[name](workload, model, optimizer)


@dataclass
class StepLoop:
    """A loop on its own copy of the model, so syncs and memory can be counted alone."""

    step: MicroStep
    optimizer: torch.optim.Optimizer

    def __call__(self, batches: Sequence[Batch]) -> float:
        """Runs the batches (whole windows); returns wall seconds per micro-step."""
        step, last = self.step, len(batches) - 1
        start = time.perf_counter()
        for index, batch in enumerate(batches):
            step(index % WINDOW, batch, index == last)
        return (time.perf_counter() - start) / len(batches)


def make_loop(name: str, workload: Workload, seed: int = 0) -> StepLoop:
    """The loop ``name`` on a fresh copy of the workload's model (same weights for all)."""
    model = workload.model(seed)
    optimizer = workload.make_optimizer(model)
    return StepLoop(make_step(name, workload, model, optimizer), optimizer)
