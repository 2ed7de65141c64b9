"""``assert_equivalent(..., world_size=W, wrap=...)``: the accumulated side on W gloo ranks.

Rank ``r`` trains micro-batches ``r, r + W, r + 2W, ...`` (strided, as ``DistributedSampler``
deals samples), so window ``w`` of every rank together is a run of consecutive
micro-batches, and the large batch of that window is all of them. The parent process then
trains, for each rank, one large batch per window from that rank's weights and compares.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import core
from ..errors import ConfigError
from ..step import LRScheduler
from ._batches import batch_size
from ._culprits import find_culprits
from ._equivalence import (
    NO_CULPRIT_HINT,
    EquivalenceReport,
    Grads,
    LossFn,
    TensorDiff,
    Tracker,
    WindowRecord,
    buffer_values,
    failure_message,
    loss_or_default,
    param_values,
    plan_windows,
    reference_window,
    scale_factor,
)
from ._ranks import WRAPS, RankJob, Wrap, describe, load_weights, rank_main
from ._spawn import run_ranks

__all__ = ["check_distributed", "validate_distributed"]

_DISTRIBUTED_HINT = (
    f"{NO_CULPRIT_HINT} Under data parallelism also check the wrapper: every rank must start "
    f"from the same weights and hand its optimizer the gradients averaged (not summed) over "
    f"the ranks."
)


def validate_distributed(world_size: object, wrap: object, timeout: object) -> None:
    """Refuse settings the distributed check cannot run with, before anything starts."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(
            f"world_size must be an int >= 1 (the number of ranks to run), got {world_size!r}."
        )
    if wrap is None and world_size > 1:
        raise ConfigError(
            f"world_size={world_size} needs wrap=: 'ddp', 'fsdp2', or a function that wraps "
            f"the model it is given (e.g. functools.partial(DistributedDataParallel, "
            f"find_unused_parameters=True)) and returns it."
        )
    if wrap is not None and not (wrap in WRAPS or callable(wrap)):
        raise ConfigError(
            f"wrap must be 'ddp', 'fsdp2' or a function model -> wrapped model, got {wrap!r}."
        )
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigError(
            f"timeout must be a finite number of seconds > 0, got {timeout!r}; it bounds the "
            f"whole distributed check, a hang included."
        )


def _check_picklable(**named: object) -> None:
    for name, value in named.items():
        if value is None:
            continue
        try:
            pickle.dumps(value)
        except Exception as exc:  # what pickle raises varies: PicklingError, AttributeError...
            raise ConfigError(
                f"{name}={value!r} cannot be sent to the ranks ({type(exc).__name__}: {exc}). "
                f"The ranks are new processes (spawn), so {name} must be picklable: define it "
                f"with def at module level, not as a lambda or a function inside another "
                f"function (functools.partial of a module-level function also works)."
            ) from None


def _save_job(job: RankJob, workdir: str) -> None:
    try:
        torch.save(job, Path(workdir) / "job.pt")
    except Exception as exc:
        raise ConfigError(
            f"the batches cannot be sent to the ranks ({type(exc).__name__}: {exc}); use "
            f"tensors, or tuples, lists and dicts of tensors and plain Python values."
        ) from None


def check_distributed(
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    micro_batches: list[Any],
    steps: core.StepsSpec,
    *,
    loss_fn: LossFn | None,
    num_items: Callable[[Any], int] | None,
    max_grad_norm: float | None,
    make_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None,
    combine: Callable[[Sequence[Any]], Any],
    rtol: float,
    atol: float,
    seed: int,
    world_size: int,
    wrap: Wrap,
    timeout: float,
) -> EquivalenceReport:
    """The distributed form of ``assert_equivalent`` (see there)."""
    world = world_size
    if len(micro_batches) % world:
        raise ConfigError(
            f"{len(micro_batches)} micro-batches cannot be dealt evenly to world_size={world} "
            f"ranks: every rank needs the same number (as DistributedSampler with "
            f"drop_last=True gives them); pass a multiple of {world}."
        )
    item_mode = num_items is not None
    loss_of = loss_or_default(loss_fn, item_mode)
    _check_picklable(
        make_model=make_model,
        make_optimizer=make_optimizer,
        loss_fn=loss_of,
        num_items=num_items,
        make_scheduler=make_scheduler,
        wrap=wrap,
        steps=steps,
    )
    torch.manual_seed(seed)
    reference = make_model()
    initial = {
        name: t.detach().clone()
        for name, t in [*reference.named_parameters(), *reference.named_buffers()]
    }
    windows = plan_windows(steps, len(micro_batches) // world)
    job = RankJob(
        make_model=make_model,
        make_optimizer=make_optimizer,
        make_scheduler=make_scheduler,
        loss_fn=loss_of,
        num_items=num_items,
        wrap=wrap,
        steps=steps,
        max_grad_norm=max_grad_norm,
        seed=seed,
        initial=initial,
        shards=[micro_batches[rank::world] for rank in range(world)],
    )
    with tempfile.TemporaryDirectory(prefix="accumfn-check-") as workdir:
        _save_job(job, workdir)
        run_ranks(rank_main, world, workdir, timeout, ())
        records: list[list[WindowRecord]] = [
            torch.load(Path(workdir) / f"rank{rank}.pt", weights_only=False)
            for rank in range(world)
        ]

    def large_batch(window: list[int]) -> list[Any]:
        return [micro_batches[local * world + rank] for local in window for rank in range(world)]

    large = [combine(large_batch(window)) for window in windows]
    items = (
        [sum(num_items(b) for b in large_batch(window)) for window in windows]
        if num_items is not None
        else None
    )
    tensors: list[TensorDiff] = []
    wanted: list[list[WindowRecord]] = []
    skipped: list[int] = []
    mismatches: list[str] = []
    for rank, rank_records in enumerate(records):
        if len(rank_records) != len(windows):
            raise AssertionError(
                f"rank {rank} closed {len(rank_records)} windows, the plan for "
                f"{len(micro_batches) // world} micro-batches per rank at steps={steps} has "
                f"{len(windows)}."
            )
        twin = make_model()
        if twin is reference:
            raise ConfigError(
                "make_model returned the same module twice: it must build a new model on each "
                "call, the weights are copied across."
            )
        tracker, want = _compare_rank(job, twin, rank_records, large, items, rtol, atol)
        tensors += tracker.diffs(rank)
        wanted.append(want)
        skipped = tracker.skipped
        mismatches += [f"rank {rank} {mismatch}" for mismatch in tracker.mismatches]
    sizes = [[batch_size(b) for b in large_batch(window)] for window in windows]
    report = EquivalenceReport(
        windows=tuple(len(w) for w in windows),
        tensors=tuple(tensors),
        culprits=tuple(
            find_culprits(reference, sizes, item_mode=item_mode)
            + _rank_culprits(report_tensors=tensors, records=records, wanted=wanted)
        ),
        world_size=world,
        skipped=tuple(skipped),
        step_mismatches=tuple(mismatches),
    )
    if report.failed:
        setup = f"steps={steps}, {world} ranks, wrap={describe(wrap)}"
        raise AssertionError(failure_message(report, setup, rtol, atol, _DISTRIBUTED_HINT))
    return report


def _compare_rank(
    job: RankJob,
    twin: nn.Module,
    records: Sequence[WindowRecord],
    large: Sequence[Any],
    items: Sequence[int] | None,
    rtol: float,
    atol: float,
) -> tuple[Tracker, list[WindowRecord]]:
    """Train ``twin`` one large batch per window from a rank's weights and compare.

    Returns the judgement and the large batch's record of each window.
    """
    load_weights(twin, job.initial)
    optimizer = job.make_optimizer(twin)
    scheduler = job.make_scheduler(optimizer) if job.make_scheduler is not None else None
    tracker = Tracker(param_values(twin), buffer_values(twin))
    wanted = []
    for number, (batch, record) in enumerate(zip(large, records, strict=True)):
        total = items[number] if items is not None else None
        before = param_values(twin)
        loss = job.loss_fn(twin, batch)
        want = reference_window(twin, optimizer, scheduler, loss, total, job.max_grad_norm, record)
        wanted.append(want)
        tracker.compare(number, record, want, before, rtol, atol)
        # the next window starts from this rank's weights (see assert_equivalent)
        load_weights(twin, {**record.params, **record.buffers})
    return tracker, wanted


def _gap(got: Grads, want: Grads) -> float | None:
    """Largest difference of ``got`` from ``want`` as a fraction of ``want``'s largest entry,
    or None when within 1e-4 of it (the ranks hand their steps the same gradients)."""
    scale = gap = 0.0
    for name, wanted in want.items():
        have = got.get(name)
        if (have is None) != (wanted is None):
            return float("inf")
        if have is None or wanted is None or not wanted.numel():
            continue
        scale = max(scale, float(wanted.double().abs().max()))
        gap = max(gap, float((have.double() - wanted.double()).abs().max()))
    if gap <= 1e-4 * scale:
        return None
    return gap / scale if scale > 0 else float("inf")


def _disagreeing_ranks(records: Sequence[Sequence[WindowRecord]]) -> list[str]:
    """The first window where a rank used other gradients than rank 0, as a culprit."""
    for window, first in enumerate(records[0]):
        for rank in range(1, len(records)):
            other = records[rank][window].grads
            if first.grads is None or other is None:
                continue
            gap = _gap(other, first.grads)
            if gap is None:
                continue
            return [
                f"the ranks hand their optimizers different gradients (window {window}: rank 0 "
                f"and rank {rank} differ by up to {gap:.3g} of their largest entry): the "
                f"gradients are not averaged over the ranks. Wrap the model with "
                f"DistributedDataParallel or fully_shard, or all-reduce every gradient and "
                f"divide it by the world size, once per window."
            ]
    return []


def _scaled_ranks(
    first: dict[int, int],
    records: Sequence[Sequence[WindowRecord]],
    wanted: Sequence[Sequence[WindowRecord]],
) -> list[str]:
    """Ranks whose gradients in their first diverged window are a multiple of the large batch's."""
    found: list[str] = []
    world = len(records)
    for rank, window in sorted(first.items()):
        got, want = records[rank][window].grads, wanted[rank][window].grads
        scale = None if got is None or want is None else scale_factor(got, want)
        if scale is None:
            continue
        why = (
            f"summed over the {world} ranks and not divided by the world size?"
            if abs(scale - world) < 1e-3 * world
            else "divided by the world size twice?"
            if abs(scale * world - 1) < 1e-3
            else "scaled on the way (a comm hook, a loss or gradient multiplier)?"
        )
        found.append(
            f"rank {rank}'s gradients in window {window} are {scale:.4g} times the large "
            f"batch's (before clipping): {why}"
        )
    return found


def _rank_culprits(
    report_tensors: Sequence[TensorDiff],
    records: Sequence[Sequence[WindowRecord]],
    wanted: Sequence[Sequence[WindowRecord]],
) -> list[str]:
    """Ranks whose gradients differ from each other, or are a multiple of the large batch's."""
    first: dict[int, int] = {}
    for t in report_tensors:
        if t.kind == "gradient" and t.diverged and t.rank is not None:
            assert t.first_window is not None
            first[t.rank] = min(first.get(t.rank, t.first_window), t.first_window)
    if not first:
        return []
    return _disagreeing_ranks(records) + _scaled_ranks(first, records, wanted)
