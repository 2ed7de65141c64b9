"""The torch-facing transition: scale the loss as the core says, run backward, control sync."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.amp import GradScaler

from .. import core
from .. import parallel as distributed
from ..core import AccumState
from ..errors import CallOrderError, ConfigError, LossError
from ..grads import buffers, check_scaler
from . import _tally as tally
from ._guard import guard_for
from ._window import enabled

__all__ = ["accumulate", "check_loss", "flush", "micro_step_context", "prepare_forward"]


def check_loss(loss: object) -> torch.Tensor:
    """Return ``loss`` if it is a scalar tensor backward can run from, else raise LossError."""
    if not isinstance(loss, torch.Tensor):
        raise LossError(
            f"loss must be a torch.Tensor, got {type(loss).__name__}; pass the tensor the "
            f"model produced, not loss.item()."
        )
    if loss.ndim != 0:
        raise LossError(
            f"loss must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; reduce it "
            f"first (loss.mean() for mean mode, loss.sum() with num_items=... for item mode)."
        )
    if not loss.requires_grad:
        raise LossError(
            "loss does not require grad (no grad_fn): it was computed under torch.no_grad(), "
            "detached, or from a model with no trainable parameters; compute it from the "
            "model's output with grad enabled."
        )
    return loss


def prepare_forward(
    state: AccumState, model: nn.Module, *, process_group: dist.ProcessGroup | None = None
) -> None:
    """Set DDP's sync flag for the next forward from the state.

    ``accumulate`` and ``apply_step`` do this for the following micro-step; call it once
    before the first forward of a run so the first window does not all-reduce early.
    ``process_group`` names the data-parallel group when accumfn cannot find it (a plain
    module whose gradients accumfn should average itself, or an FSDP2 model over a mesh
    it cannot see); DDP's and FSDP2's own groups are found without it.
    """
    distributed.prepare(model, process_group, core.sync_next_forward(state))


@contextmanager
def micro_step_context(state: AccumState, model: nn.Module) -> Iterator[None]:
    """Explicit form: ``with micro_step_context(state, model): loss = model(x)``.

    Sets the sync flag for this forward from the state, like DDP's ``no_sync`` but only on
    micro-steps that do not close the window.
    """
    prepare_forward(state, model)
    yield


def _wide(state: AccumState, parallel: distributed.DataParallel) -> torch.dtype | None:
    """The accumulation dtype, if the state asks for one (refused under FSDP2)."""
    name = state.config.accum_dtype
    if name is None:
        return None
    if parallel.kind == "fsdp2":
        raise ConfigError(
            "accum_dtype is not for FSDP2, which accumulates an open window's gradients "
            "inside its own parameters: give fully_shard "
            "mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32) instead, which sums "
            "them in fp32 there, and drop accum_dtype."
        )
    return buffers.dtype_named(name)


def accumulate(
    state: AccumState,
    loss: torch.Tensor,
    model: nn.Module,
    *,
    is_final_batch: bool = False,
    num_items: int | torch.Tensor | None = None,
    scaler: GradScaler | None = None,
) -> tuple[AccumState, bool]:
    """Backward one micro-batch's loss; return (new state, whether the window closed).

    Mean mode (``num_items=None``): ``loss`` is a mean; it is divided by the window size.
    Item mode: ``loss`` is a sum over ``num_items`` items; gradients are divided by the
    window's item count over all ranks when the window closes. ``num_items`` is an int, or
    a 0-dim integer tensor on any device (``(labels != -100).sum()``), which is not read
    before the window's boundary: there the count is read once, with the exchange that
    decides the window under DDP/FSDP2 (a negative count raises ``ConfigError`` there).
    Ints and tensors may be mixed in a window. When ``stepped`` is True, call
    ``apply_step`` (``step_window(...).window_loss`` is the window's loss as the large
    batch computes it). The input state is never changed; on error nothing is run.
    ``scaler``: a GradScaler scales the loss; give the same one on every micro-batch of a
    window and to its step (a mismatch is a ConfigError, before anything runs).

    Under DDP/FSDP2 the ranks exchange one small header when a window closes (before its
    backward): a short final window is rescaled by its micro-steps over all ranks, and
    ranks that cannot close the window together raise ``RankMismatchError`` on every rank.
    """
    if not (type(loss) is torch.Tensor and loss.requires_grad and loss.ndim == 0):
        check_loss(loss)  # raises, saying what is wrong
    if scaler is not None:
        check_scaler(scaler)
        scaler = enabled(scaler)  # a disabled GradScaler leaves the loss as it is
    count = None
    if isinstance(num_items, torch.Tensor):
        count = tally.check_count(num_items)
        num_items = core.ON_DEVICE  # type: ignore[assignment]  # the core keeps the mode
    new_state, plan = core.micro_step(
        state, is_final_batch=is_final_batch, num_items=num_items, scaled=scaler is not None
    )
    parallel = distributed.strategy(model)
    guard = parallel.guard or guard_for(model, parallel, state.window)
    guard.check(state)  # a loop's zero_grad or step inside the window: refused before anything
    if scaler is not None and guard.scaler is not None:
        guard.check_scaler(state, scaler, "accumulate")  # not the window's GradScaler
    running = tally.extend(tally.open_tally(state), loss, count)
    items = None if not plan.boundary else tally.items_value(running, new_state.window_items)
    plain = parallel.kind == "plain"  # one process, no DDP/FSDP: no sync flag, no header
    wide = None if state.config.accum_dtype is None else _wide(state, parallel)
    totals = None
    counted = None  # the window's item count, when read here (one process)
    if plain and items is not None:
        counted = tally.read_items(items)  # the window's one read, before its backward
    if not plain:
        parallel.refuse_join()
        reduces = parallel.backward_reduces()
        if plan.boundary:
            totals, fallback, loss_sum = parallel.agree(
                new_state,
                final=is_final_batch,
                reduces=reduces,
                scaler=scaler,
                items=items,
                loss=_as_tensor(running.loss),
            )
        elif core.agree_at_open(state, plan.boundary):
            parallel.agree_open(new_state, scaler)
        parallel.set_backward_sync(plan.reduce_grads)
    scaled = loss / plan.loss_divisor if plan.loss_divisor != 1 else loss
    if scaler is not None:
        scaled = scaler.scale(scaled)
    try:
        if guard.hooked:  # post-accumulate-grad hooks: no optimizer may step inside
            guard.backward(scaled)
        else:
            torch.autograd.backward(scaled)
    except BaseException as exc:
        guard.failed()
        if not isinstance(exc, RuntimeError) or "a second time" not in str(exc):
            raise
        raise LossError(
            "this loss's graph was already used by a backward pass: accumulate runs backward "
            "itself (on the loss scaled for the window), so remove your loss.backward() call; "
            "the gradients it left are in .grad now (optimizer.zero_grad() clears them)."
        ) from exc
    if plain and wide is None:
        if plan.boundary:
            closed = _close_alone(new_state, running, counted)
            guard.closed(closed, scaler)
            return closed, True
        tally.attach(new_state, running)
        guard.note(new_state, scaler)
        return new_state, False
    parallel.backward_done()
    if wide is not None:
        buffers.stash_(buffers.stash_params(parallel.model), wide, keep=guard.keep)
    if not plan.boundary:
        guard.note(new_state, scaler)
        if not plain:
            parallel.set_forward_sync(core.sync_next_forward(new_state))
        tally.attach(new_state, running)
        return new_state, False
    if plain:  # (the step hands the buffers back)
        closed = _close_alone(new_state, running, counted)
    else:
        assert totals is not None  # (the boundary's exchange ran)
        closed = _close_together(new_state, parallel, totals, fallback, wide, loss_sum)
    guard.closed(closed, scaler)
    return closed, True


def _as_tensor(loss: torch.Tensor | float) -> torch.Tensor:
    return loss if isinstance(loss, torch.Tensor) else torch.tensor(loss, dtype=torch.float64)


def _close_alone(state: AccumState, running: tally.Tally, counted: int | None) -> AccumState:
    """Close a window of one process; its loss goes beside the closed state."""
    items = state.window_items if counted is None else counted
    closed = core.close_window(state, global_items=items)
    tally.attach(closed, tally.loss_of_window(running.loss, state, state.micro_step, items))
    return closed


def _close_together(
    state: AccumState,
    parallel: distributed.DataParallel,
    totals: core.WindowTotals,
    fallback: bool,
    wide: torch.dtype | None,
    loss_sum: torch.Tensor | None,
) -> AccumState:
    """Close the window as the ranks agreed: the fallback reduction when no backward
    reduced, then the rescale from the counts over all ranks; the window's loss over all
    ranks goes beside the closed state."""
    if fallback:
        parallel.mean_reduce_grads_(wide)
    closed = core.close_window(
        state,
        global_items=totals.items,
        global_micro_steps=totals.micro_steps,
        averaged_over=parallel.world,
    )
    if loss_sum is not None:
        loss = tally.loss_of_window(loss_sum, state, totals.micro_steps, totals.items)
        tally.attach(closed, loss)
    return closed


def flush(
    state: AccumState, model: nn.Module, *, scaler: GradScaler | None = None
) -> tuple[AccumState, bool]:
    """Close the open window after the last micro-batch; return (state, stepped).

    For loaders of unknown length (``IterableDataset``, streams), where
    ``is_final_batch`` cannot be known in advance: call it once after the loop, then
    ``apply_step`` when ``stepped``. The window is closed as a short one (N/k in mean mode,
    the global item count in item mode); under DDP accumfn averages its gradients. With no
    window open it returns ``(state, False)`` and changes nothing. Under data parallelism
    every rank must call it (one small all-reduce); ranks whose windows differ in being
    open raise ``RankMismatchError`` on every rank. FSDP2 keeps an open window's gradients
    to itself until a backward syncs, so there it needs ``sync_every_micro_step=True``.
    ``scaler``: the GradScaler the window's losses were scaled by (as given to
    ``accumulate``); under data parallelism the ranks compare its scale here, so a scaled
    window flushed without it is a ``ConfigError`` there, before anything runs.
    """
    if core.check_state(state).closed:
        raise CallOrderError(
            "the window is already closed: call apply_step(state, optimizer, model, ...) "
            "instead of flush."
        )
    check_scaler(scaler)
    scaler = enabled(scaler)
    parallel = distributed.strategy(model)
    core.check_flush_scaler(state, scaler is not None, ranks=parallel.world)
    reduced = parallel.kind == "plain" or (
        state.config.sync_every_micro_step and parallel.kind in ("ddp", "fsdp2")
    )
    guard = guard_for(model, parallel, state.window)
    guard.check(state)
    if scaler is not None:
        guard.check_scaler(state, scaler, "flush")  # not the window's GradScaler
    parallel.refuse_join()
    running = tally.open_tally(state)
    items = None if running is None else tally.items_value(running, state.window_items)
    loss = None if running is None else _as_tensor(running.loss)
    totals, fallback, loss_sum = parallel.agree(
        state, final=True, reduces=reduced, scaler=scaler, items=items, loss=loss
    )
    if totals.open == 0:
        return state, False
    if parallel.kind == "fsdp2" and fallback:
        raise ConfigError(
            "flush under FSDP2 needs sync_every_micro_step=True: FSDP2 keeps an open "
            "window's gradients unsharded inside its parameters until a backward syncs them, "
            "out of accumfn's reach. Build the state with sync_every_micro_step=True, or pass "
            "is_final_batch=True on the last micro-batch."
        )
    if loss_sum is None:  # ranks without a window open take part with a loss of 0
        loss_sum = torch.zeros((), dtype=torch.float64)
    wide = _wide(state, parallel)
    closed = _close_together(state, parallel, totals, fallback, wide, loss_sum)
    guard.closed(closed, scaler)
    return closed, True
