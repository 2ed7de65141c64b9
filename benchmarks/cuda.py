"""``python -m benchmarks.cuda``: accumfn on a CUDA GPU, with no host-device sync inside a window.

1. Sync checks, on the small transformer of ``benchmarks/workloads.py`` (window 8): the
   non-boundary micro-steps of mean mode, of item mode with counts given as tensors (masks
   drawn on the GPU), and of AMP fp16 with a GradScaler and tensor counts, each keeping the
   window's loss, run under ``torch.cuda.set_sync_debug_mode("error")``: any sync raises.
   The hand loop runs first as the control (a sync there would be the model's own). Each
   window's boundary micro-step runs under ``"warn"``; its syncs are counted. The window
   losses are compared, at the end, with the large batch's loss over the same micro-batches
   (taken before the window's step).
2. Timing, wall clock per window on the GPU (``torch.cuda.synchronize`` around each
   window), the loops taking turns a window at a time in a rotating order on one model and
   optimizer: accumfn against the hand loop in mean mode, and in item mode against the hand
   loop that counts on the host every micro-step (``int(mask.sum())``) and the one that
   counts the whole window first (one read per window); ``hand_control`` is a second copy
   of the hand loop (the noise floor). Ratios are paired within each turn: median [min,
   max] over the turns.

Without CUDA it says so and exits 0. ``--device cpu`` runs everything but the sync debug
mode, to try the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import accumfn

from .workloads import WINDOW, workload

__all__ = ["main"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(inputs, targets, mask of the items the loss sums over) on the device."""
MicroStep = Callable[[int, Batch], "torch.Tensor | None"]
"""One micro-step (index in the window, batch); the window's loss when the window closed."""

NEEDS_CUDA = (
    "python -m benchmarks.cuda needs a CUDA GPU: torch.cuda.is_available() is False here "
    "(torch {torch}, CUDA build {cuda}). Nothing was run. (--device cpu runs the script "
    "without the sync checks.)"
)
KEEP = 0.7
"""Share of the items (tokens) a micro-batch's mask keeps, drawn per token on the device."""


def _batches(count: int, device: torch.device, seed: int) -> list[Batch]:
    spec = workload("transformer")
    generator = torch.Generator(device=device).manual_seed(seed)
    shape, items = spec.input_shape, spec.input_shape[:2]
    return [
        (
            torch.randn(shape, device=device, generator=generator),
            torch.randn(spec.output_shape, device=device, generator=generator),
            torch.rand(items, device=device, generator=generator) < KEEP,
        )
        for _ in range(count)
    ]


def _outputs(model: nn.Module, batch: Batch, fp16: bool) -> torch.Tensor:
    if not fp16:
        out: torch.Tensor = model(batch[0])
        return out
    with torch.autocast(batch[0].device.type, dtype=torch.float16):
        out = model(batch[0])
    return out.float()


def mean_loss(model: nn.Module, batch: Batch, fp16: bool = False) -> torch.Tensor:
    return nn.functional.mse_loss(_outputs(model, batch, fp16), batch[1])


def item_loss(model: nn.Module, batch: Batch, fp16: bool = False) -> torch.Tensor:
    """The summed squared error of the items the mask keeps (no boolean indexing: no sync)."""
    per_item = (_outputs(model, batch, fp16) - batch[1]).pow(2).mean(-1)
    return (per_item * batch[2]).sum()


@dataclass
class Loop:
    """A loop's micro-step on a shared model and optimizer."""

    name: str
    step: MicroStep
    item_mode: bool
    fp16: bool = False
    losses: list[torch.Tensor] = field(default_factory=list)


def _clip(model: nn.Module) -> None:
    clip = workload("transformer").max_grad_norm
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)


def hand_mean(model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
    """The hand loop: loss / N, backward, clip and step every N."""

    def step(index: int, batch: Batch) -> torch.Tensor | None:
        torch.autograd.backward(mean_loss(model, batch) / WINDOW)
        if index == WINDOW - 1:
            _clip(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return None

    return step


def hand_items_read(model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
    """Item mode by hand, counting on the host every micro-step (``int(mask.sum())``, one
    sync each); the summed gradients divided by the window's count at the boundary."""
    counted = [0]

    def step(index: int, batch: Batch) -> torch.Tensor | None:
        counted[0] += int(batch[2].sum())
        torch.autograd.backward(item_loss(model, batch))
        if index == WINDOW - 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / max(counted[0], 1))
            _clip(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counted[0] = 0
        return None

    return step


def hand_items_prefetch(model: nn.Module, optimizer: torch.optim.Optimizer) -> MicroStep:
    """Item mode by hand, counting the whole window first (one read per window, as
    torchtitan and HF Trainer do): it needs the window's batches in advance, so this loop
    is given them (``window``) before its first micro-step."""
    total = [1.0]
    window: list[Batch] = []

    def step(index: int, batch: Batch) -> torch.Tensor | None:
        if index == 0:
            total[0] = float(torch.stack([b[2].sum() for b in window]).sum())
        torch.autograd.backward(item_loss(model, batch) / total[0])
        if index == WINDOW - 1:
            _clip(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return None

    step.window = window  # type: ignore[attr-defined]
    return step


def accumfn_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    item_mode: bool,
    fp16: bool = False,
) -> MicroStep:
    """accumfn's functional API; counts as tensors in item mode; keeps the window's loss."""
    clip = workload("transformer").max_grad_norm
    state = accumfn.init(WINDOW, max_grad_norm=clip)
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type) if fp16 else None

    def step(index: int, batch: Batch) -> torch.Tensor | None:
        nonlocal state
        loss = (item_loss if item_mode else mean_loss)(model, batch, fp16)
        count = batch[2].sum() if item_mode else None
        state, stepped = accumfn.accumulate(state, loss, model, num_items=count, scaler=scaler)
        if not stepped:
            return None
        report = accumfn.step_window(state, optimizer, model, scaler=scaler)
        state = report.state
        return report.window_loss

    return step


@contextlib.contextmanager
def sync_debug(mode: str, device: torch.device) -> Iterator[list[str]]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (nothing on the CPU); yields
    the sync warnings issued under ``"warn"``."""
    caught: list[str] = []
    if device.type != "cuda":
        yield caught
        return
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(before)
    caught.extend(str(r.message) for r in records if "synchroniz" in str(r.message))


def _large_batch_loss(model: nn.Module, window: Sequence[Batch], loop: Loop) -> torch.Tensor:
    """The window's loss as one large batch (before the window's step), on the device."""
    with torch.no_grad():
        if not loop.item_mode:
            return torch.stack([mean_loss(model, b, loop.fp16) for b in window]).mean()
        summed = torch.stack([item_loss(model, b, loop.fp16) for b in window]).sum()
        return summed / torch.stack([b[2].sum() for b in window]).sum()


def check_syncs(device: torch.device, windows: int) -> list[dict[str, Any]]:
    """Run each loop's windows: non-boundary micro-steps under "error", boundaries under
    "warn"; the window losses against the large batch's."""
    spec = workload("transformer")
    rows = []
    setups: list[tuple[str, bool, bool, Callable[..., MicroStep]]] = [
        ("hand loop, mean mode (control)", False, False, hand_mean),
        ("accumfn, mean mode", False, False, lambda m, o: accumfn_step(m, o, item_mode=False)),
        (
            "accumfn, item mode, tensor counts",
            True,
            False,
            lambda m, o: accumfn_step(m, o, item_mode=True),
        ),
        (
            "accumfn, AMP fp16 + GradScaler, tensor counts",
            True,
            True,
            lambda m, o: accumfn_step(m, o, item_mode=True, fp16=True),
        ),
    ]
    for name, item_mode, fp16, build in setups:
        model = spec.model().to(device)
        optimizer = spec.make_optimizer(model)
        loop = Loop(name, build(model, optimizer), item_mode, fp16)
        data = _batches((windows + 1) * WINDOW, device, seed=1)
        for index, batch in enumerate(data[:WINDOW]):  # warm-up: CUDA, cuBLAS, optimizer state
            loop.step(index, batch)
        references: list[torch.Tensor] = []
        boundary_syncs: list[int] = []
        error = ""
        for w in range(windows):
            window = data[(w + 1) * WINDOW : (w + 2) * WINDOW]
            references.append(_large_batch_loss(model, window, loop))
            try:
                for index, batch in enumerate(window):
                    boundary = index == WINDOW - 1
                    with sync_debug("warn" if boundary else "error", device) as caught:
                        loss = loop.step(index, batch)
                    if boundary:
                        boundary_syncs.append(len(caught))
                        if loss is not None:
                            loop.losses.append(loss)
            except RuntimeError as exc:
                error = f"window {w}, micro-step {index}: {str(exc).splitlines()[0]}"
                break
        got = [float(loss) for loss in loop.losses]
        want = [float(loss) for loss in references[: len(got)]]
        errors = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want, strict=True)]
        rows.append(
            {
                "loop": name,
                "non_boundary_syncs": "raised: " + error if error else "0",
                "syncs_per_window": statistics.median(boundary_syncs) if boundary_syncs else None,
                "window_loss_rel_error": max(errors) if errors else None,
            }
        )
    return rows


def _order(names: Sequence[str], turn: int) -> list[str]:
    shift = turn % len(names)
    order = [*names[shift:], *names[:shift]]
    return order[::-1] if (turn // len(names)) % 2 else order


def time_loops(device: torch.device, turns: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per window of each loop, in turns; paired ratios against the hand loops."""
    spec = workload("transformer")
    model = spec.model().to(device)
    optimizer = spec.make_optimizer(model)
    steps: dict[str, MicroStep] = {
        "hand": hand_mean(model, optimizer),
        "hand_control": hand_mean(model, optimizer),
        "accumfn": accumfn_step(model, optimizer, item_mode=False),
        "hand_items_read": hand_items_read(model, optimizer),
        "hand_items_prefetch": hand_items_prefetch(model, optimizer),
        "accumfn_items": accumfn_step(model, optimizer, item_mode=True),
    }
    data = _batches(4 * WINDOW, device, seed=2)
    pool = [data[i * WINDOW : (i + 1) * WINDOW] for i in range(4)]
    seconds: dict[str, list[float]] = {name: [] for name in steps}

    def run(name: str, window: list[Batch]) -> float:
        step = steps[name]
        prefetched = getattr(step, "window", None)
        if prefetched is not None:
            prefetched[:] = window
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for index, batch in enumerate(window):
            step(index, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    names = list(steps)
    for turn in range(2):  # warm-up
        for name in names:
            run(name, pool[turn % 4])
    for turn in range(turns):
        for name in _order(names, turn):
            seconds[name].append(run(name, pool[turn % 4]))
    pairs = [
        ("hand_control", "hand"),
        ("accumfn", "hand"),
        ("accumfn_items", "hand_items_read"),
        ("accumfn_items", "hand_items_prefetch"),
        ("hand_items_prefetch", "hand_items_read"),
    ]
    result: dict[str, dict[str, list[float]]] = {
        name: {"ms_per_window": _spread([1e3 * s for s in values])}
        for name, values in seconds.items()
    }
    for a, b in pairs:
        ratios = [x / y for x, y in zip(seconds[a], seconds[b], strict=True)]
        result[f"{a} / {b}"] = {"ratio": _spread(ratios)}
    return result


def _spread(values: Sequence[float]) -> list[float]:
    """[median, min, max]."""
    return [statistics.median(values), min(values), max(values)]


def _print_checks(rows: Sequence[dict[str, Any]]) -> None:
    print("Host-device syncs (non-boundary micro-steps under set_sync_debug_mode('error'))")
    print(
        "| loop | non-boundary syncs | syncs per window (boundary, 'warn') "
        "| window loss vs large batch (max rel. error) |"
    )
    print("|---|---|---:|---:|")
    for row in rows:
        per_window = row["syncs_per_window"]
        error = row["window_loss_rel_error"]
        print(
            f"| {row['loop']} | {row['non_boundary_syncs']} | "
            f"{'-' if per_window is None else f'{per_window:g}'} | "
            f"{'-' if error is None else f'{error:.2e}'} |"
        )


def _print_timing(result: dict[str, dict[str, list[float]]], turns: int) -> None:
    print(
        f"\nTime per window of {WINDOW} micro-steps (wall clock, median [min, max] of "
        f"{turns} turns)"
    )
    print("| loop or pair | ms per window / ratio |")
    print("|---|---:|")
    for name, figures in result.items():
        key, unit = ("ms_per_window", " ms") if "ms_per_window" in figures else ("ratio", "")
        mid, low, high = figures[key]
        print(f"| {name} | {mid:.3f}{unit} [{low:.3f}, {high:.3f}] |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda", description=__doc__)
    parser.add_argument("--windows", type=int, default=4, help="windows per sync check")
    parser.add_argument("--turns", type=int, default=30, help="timed turns of every loop")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try it")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NEEDS_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {workload('transformer').title}\n")
    rows = check_syncs(device, args.windows)
    _print_checks(rows)
    timing = time_loops(device, args.turns)
    _print_timing(timing, args.turns)
    control_ok = rows[0]["non_boundary_syncs"] == "0"
    failed = [row["loop"] for row in rows[1:] if row["non_boundary_syncs"] != "0"]
    if failed and control_ok:
        print(f"\nFAILED: a non-boundary micro-step synced in: {', '.join(failed)}")
        return 1
    if not control_ok:
        print("\nThe hand loop itself synced: the model, not accumfn, syncs on this machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
