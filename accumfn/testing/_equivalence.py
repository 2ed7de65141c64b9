"""Run a model accumulated and as one large batch per window, and compare the weights."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..errors import ConfigError
from ..step import LRScheduler, accumulate, step_window
from ._batches import batch_size, concat_batches
from ._culprits import find_culprits

__all__ = ["EquivalenceReport", "TensorDiff", "assert_equivalent", "plan_windows"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@attrs.frozen
class TensorDiff:
    """How far one tensor of the accumulated run is from the large-batch run."""

    name: str
    kind: str
    """``"gradient"`` (handed to the optimizer), ``"buffer"`` or ``"parameter"``."""
    max_abs: float
    """Largest absolute difference over all windows."""
    max_rel: float
    """Largest difference relative to the large-batch value over all windows."""
    first_window: int | None
    """First window (0-based) after which it was outside the tolerance; None if never."""
    rank: int | None = None
    """The rank whose tensor this is (``world_size`` > 1 or a wrapped model); else None."""

    @property
    def checked(self) -> bool:
        """Gradients and buffers decide the verdict; parameters are reported only."""
        return self.kind != "parameter"

    @property
    def diverged(self) -> bool:
        return self.checked and self.first_window is not None


@attrs.frozen
class EquivalenceReport:
    """What ``assert_equivalent`` compared, and how close the two runs stayed."""

    windows: tuple[int, ...]
    """Micro-batches in each window (the last may be short)."""
    tensors: tuple[TensorDiff, ...]
    culprits: tuple[str, ...]
    """Known causes of divergence found in the model and data."""
    world_size: int = 1
    """Ranks the accumulated side ran on (``windows`` then counts each rank's micro-batches)."""

    @property
    def max_abs(self) -> float:
        """Largest absolute difference of a checked tensor (gradient or buffer)."""
        return max((t.max_abs for t in self.tensors if t.checked), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((t.max_rel for t in self.tensors if t.checked), default=0.0)

    @property
    def max_param_abs(self) -> float:
        """Largest absolute parameter difference one optimizer step after identical weights."""
        return max((t.max_abs for t in self.tensors if not t.checked), default=0.0)

    @property
    def diverged(self) -> tuple[TensorDiff, ...]:
        return tuple(t for t in self.tensors if t.diverged)

    def __str__(self) -> str:
        where = f" per rank on {self.world_size} ranks" if self.world_size > 1 else ""
        rows = [f"{len(self.windows)} window(s) of {list(self.windows)} micro-batches{where}"]
        width = max((len(_label(t)) for t in self.tensors), default=4)
        for t in self.tensors:
            flag = f"  DIVERGED after window {t.first_window}" if t.diverged else ""
            rows.append(
                f"  {_label(t):<{width}}  max abs {t.max_abs:.3e}  max rel {t.max_rel:.3e}{flag}"
            )
        return "\n".join(rows)


def _label(diff: TensorDiff) -> str:
    return diff.name if diff.rank is None else f"rank {diff.rank} {diff.name}"


def plan_windows(steps: core.StepsSpec, count: int) -> list[list[int]]:
    """Indices of ``count`` micro-batches grouped into windows as the core closes them.

    The last micro-batch closes the last window (``is_final_batch``), so it may be short.
    """
    state = core.init(steps)
    windows: list[list[int]] = []
    current: list[int] = []
    for index in range(count):
        state, plan = core.micro_step(state, is_final_batch=index == count - 1)
        current.append(index)
        if plan.boundary:
            state = core.finish_step(core.close_window(state), applied=True)
            windows.append(current)
            current = []
    return windows


def default_loss(model: nn.Module, batch: Any, reduction: str = "mean") -> torch.Tensor:
    """``(inputs, target)`` batches: cross-entropy for integer targets, else MSE."""
    inputs, target = batch
    output = model(inputs)
    if target.dtype.is_floating_point:
        return F.mse_loss(output, target, reduction=reduction)
    return F.cross_entropy(output, target, reduction=reduction)


def loss_or_default(loss_fn: LossFn | None, item_mode: bool) -> LossFn:
    """The user's loss, or the default (a module-level partial, so spawned ranks get it)."""
    if loss_fn is not None:
        return loss_fn
    return functools.partial(default_loss, reduction="sum" if item_mode else "mean")


def applied_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients the optimizer is about to use (zeros where a parameter has none)."""
    return {
        name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }


def state_tensors(
    model: nn.Module, grads: dict[str, torch.Tensor]
) -> dict[str, tuple[str, torch.Tensor]]:
    found = {f"{name}.grad": ("gradient", g) for name, g in grads.items()}
    found.update({name: ("buffer", b) for name, b in model.named_buffers()})
    found.update({name: ("parameter", p.detach()) for name, p in model.named_parameters()})
    return found


def _difference(
    got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float
) -> tuple[float, float, bool]:
    if not (got.is_floating_point() or got.is_complex()):
        exact = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
        return exact, exact, exact == 0
    if not got.numel():
        return 0.0, 0.0, True
    diff = (got.double() - want.double()).abs()
    reference = want.double().abs()
    rel = diff / reference.clamp_min(torch.finfo(torch.float64).tiny)
    close = bool(torch.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True).all())
    return float(diff.max()), float(rel.max()), close


class Tracker:
    def __init__(self, names: Iterable[tuple[str, str]]) -> None:
        self.kinds = dict(names)
        self.max_abs = dict.fromkeys(self.kinds, 0.0)
        self.max_rel = dict.fromkeys(self.kinds, 0.0)
        self.first: dict[str, int | None] = dict.fromkeys(self.kinds)

    def compare(
        self,
        got: dict[str, tuple[str, torch.Tensor]],
        want: dict[str, tuple[str, torch.Tensor]],
        window: int,
        rtol: float,
        atol: float,
    ) -> None:
        reference = want
        for name, (_, tensor) in got.items():
            diff, rel, close = _difference(tensor, reference[name][1], rtol, atol)
            self.max_abs[name] = max(self.max_abs[name], diff)
            self.max_rel[name] = max(self.max_rel[name], rel)
            if not close and self.first[name] is None:
                self.first[name] = window

    def diffs(self, rank: int | None = None) -> tuple[TensorDiff, ...]:
        return tuple(
            TensorDiff(name, kind, self.max_abs[name], self.max_rel[name], self.first[name], rank)
            for name, kind in self.kinds.items()
        )


def _twin_models(make_model: Callable[[], nn.Module], seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    accumulated = make_model()
    large = make_model()
    if large is accumulated:
        raise ConfigError(
            "make_model returned the same module twice: it must build a new model on each call "
            "(e.g. make_model=lambda: MyModel()), the weights are copied across."
        )
    large.load_state_dict(accumulated.state_dict())
    return accumulated, large


NO_CULPRIT_HINT = (
    "No known cause found in the model. Check that the loss is a mean over the "
    "micro-batch (or a sum with num_items=...), that nothing else changes the weights "
    "or gradients between micro-batches, and that the model is deterministic."
)


def failure_message(
    report: EquivalenceReport, setup: str, rtol: float, atol: float, hint: str = NO_CULPRIT_HINT
) -> str:
    """What diverged (by rank, when there are ranks), from which window, and why."""
    diverged = report.diverged
    firsts: dict[int | None, int] = {}
    for t in diverged:
        assert t.first_window is not None
        firsts[t.rank] = min(firsts.get(t.rank, t.first_window), t.first_window)
    order = sorted(firsts.items(), key=lambda item: (item[1], item[0] or 0))
    if report.world_size == 1 and None in firsts:
        where = f" after window {firsts[None]} of {len(report.windows)} (windows: "
    else:
        where = ": " + ", ".join(f"rank {rank} after window {window}" for rank, window in order)
        where += f", of {len(report.windows)} windows (micro-batches per rank: "
    lines = [
        f"accumulated training ({setup}) diverged from one large batch per window"
        f"{where}{list(report.windows)}).",
        f"Outside rtol={rtol:g}, atol={atol:g} ({len(diverged)} of {len(report.tensors)}):",
    ]
    if len({window for _, window in order}) > 1:
        lines[0] += (
            " A rank that goes wrong first puts the others out of step: start from the earliest."
        )
    lines += [
        f"  {'' if t.rank is None else f'rank {t.rank} '}{t.kind} {t.name}: "
        f"max abs {t.max_abs:.3e}, max rel {t.max_rel:.3e} (from window {t.first_window})"
        for t in diverged
    ]
    if report.culprits:
        lines.append("Likely causes found:")
        lines += [f"  - {culprit}" for culprit in report.culprits]
    else:
        lines.append(hint)
    return "\n".join(lines)


def assert_equivalent(
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Iterable[Any],
    steps: core.StepsSpec = 2,
    *,
    loss_fn: LossFn | None = None,
    num_items: Callable[[Any], int] | None = None,
    max_grad_norm: float | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
    combine: Callable[[Sequence[Any]], Any] = concat_batches,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
    world_size: int = 1,
    wrap: str | Callable[[nn.Module], nn.Module] | None = None,
    timeout: float = 120.0,
) -> EquivalenceReport:
    """Check that accumulating ``batches`` equals training on one large batch per window.

    Two copies of ``make_model()`` with the same initial weights train side by side: one
    with accumfn over the micro-batches (``steps`` per window, short final window
    included), one on ``combine(window's micro-batches)`` per window. After every window
    the gradient each run hands its optimizer, and every buffer, are compared; on a
    difference beyond ``rtol``/``atol`` an AssertionError lists what diverged, by how much,
    and the likely causes found. The large-batch twin then takes the accumulated run's
    weights, so every window is checked from identical weights (parameter differences one
    step later are reported, not judged: Adam amplifies fp32 rounding near zero).

    ``loss_fn(model, batch)`` returns the loss: a mean, or with ``num_items`` (a function
    giving the items a micro-batch's loss sums over) a sum. The default takes
    ``(inputs, target)`` batches: cross-entropy for integer targets, else MSE.
    ``make_optimizer(model)`` builds the optimizer; ``make_scheduler(optimizer)`` an
    optional LR scheduler. Returns an ``EquivalenceReport`` when the runs agree.

    Distributed (``world_size`` ranks, ``wrap`` given): the accumulated side runs on
    ``world_size`` gloo ranks on the CPU, in processes spawned for the check and joined over
    127.0.0.1. ``wrap`` is ``"ddp"`` (``DistributedDataParallel(model)``), ``"fsdp2"``
    (``fully_shard`` on every submodule that owns parameters, then on the root) or a
    function that wraps the model it is given and returns it (called on each rank after the
    process group is up). Rank ``r`` takes micro-batches ``r, r + W, r + 2W, ...`` (strided,
    as ``DistributedSampler`` deals samples; ``len(batches)`` must be a multiple of ``W``),
    so window ``w`` closes over ``steps`` micro-batches per rank and its large batch is
    all ranks' micro-batches of that window. The parent then trains one large batch per
    window from each rank's weights, compares every rank's gradients and buffers window by
    window, and the failure names the rank, window and tensor that diverged (with causes
    such as gradients summed but not averaged over the ranks). Each rank runs one torch
    thread. ``timeout`` (seconds) bounds the whole check: a rank that hangs, raises or
    exits raises ``RankFailedError`` saying which rank and where it was, and no rank is
    left running. The ranks are new processes, so ``make_model``, ``make_optimizer``,
    ``loss_fn``, ``num_items``, ``make_scheduler``, ``wrap`` and ``steps`` must be
    picklable (defined with ``def`` at module level, not lambdas or local functions;
    ``functools.partial`` of such works) and ``batches`` must pickle; the module that
    defines them is imported again in each rank, so keep a script's work under
    ``if __name__ == "__main__":``.
    """
    micro_batches = list(batches)
    if not micro_batches:
        raise ConfigError("batches is empty: pass at least one micro-batch.")
    if wrap is not None or world_size != 1:
        from ._distributed_equivalence import check_distributed, validate_distributed

        validate_distributed(world_size, wrap, timeout)
        assert wrap is not None
        return check_distributed(
            make_model,
            make_optimizer,
            micro_batches,
            steps,
            loss_fn=loss_fn,
            num_items=num_items,
            max_grad_norm=max_grad_norm,
            make_scheduler=make_scheduler,
            combine=combine,
            rtol=rtol,
            atol=atol,
            seed=seed,
            world_size=world_size,
            wrap=wrap,
            timeout=timeout,
        )
    windows = plan_windows(steps, len(micro_batches))
    item_mode = num_items is not None
    loss_of = loss_or_default(loss_fn, item_mode)
    accumulated, large = _twin_models(make_model, seed)
    optimizers = make_optimizer(accumulated), make_optimizer(large)
    schedulers = (
        (make_scheduler(optimizers[0]), make_scheduler(optimizers[1]))
        if make_scheduler is not None
        else (None, None)
    )
    tracker = Tracker(
        (name, kind) for name, (kind, _) in state_tensors(large, applied_grads(large)).items()
    )
    applied: list[dict[str, torch.Tensor]] = []
    optimizers[0].register_step_pre_hook(lambda *_: applied.append(applied_grads(accumulated)))
    state = core.init(steps, max_grad_norm=max_grad_norm)
    for number, window in enumerate(windows):
        for index in window:
            batch = micro_batches[index]
            items = num_items(batch) if num_items is not None else None
            state, _ = accumulate(
                state,
                loss_of(accumulated, batch),
                accumulated,
                is_final_batch=index == len(micro_batches) - 1,
                num_items=items,
            )
        state = step_window(state, optimizers[0], accumulated, scheduler=schedulers[0]).state
        want = large_step(
            large,
            optimizers[1],
            schedulers[1],
            loss_of(large, combine([micro_batches[i] for i in window])),
            sum(num_items(micro_batches[i]) for i in window) if num_items is not None else None,
            max_grad_norm,
        )
        tracker.compare(
            state_tensors(accumulated, applied[-1]),
            state_tensors(large, want),
            number,
            rtol,
            atol,
        )
        # Each window starts from the same weights, so what is compared is that window's
        # update: Adam's m / (sqrt(v) + eps) turns fp32 rounding in a near-zero gradient
        # entry into a visible weight difference, which is not an accumulation error.
        large.load_state_dict(accumulated.state_dict())
    sizes = [[batch_size(micro_batches[i]) for i in window] for window in windows]
    report = EquivalenceReport(
        windows=tuple(len(w) for w in windows),
        tensors=tracker.diffs(),
        culprits=tuple(find_culprits(accumulated, sizes, item_mode=item_mode)),
    )
    if report.diverged:
        raise AssertionError(failure_message(report, f"steps={steps}", rtol, atol))
    return report


def large_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    loss: torch.Tensor,
    total_items: int | None,
    max_grad_norm: float | None,
) -> dict[str, torch.Tensor]:
    torch.autograd.backward(loss / total_items if total_items is not None else loss)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = applied_grads(model)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grads
