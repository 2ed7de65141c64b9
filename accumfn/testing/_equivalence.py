"""Run a model accumulated and as one large batch per window, and compare the two."""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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

__all__ = [
    "EquivalenceReport",
    "TensorDiff",
    "assert_equivalent",
    "plan_windows",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Grads = dict[str, torch.Tensor | None]
"""Gradients by parameter name; None where a parameter has no gradient."""

NOISE_FLOOR = 1e-2
"""A tensor's scale is never taken below this fraction of the largest scale of its kind
that window (gradients: the largest reference gradient entry of the model): a gradient that
is zero in exact arithmetic (a key bias under softmax) holds only rounding noise."""


@attrs.frozen
class TensorDiff:
    """How far one tensor of the accumulated run is from the large-batch run."""

    name: str
    kind: str
    """``"gradient"`` (pre-clip, as the step receives it), ``"buffer"`` or ``"parameter"``
    (after the step)."""
    max_abs: float
    """Largest absolute difference over all windows."""
    max_rel: float
    """Largest difference over all windows as a fraction of the tensor's scale: its largest
    reference entry (for a parameter: of its update in that window); see
    ``assert_equivalent`` for the tolerance."""
    first_window: int | None
    """First window (0-based) after which it was outside the tolerance; None if never."""
    rank: int | None = None
    """The rank whose tensor this is (``world_size`` > 1 or a wrapped model); else None."""

    @property
    def checked(self) -> bool:
        """Every tensor decides the verdict (gradients, buffers and parameters)."""
        return True

    @property
    def diverged(self) -> bool:
        return self.first_window is not None


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
    skipped: tuple[int, ...] = ()
    """Windows (0-based) without any item (``num_items`` 0 on every micro-batch of every
    rank): both runs skipped their step, as accumfn does; their gradients are not compared."""
    step_mismatches: tuple[str, ...] = ()
    """Windows one run stepped and the other skipped, said in words."""

    @property
    def max_abs(self) -> float:
        """Largest absolute difference of a gradient (before clipping) or buffer."""
        return max((t.max_abs for t in self.tensors if t.kind != "parameter"), default=0.0)

    @property
    def max_rel(self) -> float:
        """Largest difference of a gradient or buffer relative to its tensor's scale."""
        return max((t.max_rel for t in self.tensors if t.kind != "parameter"), default=0.0)

    @property
    def max_param_abs(self) -> float:
        """Largest absolute parameter difference one optimizer step after identical weights."""
        return max((t.max_abs for t in self.tensors if t.kind == "parameter"), default=0.0)

    @property
    def diverged(self) -> tuple[TensorDiff, ...]:
        return tuple(t for t in self.tensors if t.diverged)

    @property
    def failed(self) -> bool:
        """Something diverged, or a window was stepped by one run and skipped by the other."""
        return bool(self.diverged or self.step_mismatches)

    def __str__(self) -> str:
        where = f" per rank on {self.world_size} ranks" if self.world_size > 1 else ""
        rows = [f"{len(self.windows)} window(s) of {list(self.windows)} micro-batches{where}"]
        if self.skipped:
            rows[0] += f"; skipped (no items): windows {list(self.skipped)}"
        width = max((len(_label(t)) for t in self.tensors), default=4)
        for t in self.tensors:
            flag = f"  DIVERGED after window {t.first_window}" if t.diverged else ""
            rows.append(
                f"  {_label(t):<{width}}  max abs {t.max_abs:.3e}  max rel {t.max_rel:.3e}{flag}"
            )
        rows += [f"  {mismatch}" for mismatch in self.step_mismatches]
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


def current_grads(model: nn.Module) -> Grads:
    """A copy of every parameter's gradient as it is now (None where there is none)."""
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }


def param_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def buffer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


@attrs.frozen
class WindowRecord:
    """One run after one window: whether it stepped, the gradients the step was handed
    (before clipping), and the parameters and buffers it reached."""

    applied: bool
    grads: Grads | None
    """The window's accumulated, normalized, unscaled gradients before clipping; None when
    the window was skipped (no items)."""
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


_SKIP_WARNING = re.escape("the window closed with num_items=0 on every micro-batch")


@contextmanager
def quiet_skips() -> Iterator[None]:
    """Silence accumfn's warning for a window without items: the check reports it itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SKIP_WARNING)
        yield


def reference_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    loss: torch.Tensor,
    total_items: int | None,
    max_grad_norm: float | None,
    got: WindowRecord,
) -> WindowRecord:
    """One large-batch window on ``model``; ``got`` is the accumulated run's record of it.

    The large batch's gradients (normalized as accumfn normalizes: by the mean-reduced loss,
    or divided by ``total_items``) are recorded before clipping. A window without items is
    skipped, as accumfn skips it: no backward of a 0/0, no step, no scheduler step. Else the
    step (clip, optimizer, scheduler) runs on the *accumulated* run's pre-clip gradients when
    it had them, so the parameters judge the step itself: the gradients were judged already,
    and Adam's ``m / (sqrt(v) + eps)`` would turn fp32 rounding in a near-zero gradient entry
    into a visible weight difference.
    """
    if total_items == 0:
        optimizer.zero_grad(set_to_none=True)
        return WindowRecord(False, None, param_values(model), buffer_values(model))
    torch.autograd.backward(loss / total_items if total_items is not None else loss)
    grads = current_grads(model)
    feed = got.grads if got.applied and got.grads is not None else grads
    for name, param in model.named_parameters():
        given = feed.get(name)
        param.grad = None if given is None else given.detach().clone().to(param.dtype)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return WindowRecord(True, grads, param_values(model), buffer_values(model))


def _finite_max(tensor: torch.Tensor) -> float:
    finite = tensor[torch.isfinite(tensor)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _judge(
    got: torch.Tensor,
    want: torch.Tensor,
    base: torch.Tensor,
    scale: float,
    rtol: float,
    atol: float,
    rounding: torch.Tensor | float = 0.0,
) -> tuple[float, float, bool]:
    """(max abs difference, max difference / scale, within the tolerance).

    Close where ``|got - want| <= rtol * |base| + atol * scale + rounding``; non-finite
    entries must match exactly (NaN with NaN). Integer tensors must be equal.
    """
    if not want.numel():
        return 0.0, 0.0, True
    if not (want.is_floating_point() or want.is_complex()):
        exact = float((got.double() - want.double()).abs().max())
        return exact, exact, exact == 0
    g, w = got.double(), want.double()
    diff = (g - w).abs()
    finite = torch.isfinite(w)
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    bound = rtol * base.double().abs() + atol * scale + rounding
    close = bool(torch.where(finite, diff <= bound, same).all())
    measured = torch.where(finite & torch.isfinite(g), diff, torch.zeros_like(diff))
    worst = float(measured.max())
    if not bool((finite & torch.isfinite(g) | same).all()):
        worst = float("inf")
    rel = worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))
    return worst, rel, close


def _dense(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


class Tracker:
    """Judges one run's windows against the other's and keeps the worst of each tensor."""

    def __init__(self, params: Mapping[str, torch.Tensor], buffers: Iterable[str]) -> None:
        self.kinds = {f"{name}.grad": "gradient" for name in params}
        self.kinds.update(dict.fromkeys(buffers, "buffer"))
        self.kinds.update(dict.fromkeys(params, "parameter"))
        self.max_abs = dict.fromkeys(self.kinds, 0.0)
        self.max_rel = dict.fromkeys(self.kinds, 0.0)
        self.first: dict[str, int | None] = dict.fromkeys(self.kinds)
        self.skipped: list[int] = []
        self.mismatches: list[str] = []

    def _note(self, name: str, window: int, result: tuple[float, float, bool]) -> None:
        diff, rel, close = result
        self.max_abs[name] = max(self.max_abs[name], diff)
        self.max_rel[name] = max(self.max_rel[name], rel)
        if not close and self.first[name] is None:
            self.first[name] = window

    def compare(
        self,
        window: int,
        got: WindowRecord,
        want: WindowRecord,
        before: Mapping[str, torch.Tensor],
        rtol: float,
        atol: float,
    ) -> None:
        """Judge ``got`` against ``want`` after ``window``; ``before``: the parameters both
        started the window from."""
        if got.applied != want.applied:
            self.mismatches.append(_step_mismatch(window, got.applied))
        elif not want.applied:
            self.skipped.append(window)
        if got.grads is not None and want.grads is not None:
            self._compare_grads(window, got.grads, want.grads, before, rtol, atol)
        for name, value in want.buffers.items():
            scale = _finite_max(value.double()) if value.is_floating_point() else 0.0
            self._note(name, window, _judge(got.buffers[name], value, value, scale, rtol, atol))
        updates = {name: want.params[name].double() - p.double() for name, p in before.items()}
        largest = max((_finite_max(u) for u in updates.values()), default=0.0)
        for name, update in updates.items():
            value = want.params[name]
            eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0
            scale = max(_finite_max(update), NOISE_FLOOR * largest)
            moved = got.params[name].double() - before[name].double()
            rounding = 2 * eps * value.double().abs()  # each side rounds the stored value
            self._note(name, window, _judge(moved, update, update, scale, rtol, atol, rounding))

    def _compare_grads(
        self,
        window: int,
        got: Grads,
        want: Grads,
        like: Mapping[str, torch.Tensor],
        rtol: float,
        atol: float,
    ) -> None:
        wanted = {name: _dense(want.get(name), p) for name, p in like.items()}
        largest = max((_finite_max(w.double()) for w in wanted.values()), default=0.0)
        for name, value in wanted.items():
            scale = max(_finite_max(value.double()), NOISE_FLOOR * largest)
            result = _judge(_dense(got.get(name), value), value, value, scale, rtol, atol)
            self._note(f"{name}.grad", window, result)

    def diffs(self, rank: int | None = None) -> tuple[TensorDiff, ...]:
        return tuple(
            TensorDiff(name, kind, self.max_abs[name], self.max_rel[name], self.first[name], rank)
            for name, kind in self.kinds.items()
        )


def _step_mismatch(window: int, accumulated_applied: bool) -> str:
    if accumulated_applied:
        return (
            f"window {window}: accumulated training stepped, but its large batch has no "
            f"items (num_items 0 on every micro-batch), so the large batch skips it as "
            f"accumfn does."
        )
    return (
        f"window {window}: accumulated training skipped its step (no update), but its large "
        f"batch has items and steps."
    )


def scale_factor(got: Grads, want: Grads) -> float | None:
    """``c`` when ``got`` is ``c`` times ``want`` (c != 1, residual below 1e-3), else None."""
    names = [n for n, w in want.items() if w is not None and got.get(n) is not None]
    if not names:
        return None
    have = torch.cat([_flat(got[n]) for n in names])
    wanted = torch.cat([_flat(want[n]) for n in names])
    norm = float(wanted.dot(wanted))
    if norm == 0 or not (torch.isfinite(have).all() and torch.isfinite(wanted).all()):
        return None
    scale = float(have.dot(wanted)) / norm
    residual = float((have - scale * wanted).norm()) / max(float(have.norm()), 1e-300)
    if residual > 1e-3 or abs(scale - 1) < 1e-3:
        return None
    return scale


def _flat(tensor: torch.Tensor | None) -> torch.Tensor:
    assert tensor is not None
    return tensor.detach().double().reshape(-1)


def scaled_culprit(
    first: int | None, got: Sequence[WindowRecord], want: Sequence[WindowRecord]
) -> list[str]:
    """One process: the accumulated gradients of the first diverged window, as a multiple."""
    if first is None or got[first].grads is None or want[first].grads is None:
        return []
    grads, wanted = got[first].grads, want[first].grads
    assert grads is not None and wanted is not None
    scale = scale_factor(grads, wanted)
    if scale is None:
        return []
    return [
        f"the accumulated gradients of window {first} are {scale:.4g} times the large "
        f"batch's (before clipping): the loss or the gradients are scaled on one side only "
        f"(a loss multiplied or divided by the window on the accumulated side, a sum-reduced "
        f"loss without num_items=..., a gradient hook)?"
    ]


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

TOLERANCE_RULE = (
    "|got - want| <= rtol*|want| + atol*scale, scale = the tensor's largest reference entry "
    "(a parameter: of its update), at least {floor:g} of the largest of the window"
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
    if not firsts:
        where = f" in its steps, of {len(report.windows)} windows (micro-batches: "
    elif report.world_size == 1 and None in firsts:
        where = f" after window {firsts[None]} of {len(report.windows)} (windows: "
    else:
        where = ": " + ", ".join(f"rank {rank} after window {window}" for rank, window in order)
        where += f", of {len(report.windows)} windows (micro-batches per rank: "
    lines = [
        f"accumulated training ({setup}) diverged from one large batch per window"
        f"{where}{list(report.windows)}).",
    ]
    if len({window for _, window in order}) > 1:
        lines[0] += (
            " A rank that goes wrong first puts the others out of step: start from the earliest."
        )
    lines += [f"  {mismatch}" for mismatch in report.step_mismatches]
    if diverged:
        rule = TOLERANCE_RULE.format(floor=NOISE_FLOOR)
        lines.append(
            f"Outside rtol={rtol:g}, atol={atol:g} ({rule}; gradients before clipping, "
            f"parameters after the step) ({len(diverged)} of {len(report.tensors)}):"
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


def check_tolerances(rtol: object, atol: object) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}.")
        if value >= 1:
            raise ConfigError(
                f"{name}={value!r} would let a gradient twice the large batch's pass: it is a "
                f"fraction of the tensor's own scale, use a value well below 1 (default 1e-05)."
            )


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
    atol: float = 1e-5,
    seed: int = 0,
    world_size: int = 1,
    wrap: str | Callable[[nn.Module], nn.Module] | None = None,
    timeout: float = 120.0,
) -> EquivalenceReport:
    """Check that accumulating ``batches`` equals training on one large batch per window.

    Two copies of ``make_model()`` with the same initial weights train side by side: one
    with accumfn over the micro-batches (``steps`` per window, short final window
    included), one on ``combine(window's micro-batches)`` per window. After every window
    three things are compared: the gradients each run's step was handed *before clipping*
    (accumulated, normalized and unscaled, as the large batch's own), every buffer, and the
    parameters after the step. The large-batch copy's step (clip, optimizer, scheduler) runs
    on the accumulated gradients, so the parameters judge the step and the gradients judge
    the accumulation; it then takes the accumulated run's weights, so every window starts
    from identical weights. A window whose micro-batches all have ``num_items`` 0 is skipped
    by both, as accumfn skips it (``report.skipped``).

    The tolerance scales with what is compared, so a gradient twice (or a hundredth of) the
    large batch's fails at any magnitude: an entry is close when ``|got - want| <=
    rtol * |want| + atol * scale``, where ``scale`` is the tensor's largest reference entry
    (a parameter's: the largest entry of its update), never below 1e-2 of the largest such
    scale of the model that window (a gradient zero in exact arithmetic holds only rounding
    noise); parameters also allow two roundings of their stored value. ``atol`` is thus a
    fraction, not an absolute figure. On a difference beyond it an AssertionError lists what
    diverged, by how much, and the likely causes found.

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
    window from each rank's weights, compares every rank's gradients, buffers and
    parameters window by window, and the failure names the rank, window and tensor that
    diverged (with causes such as gradients summed but not averaged over the ranks). Each
    rank runs one torch thread. ``timeout`` (seconds) bounds the whole check: a rank that
    hangs, raises or exits raises ``RankFailedError`` saying which rank and where it was,
    and no rank is left running. The ranks are new processes, so ``make_model``,
    ``make_optimizer``, ``loss_fn``, ``num_items``, ``make_scheduler``, ``wrap`` and
    ``steps`` must be picklable (defined with ``def`` at module level, not lambdas or local
    functions; ``functools.partial`` of such works) and ``batches`` must pickle; the module
    that defines them is imported again in each rank, so keep a script's work under
    ``if __name__ == "__main__":``.
    """
    micro_batches = list(batches)
    if not micro_batches:
        raise ConfigError("batches is empty: pass at least one micro-batch.")
    check_tolerances(rtol, atol)
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
    tracker = Tracker(param_values(large), buffer_values(large))
    records: list[tuple[WindowRecord, WindowRecord]] = []
    state = core.init(steps, max_grad_norm=max_grad_norm)
    seen: list[Grads] = []
    for number, window in enumerate(windows):
        seen.clear()
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
        with quiet_skips():
            applied = step_window(
                state,
                optimizers[0],
                accumulated,
                scheduler=schedulers[0],
                before_step=lambda _: seen.append(current_grads(accumulated)),
            )
        state = applied.state
        got = WindowRecord(
            applied.applied,
            seen[-1] if seen else None,
            param_values(accumulated),
            buffer_values(accumulated),
        )
        before = param_values(large)
        want = reference_window(
            large,
            optimizers[1],
            schedulers[1],
            loss_of(large, combine([micro_batches[i] for i in window])),
            sum(num_items(micro_batches[i]) for i in window) if num_items is not None else None,
            max_grad_norm,
            got,
        )
        tracker.compare(number, got, want, before, rtol, atol)
        records.append((got, want))
        # Each window starts from the same weights, so what is compared is that window.
        large.load_state_dict(accumulated.state_dict())
    sizes = [[batch_size(micro_batches[i]) for i in window] for window in windows]
    diffs = tracker.diffs()
    first = min(
        (t.first_window for t in diffs if t.kind == "gradient" and t.first_window is not None),
        default=None,
    )
    report = EquivalenceReport(
        windows=tuple(len(w) for w in windows),
        tensors=diffs,
        culprits=tuple(
            find_culprits(accumulated, sizes, item_mode=item_mode)
            + scaled_culprit(first, [g for g, _ in records], [w for _, w in records])
        ),
        skipped=tuple(tracker.skipped),
        step_mismatches=tuple(tracker.mismatches),
    )
    if report.failed:
        raise AssertionError(failure_message(report, f"steps={steps}", rtol, atol))
    return report
