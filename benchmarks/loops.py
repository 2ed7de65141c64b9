"""The training loops compared, as per-micro-step functions on the same model and data.

Every loop divides the loss by the window (or lets its library do it), clips the
accumulated gradient to ``MAX_GRAD_NORM`` once per window and steps AdamW at the boundary.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

import accumfn

from .workloads import MAX_GRAD_NORM, WINDOW, Batch, Workload, make_optimizer

__all__ = ["LOOPS", "Loop", "MissingPackage", "StepLoop", "make_loop"]

MicroStep = Callable[[int, Batch, bool], None]
"""One micro-step: (index, batch, is_last)."""


class MissingPackage(RuntimeError):
    """The library a loop compares against is not installed."""


class Loop:
    """Runs micro-batches (a whole number of windows); returns seconds per micro-step."""

    def __call__(self, batches: Sequence[Batch]) -> float:
        raise NotImplementedError


@dataclass
class StepLoop(Loop):
    """A loop written as a micro-step function, so syncs can be counted step by step."""

    step: MicroStep
    optimizer: torch.optim.Optimizer

    def __call__(self, batches: Sequence[Batch]) -> float:
        step, last = self.step, len(batches) - 1
        start = time.perf_counter()
        for index, batch in enumerate(batches):
            step(index, batch, index == last)
        return (time.perf_counter() - start) / len(batches)


def hand_loop(workload: Workload, model: nn.Module) -> StepLoop:
    """The loop people write by hand: loss / N, backward, clip and step every N."""
    optimizer = make_optimizer(model)

    def step(index: int, batch: Batch, last: bool) -> None:
        torch.autograd.backward(workload.loss(model, batch) / WINDOW)
        if (index + 1) % WINDOW == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return StepLoop(step, optimizer)


def _functional(workload: Workload, model: nn.Module, read_norm: bool) -> StepLoop:
    optimizer = make_optimizer(model)
    state = accumfn.init(WINDOW, max_grad_norm=MAX_GRAD_NORM)

    def step(index: int, batch: Batch, last: bool) -> None:
        nonlocal state
        loss = workload.loss(model, batch)
        state, stepped = accumfn.accumulate(state, loss, model, is_final_batch=last)
        if stepped:
            state = (
                accumfn.apply_step(state, optimizer, model)
                if read_norm
                else accumfn.step_window(state, optimizer, model).state
            )

    return StepLoop(step, optimizer)


def functional_loop(workload: Workload, model: nn.Module) -> StepLoop:
    """accumfn's functional API: ``accumulate``, then ``step_window`` (lazy norm)."""
    return _functional(workload, model, read_norm=False)


def apply_step_loop(workload: Workload, model: nn.Module) -> StepLoop:
    """accumfn's functional API with ``apply_step``, which reads the norm (1 sync/window)."""
    return _functional(workload, model, read_norm=True)


def accumulator_loop(workload: Workload, model: nn.Module) -> StepLoop:
    """accumfn's object API: ``GradientAccumulator.accumulate``."""
    optimizer = make_optimizer(model)
    accumulator = accumfn.GradientAccumulator(optimizer, WINDOW, max_grad_norm=MAX_GRAD_NORM)

    def step(index: int, batch: Batch, last: bool) -> None:
        accumulator.accumulate(workload.loss(model, batch), model, is_final_batch=last)

    return StepLoop(step, optimizer)


_ACCELERATOR: Any = None


def accelerate_loop(workload: Workload, model: nn.Module) -> StepLoop:
    """Accelerate's ``accelerator.accumulate(model)`` on CPU."""
    global _ACCELERATOR
    try:
        from accelerate import Accelerator  # type: ignore[import-untyped, unused-ignore]
    except ImportError as error:
        raise MissingPackage("accelerate is not installed (pip install accelerate)") from error
    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator(gradient_accumulation_steps=WINDOW, cpu=True)
    accelerator = _ACCELERATOR
    prepared, optimizer = accelerator.prepare(model, make_optimizer(model))

    def step(index: int, batch: Batch, last: bool) -> None:
        with accelerator.accumulate(prepared):
            accelerator.backward(workload.loss(prepared, batch))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(prepared.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return StepLoop(step, optimizer.optimizer)


def large_batch_loop(workload: Workload, model: nn.Module) -> StepLoop:
    """One large batch per optimizer step (the batches given are the large ones)."""
    optimizer = make_optimizer(model)

    def step(index: int, batch: Batch, last: bool) -> None:
        torch.autograd.backward(workload.loss(model, batch))
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return StepLoop(step, optimizer)


class LightningLoop(Loop):
    """Lightning's ``Trainer(accumulate_grad_batches=N)``, timed inside ``fit``.

    A fresh Trainer per call; the clock runs from the start of the second window to the
    end of the last batch (setup and the first window are left out, in Lightning's favour).
    """

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        try:
            import lightning as L
        except ImportError as error:
            raise MissingPackage("lightning is not installed (pip install lightning)") from error
        optimizer = make_optimizer(model)

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
                return workload.loss(self.model, batch)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return optimizer

        class Clock(L.Callback):
            start = end = 0.0

            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
                if i == WINDOW:
                    self.start = time.perf_counter()

            def on_train_batch_end(self, *args: Any) -> None:
                self.end = time.perf_counter()

        self._lightning = L
        self._module = Module()
        self._clock = Clock

    def __call__(self, batches: Sequence[Batch]) -> float:
        clock = self._clock()
        loader: Any = torch.utils.data.DataLoader(cast(Any, list(batches)), batch_size=None)
        with _quiet(), tempfile.TemporaryDirectory(prefix="accumfn-bench-") as root:
            trainer = self._lightning.Trainer(
                accelerator="cpu",
                devices=1,
                max_epochs=1,
                accumulate_grad_batches=WINDOW,
                gradient_clip_val=MAX_GRAD_NORM,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                callbacks=[clock],
                default_root_dir=root,
            )
            trainer.fit(self._module, loader)
        return float(clock.end - clock.start) / (len(batches) - WINDOW)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


LOOPS: dict[str, Callable[[Workload, nn.Module], Loop]] = {
    "hand": hand_loop,
    "accumfn": functional_loop,
    "accumfn_apply_step": apply_step_loop,
    "accumulator": accumulator_loop,
    "accelerate": accelerate_loop,
    "lightning": LightningLoop,
    "large_batch": large_batch_loop,
}


def make_loop(name: str, workload: Workload, seed: int = 0) -> Loop:
    """The loop ``name`` on a fresh copy of the workload's model (same weights for all)."""
    return LOOPS[name](workload, workload.model(seed))
