"""``GradientAccumulator``: the object API of the guide, wired from the step functions."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.amp import GradScaler

from . import checkpoint, core
from .config import AccumulationConfig, init_kwargs_of
from .core import AccumState
from .errors import CallOrderError, ConfigError, StepError
from .integrations import check_conflict, trainer_accumulation
from .step import (
    Optimizers,
    Schedulers,
    accumulate,
    as_optimizers,
    carry,
    check_loss,
    check_model,
    check_settings,
    claim_scaler,
    closed_loss,
    continue_guard,
    flush,
    guard_for,
    prepare_forward,
    prepare_step,
    report_dropped,
    reset_epoch,
    run_step,
    warn_untracked,
    window_params,
)

__all__ = ["AccumulationStats", "GradientAccumulator"]

_MODEL_HINT = " (the model whose loss this is, wrapped as you train it: DDP, FSDP2, torch.compile)"


@attrs.frozen
class AccumulationStats:
    """A snapshot of the accumulator's counters."""

    total_steps: int
    """Micro-batches accumulated (backward calls)."""
    optimizer_steps: int
    """Windows whose update was applied (``optimizer.step()`` ran)."""
    current_accumulation: int
    """Micro-batches in the open window (0 to window-1)."""
    effective_batch_size: int | None
    """Micro-batch size times the window (per process); None when the caller closes
    windows (``accumulation_steps=None``), which have no planned size."""
    is_accumulating: bool
    """True while the open window holds unapplied gradients."""
    last_grad_norm: float
    """Pre-clip gradient norm of the last window; nan before the first one, and when no
    norm is computed (no clipping, no ``skip_nonfinite`` and ``track_grad_norm=False``)."""
    skipped_steps: int = 0
    """Windows skipped for non-finite gradients (GradScaler or ``skip_nonfinite``)."""
    last_window_loss: float = math.nan
    """The last window's loss as the large batch computes it (the mean over its
    micro-batches of all ranks, or in item mode its summed losses of all ranks over its
    item count of all ranks), unscaled; nan before the first window. Read from the device
    when ``stats`` is asked for (``window_loss`` keeps it there)."""


class GradientAccumulator:
    """Accumulate gradients over micro-batches, step like one large batch.

    ``optimizer``: one optimizer or a list stepped together (one GradScaler for all);
    ``scheduler``: one, a list, or zero-argument callables. ``accumulation_steps``: an int,
    ``{epoch: steps}``, a callable of the effective step, or None (the caller closes each
    window with ``is_final_batch=True`` or ``flush``). With a Lightning ``trainer`` and
    ``accumulation_steps=1`` Lightning accumulates and this object only reports; both
    accumulating raises ValueError.

    Wiring over the step functions: ``accumulate``, and at a window's end the checks of
    ``step_window`` (before the boundary's backward, so an error there changes nothing) and
    its step. The settings (``optimizer``, ``scaler``, ``scheduler``, ``before_step``,
    ``clip_value``) may be assigned between micro-steps. A step that still raises is a
    ``StepError``; the accumulator continues from the next window. ``stats.last_grad_norm``
    is the pre-clip norm when one is computed (clipping, on by default, ``skip_nonfinite``
    or ``track_grad_norm=True``), read from the device when asked for.
    """

    def __init__(
        self,
        optimizer: Optimizers,
        accumulation_steps: core.StepsSpec = 1,
        max_grad_norm: float | None = core.DEFAULT_MAX_GRAD_NORM,
        scaler: GradScaler | None = None,
        batch_size: int = 1,
        trainer: Any = None,
        *,
        scheduler: Schedulers | None = None,
        skip_nonfinite: bool = False,
        sync_every_micro_step: bool = False,
        before_step: Callable[[Optimizers], object] | None = None,
        clip_value: float | None = None,
        accum_dtype: torch.dtype | None = None,
        track_grad_norm: bool = False,
    ) -> None:
        args = (optimizer, accumulation_steps, scaler, scheduler, before_step, clip_value)
        clip_value = check_settings(*args)
        if not isinstance(track_grad_norm, bool):
            raise ConfigError(f"track_grad_norm must be True or False, got {track_grad_norm!r}.")
        check_conflict(accumulation_steps, trainer)
        state = core.init(
            accumulation_steps,
            max_grad_norm=max_grad_norm,
            batch_size=batch_size,
            skip_nonfinite=skip_nonfinite,
            accum_dtype=accum_dtype,
            sync_every_micro_step=sync_every_micro_step,
        )
        claim_scaler(scaler, as_optimizers(optimizer))
        self.optimizer = optimizer
        self.scaler = scaler
        self.scheduler = scheduler
        self.trainer = trainer
        self.before_step = before_step
        self.clip_value = clip_value
        self._state = state
        self._lightning = trainer is not None and accumulation_steps == 1
        self._lightning_calls = 0
        self._norm: torch.Tensor | None = None
        self._window_loss: torch.Tensor | None = None
        self._track_grad_norm = track_grad_norm
        self._model: nn.Module | None = None
        self._watched: nn.Module | None = None  # whose window guard watches the optimizers
        self._warned: tuple[nn.Module, Optimizers] | None = None  # looked at for untracked

    def __del__(self) -> None:
        """Warn once if the open window was never applied (``UnappliedWindowWarning``)."""
        if not self.__dict__.get("_lightning", False):
            report_dropped(self.__dict__.get("_model"))

    def __getstate__(self) -> dict[str, Any]:
        return checkpoint.pickled(self.__dict__, self._state)

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self.__dict__.update(checkpoint.unpickled(saved))

    # -- the step ---------------------------------------------------------------------------
    def _prepare_step(self, state: AccumState, model: nn.Module, *, early: bool = False) -> Any:
        """The checks of ``step_window`` (``early``: before the boundary's backward)."""
        return prepare_step(
            state,
            self.optimizer,
            model,
            self.scaler,
            self.scheduler,
            before_step=self.before_step,
            clip_value=self.clip_value,
            warn=not early,
            early=early,
        )

    def prepare(self, model: nn.Module, *, process_group: dist.ProcessGroup | None = None) -> None:
        """Under DDP, call once before the first forward so the first window syncs once
        (``process_group``: see ``accumfn.prepare_forward``)."""
        self._model = model
        prepare_forward(self._state, model, process_group=process_group)

    def accumulate(
        self,
        loss: torch.Tensor,
        model: nn.Module,
        is_final_batch: bool = False,
        num_items: int | torch.Tensor | None = None,
    ) -> bool:
        """Backward ``loss``; at a window's end step the optimizer. Returns True if it did.

        ``num_items`` and ``is_final_batch`` as in ``accumfn.accumulate`` (with
        ``accumulation_steps=None``, ``is_final_batch=True`` closes this window). Under
        Lightning management this only checks the loss and returns True.
        """
        if self._lightning:
            check_loss(loss)
            self._lightning_calls += 1
            return True
        if model is not self._watched:
            if model is not self._model:
                check_model(model, hint=_MODEL_HINT)
            # The model's guard watches the optimizers from the first micro-step on.
            size = self._state.window
            guard_for(model, window=size).watch(as_optimizers(self.optimizer), size)
            self._model = self._watched = model
        state = self._state
        window = None
        if core.closes_window(state, is_final_batch):
            # The step's checks, before the backward: an error here changes nothing.
            window = self._prepare_step(state, model, early=True)
        state, stepped = accumulate(
            state,
            loss,
            model,
            is_final_batch=is_final_batch,
            num_items=num_items,
            scaler=self.scaler,
        )
        self._state = state
        if stepped:
            assert window is not None  # (a window closes where closes_window says it does)
            self._step(state, window, model, last=is_final_batch and not state.caller_closed)
            self._warn_untracked(model, window.optimizers)
        return stepped

    def _warn_untracked(self, model: nn.Module, optimizers: Any) -> None:
        """Once per model and optimizer(s), after the step (no window left half done)."""
        warned = self._warned
        if warned is None or warned[0] is not model or warned[1] is not self.optimizer:
            self._warned = (model, self.optimizer)
            warn_untracked(model, optimizers, window_params(optimizers))

    def _step(self, state: AccumState, window: Any, model: nn.Module, last: bool = False) -> None:
        """Run a closed window's checked step; keep the state to continue from either way.
        ``last``: the window ended the data, so a ``flush`` of the empty next window tells
        the ranks whether its step failed on some of them (no later window's exchange will)."""
        self._window_loss = closed_loss(state)
        try:
            report = run_step(state, window, model, grad_norm=self._track_grad_norm)
        except StepError as exc:
            self._state = exc.state
            self._norm = None
            if last:
                flush(exc.state, model, scaler=self.scaler)  # raises on every rank: failed here
            raise
        self._state = report.state
        self._norm = report.grad_norm
        if last:
            flush(report.state, model, scaler=self.scaler)

    def flush(self, model: nn.Module | None = None) -> bool:
        """Close and step the open window after the last micro-batch; True if it stepped.

        See ``accumfn.flush``. Under data parallelism call it on every rank, with the model
        (or after ``prepare(model)``), so that a rank that saw no micro-batch joins the others.
        """
        if self._lightning:
            return False
        if model is not None:
            check_model(model, hint="")
            self._model = model
        if self._model is None:
            if self._state.is_accumulating:  # e.g. resumed from a file, no micro-step since
                raise CallOrderError(
                    f"flush() has a window of {self._state.micro_step} micro-batch(es) to step "
                    f"but no model (no accumulate or prepare since this accumulator was built "
                    f"or loaded): call flush(model), or prepare(model) after load_state_dict."
                )
            return False
        model = self._model
        window = self._prepare_step(self._state, model) if self._state.is_accumulating else None
        state, stepped = flush(self._state, model, scaler=self.scaler)
        if not stepped or window is None:  # (ranks whose windows differ raised in flush)
            return False
        self._state = state
        # flush ends the data, as is_final_batch does: the ranks compare once more alike
        self._step(state, window, model, last=not state.caller_closed)
        return True

    def reset_epoch(self) -> None:
        """Start the next epoch; an open window is discarded with a warning (see
        ``accumfn.reset_epoch``): pass ``is_final_batch=True`` to apply it instead."""
        self._state = reset_epoch(self._state, self.optimizer, self._model)

    # -- what it reports ----------------------------------------------------------------------
    @property
    def state(self) -> AccumState:
        """The functional state behind this object (pre-clip norm read in)."""
        if self._norm is not None:
            held = self._state
            self._state = carry(held, attrs.evolve(held, last_grad_norm=float(self._norm)))
            continue_guard(self._watched, held, self._state)
            self._norm = None
        return self._state

    @property
    def window_loss(self) -> torch.Tensor | None:
        """The last window's loss (``AccumulationStats.last_window_loss``), a 0-dim float64
        tensor on the device; None before the first window."""
        return self._window_loss

    @property
    def is_lightning_managed(self) -> bool:
        return self._lightning

    @property
    def accumulation_steps(self) -> int | None:
        """Size of the current window (1 under Lightning); None if the caller closes them."""
        return None if self._state.caller_closed else self._state.window

    @property
    def effective_batch_size(self) -> int:
        """Micro-batch size times accumulation (Lightning's when it manages), per process;
        ConfigError with ``accumulation_steps=None`` (no planned size)."""
        if self._lightning:
            lightning_steps = trainer_accumulation(self.trainer) or 1
            return self._state.config.batch_size * lightning_steps
        return self._state.effective_batch_size

    @property
    def effective_step(self) -> int:
        """Windows closed so far: the open window's step, from 0 (Lightning's global_step)."""
        if self._lightning:
            return int(getattr(self.trainer, "global_step", 0))
        return self._state.effective_step

    @property
    def stats(self) -> AccumulationStats:
        state = self.state
        loss = self.window_loss
        return AccumulationStats(
            total_steps=self._lightning_calls if self._lightning else state.total_micro_steps,
            optimizer_steps=self.effective_step if self._lightning else state.optimizer_steps,
            current_accumulation=state.micro_step,
            effective_batch_size=None if state.caller_closed else self.effective_batch_size,
            is_accumulating=state.is_accumulating,
            last_grad_norm=math.nan if state.last_grad_norm is None else state.last_grad_norm,
            skipped_steps=state.skipped_steps,
            last_window_loss=math.nan if loss is None else float(loss),
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resuming at this micro-step needs (state, open window's gradients, scaler
        state), loadable with ``torch.load(weights_only=True)``."""
        return checkpoint.capture(self.state, self.optimizer, self.scaler)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], *, allow_config_change: bool = False
    ) -> None:
        """Restore from ``state_dict()``, checked whole before anything changes (see
        ``accumfn.checkpoint.restore``). Under data parallelism call it on every rank, after
        ``prepare(model)`` when the model's ranks are not the whole job."""
        model = self._model
        self._state = checkpoint.restore(
            state_dict,
            self._state,
            self.optimizer,
            self.scaler,
            allow_config_change=allow_config_change,
            model=model,
        )
        self._norm = None
        self._window_loss = None
        if model is not None:
            prepare_forward(self._state, model)

    # -- from a config file ---------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        optimizer: Optimizers,
        config: AccumulationConfig,
        *,
        scaler: GradScaler | None = None,
        scheduler: Schedulers | None = None,
        trainer: Any = None,
    ) -> GradientAccumulator:
        """An accumulator with the settings of ``config`` (``AccumulationConfig.from_yaml``);
        build ``optimizer`` with ``config.scaled_learning_rate``."""
        kwargs = {**init_kwargs_of(config), "scaler": scaler, "scheduler": scheduler}
        return cls(optimizer, kwargs.pop("steps"), trainer=trainer, **kwargs)
