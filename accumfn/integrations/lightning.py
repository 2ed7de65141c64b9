"""``ExactAccumulation``: Lightning's ``accumulate_grad_batches`` made exact.

Lightning divides every micro-batch loss by ``accumulate_grad_batches`` (N), also in the
short window that ends an epoch, and has no notion of item (token) counts. This callback
counts each window's backward passes (and items) with the accumfn core and rescales the
accumulated gradients before the optimizer step and before Lightning clips them:
mean mode by N * world / (micro-batches in the window on all ranks), N/k for a window of k
on each rank, item mode by N * world / (items in the window on all ranks). Importing this
module imports ``lightning``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import core
from ..core import AccumState, Normalization, check_count
from ..errors import CallOrderError, ConfigError, raise_missing
from ..grads import optimizer_params, scale_grads_

try:
    import lightning.pytorch as pl
except ImportError as error:
    raise_missing(error, "lightning", "lightning", "accumfn.lightning_callback")

__all__ = ["ExactAccumulation"]


class ExactAccumulation(pl.Callback):
    """Make ``Trainer(accumulate_grad_batches=N)`` equal to large-batch training.

    Mean mode (default): ``training_step`` returns a mean loss; a short final window of k
    micro-batches is rescaled by N/k, so it is the mean over its k micro-batches.

    Item mode: ``training_step`` returns the *sum* of its items' losses and calls
    ``callback.add_items(n)`` with its item count; the window's update is the mean over all
    its items (on all ranks). Use it with automatic optimization only.
    """

    def __init__(self) -> None:
        self._state: AccumState | None = None
        self._items: int | None = None

    @property
    def state(self) -> AccumState | None:
        """The core state counting the open window (None before training starts)."""
        return self._state

    def add_items(self, num_items: int) -> None:
        """Item mode: this micro-batch's loss is a sum over ``num_items`` items."""
        count = check_count("num_items", num_items, minimum=0)  # (all its items masked)
        self._items = count if self._items is None else self._items + count

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "ExactAccumulation works with automatic optimization; with "
                "automatic_optimization=False use accumfn.GradientAccumulator in training_step."
            )
        self._state = None
        self._items = None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        window = trainer.accumulate_grad_batches
        state = self._state
        if state is None or (state.micro_step == 0 and state.window != window):
            # Lightning sets N (GradientAccumulationScheduler) and clips (gradient_clip_val)
            state = core.init(window, max_grad_norm=None)
        items, self._items = self._items, None
        self._state, _ = core.micro_step(state, num_items=items)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        state = self._state
        if state is None or state.micro_step == 0:
            raise CallOrderError(
                "ExactAccumulation saw an optimizer step without a backward pass in its window."
            )
        world = trainer.world_size
        items = state.window_norm is Normalization.ITEMS
        global_steps = global_items = None
        if items or world > 1:  # the window over all ranks: one sum of two counts
            local = torch.tensor(
                [state.micro_step, state.window_items], dtype=torch.int64, device=pl_module.device
            )
            summed = trainer.strategy.reduce(local, reduce_op="sum")
            global_steps, total = (int(value) for value in summed.tolist())
            global_items = total if items else None
        state = core.close_window(
            state, global_items=global_items, global_micro_steps=global_steps, averaged_over=world
        )
        # Lightning divided every loss by N; the core's factor assumes that in mean mode only
        factor = state.grad_scale
        if state.window_norm is Normalization.ITEMS:
            factor *= trainer.accumulate_grad_batches
        scale_grads_(optimizer_params(optimizer), factor)
        self._state = core.finish_step(state, applied=True)
