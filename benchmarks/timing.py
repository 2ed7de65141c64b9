"""Per-micro-step CPU time of several loops sharing one model and optimizer.

The loops take turns a window at a time, in an order that rotates from turn to turn
(balanced so that every loop runs after every other equally often), so drift in machine
load and in the model's state hits all loops alike. Each micro-step
is timed with ``time.thread_time`` (this thread's CPU time: another process taking the
core does not count). A repeat is ``windows`` consecutive turns of every loop; a loop's
figure in a repeat is its mean over those windows, and a comparison of two loops is the
difference (and ratio) of their figures within each repeat: the median of the repeats,
with their minimum and maximum. ``hand_control`` is a second copy of the hand loop: its
row against ``hand`` shows how far apart two identical loops come out (the noise floor).

Lightning runs its own loop (``Trainer.fit``); when it takes part, the other loops run
from a callback at its window boundaries, so the turns alternate the same way. Its
micro-step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (data loading
and the loop around them are left out, in Lightning's favour).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from .loops import MicroStep, MissingPackage, make_step
from .workloads import WINDOW, Batch, Workload

__all__ = ["compare", "time_windows"]

POOL = 4
"""Distinct windows of data; turn ``r`` uses window ``r % POOL``."""


def _order(names: Sequence[str], turn: int) -> list[str]:
    """The order of the loops in ``turn``: a rotation of a base order in which every loop
    follows every other equally often over the turns (a Williams design), so no loop
    always runs after the same one; reversed on odd turns when the count is odd."""
    count = len(names)
    base = [0]
    for step in range(1, count):
        base.append((step + 1) // 2 if step % 2 else count - step // 2)
    order = [names[(index + turn) % count] for index in base]
    return order[::-1] if count % 2 and (turn // count) % 2 else order


def _run_window(step: MicroStep, window: Sequence[Batch]) -> list[float]:
    clock = time.thread_time
    times = []
    for index, batch in enumerate(window):
        start = clock()
        step(index, batch, False)
        times.append(clock() - start)
    return times


def time_windows(
    workload: Workload,
    names: Sequence[str],
    *,
    repeats: int,
    target_s: float,
    warmup: int = 2,
    min_windows: int = 3,
    max_windows: int = 400,
) -> dict[str, Any]:
    """Thread-CPU seconds of every micro-step of each loop, and the settings used.

    ``windows`` per repeat is chosen so that one loop's repeat takes about ``target_s``.
    """
    model = workload.model()
    optimizer = workload.make_optimizer(model)
    steps: dict[str, MicroStep] = {}
    missing: dict[str, str] = {}
    for name in names:
        if name == "lightning":
            continue
        try:
            steps[name] = make_step(name, workload, model, optimizer)
        except MissingPackage as error:
            missing[name] = str(error)
    if "lightning" in names and importlib.util.find_spec("lightning") is None:
        missing["lightning"] = "lightning is not installed (pip install lightning)"
    active = [n for n in names if n not in missing]
    data = workload.batches(POOL * WINDOW)
    windows_of = [data[i * WINDOW : (i + 1) * WINDOW] for i in range(POOL)]
    hand = steps[active[0]]
    for turn in range(warmup):  # calibrate on the first loop; its warm-up too
        _run_window(hand, windows_of[turn % POOL])
    seconds = statistics.median(
        sum(_run_window(hand, windows_of[turn % POOL])) for turn in range(3)
    )
    windows = max(min_windows, min(max_windows, math.ceil(target_s / max(seconds, 1e-9))))
    turns = warmup + repeats * windows
    samples: dict[str, list[list[float]]] = {name: [] for name in active}

    def run(name: str, turn: int) -> None:
        samples[name].append(_run_window(steps[name], windows_of[turn % POOL]))

    with torch.enable_grad():
        if "lightning" not in active:
            for turn in range(turns):
                for name in _order(active, turn):
                    run(name, turn)
        else:
            _drive_lightning(workload, model, optimizer, active, turns, windows_of, run, samples)
    for series in samples.values():
        del series[:warmup]
    return {
        "windows": windows,
        "samples": samples,
        "missing": missing,
    }


def _drive_lightning(
    workload: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    turns: int,
    windows_of: Sequence[Sequence[Batch]],
    run: Callable[[str, int], None],
    samples: dict[str, list[list[float]]],
) -> None:
    """``Trainer(accumulate_grad_batches=WINDOW).fit`` over ``turns`` windows; the other
    loops take their turns from a callback, before and after Lightning's window."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            return workload.loss(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer

    class Turns(L.Callback):
        def __init__(self) -> None:
            self.start = 0.0
            self.window: list[float] = []

        def _others(self, turn: int, after: bool) -> None:
            order = _order(names, turn)
            mine = order.index("lightning")
            for name in order[mine + 1 :] if after else order[:mine]:
                run(name, turn)

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
            turn, index = divmod(i, WINDOW)
            if index == 0:
                self._others(turn, after=False)
            self.start = time.thread_time()

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, i: int
        ) -> None:
            self.window.append(time.thread_time() - self.start)
            if len(self.window) < WINDOW:
                return
            samples["lightning"].append(self.window)
            self.window = []
            # Lightning zeroes the gradients when a window opens, the others when it closes.
            optimizer.zero_grad(set_to_none=True)
            self._others(i // WINDOW, after=True)

    batches = [batch for turn in range(turns) for batch in windows_of[turn % len(windows_of)]]
    loader: Any = torch.utils.data.DataLoader(cast(Any, batches), batch_size=None)
    with _quiet(), tempfile.TemporaryDirectory(prefix="accumfn-bench-") as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            accumulate_grad_batches=WINDOW,
            gradient_clip_val=workload.max_grad_norm,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[Turns()],
            default_root_dir=root,
        )
        trainer.fit(Module(), loader)


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


KEYS = ("micro_step", "non_boundary", "boundary")


def _figures(window: Sequence[float]) -> dict[str, float]:
    """Microseconds: per micro-step, per non-boundary micro-step, the boundary micro-step."""
    return {
        "micro_step": 1e6 * sum(window) / len(window),
        "non_boundary": 1e6 * sum(window[:-1]) / (len(window) - 1),
        "boundary": 1e6 * window[-1],
    }


def _spread(values: Sequence[float]) -> list[float]:
    """[median, min, max]."""
    return [statistics.median(values), min(values), max(values)]


def _repeats(values: Sequence[float], per: int) -> list[float]:
    """The median of each repeat's ``per`` turns."""
    return [statistics.median(values[i : i + per]) for i in range(0, len(values), per)]


def compare(timed: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Per loop its figures, per pair ``(a, b)`` the paired differences a - b and ratios a / b.

    A repeat's figure is the median over its turns (a difference or ratio is taken within
    each turn, between windows run next to each other); every value reported is
    ``[median, min, max]`` of the repeats' figures, times in microseconds.
    """
    per = timed["windows"]
    figures = {name: [_figures(w) for w in ws] for name, ws in timed["samples"].items()}
    loops = {
        name: {key: _spread(_repeats([f[key] for f in fs], per)) for key in KEYS}
        for name, fs in figures.items()
    }
    compared: dict[str, Any] = {}
    for a, b in pairs:
        if a not in figures or b not in figures:
            continue
        turns = list(zip(figures[a], figures[b], strict=True))
        row = {
            f"{key}_diff_us": _spread(_repeats([x[key] - y[key] for x, y in turns], per))
            for key in KEYS
        }
        row["ratio"] = _spread(_repeats([x["micro_step"] / y["micro_step"] for x, y in turns], per))
        compared[f"{a}-{b}"] = row
    return {"loops": loops, "pairs": compared}
