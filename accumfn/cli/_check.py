"""``accumfn check``: three checks that accumulation works here, under a given config.

1. gradients: the gradient each window steps with equals the gradient of one large batch
   made of the window's micro-batches (full windows and a short final one, every window
   size of the config), in float64, through ``accumfn.init/accumulate/apply_step``.
2. counters: ``GradientAccumulator.from_config`` follows the config after every micro-step:
   window per epoch, micro-steps in the window, optimizer steps, effective batch.
3. resume: a checkpoint saved mid-window (``save_checkpoint`` of ``state_dict()``) and
   restored in a fresh Python process ends on the parameters of an uninterrupted run,
   bit for bit.

``python -m accumfn.cli._check resume CHECKPOINT OUT`` is the fresh process of check 3.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accumulator import GradientAccumulator
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import AccumulationConfig, clipping_text
from ..core import init
from ..step import accumulate, apply_step, reset_epoch

__all__ = ["CheckResult", "check_command", "run_checks"]

FEATURES, OUTPUTS = 6, 3
TOLERANCE = 1e-10
"""Largest gradient difference accepted in float64 (summation order alone gives ~1e-16)."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    figure: str
    seconds: float


class _Failed(Exception):
    """A check found accumulation different from what it should be."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    hidden = nn.Linear(FEATURES, 16)
    return nn.Sequential(hidden, nn.Tanh(), nn.Linear(16, OUTPUTS)).double()


def _micro_batch(index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + index)
    x = torch.randn(batch_size, FEATURES, generator=generator, dtype=torch.float64)
    return x, torch.randn(batch_size, OUTPUTS, generator=generator, dtype=torch.float64)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _window(config: AccumulationConfig, epoch: int) -> int:
    """The window the config asks for in ``epoch``, by hand (not through the core)."""
    steps = config.schedule
    if isinstance(steps, int):
        return steps
    started = [size for start, size in sorted(steps.items()) if start <= epoch]
    return started[-1] if started else 1


def _epochs(config: AccumulationConfig) -> list[int]:
    """The epochs whose window differs from the one before, and epoch 0."""
    steps = config.schedule
    return [0] if isinstance(steps, int) else sorted({0, *steps})


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise _Failed(message)


# -- 1. gradients ---------------------------------------------------------------------------


def _large_batch_grads(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], max_norm: float | None
) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    torch.autograd.backward(_loss(model, (inputs, targets)))
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def check_gradients(config: AccumulationConfig) -> str:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepped_with: list[list[torch.Tensor]] = []

    def capture(*_: object) -> None:
        stepped_with.append([p.grad.clone() for p in model.parameters() if p.grad is not None])

    optimizer.register_step_pre_hook(capture)
    state = init(**config.init_kwargs())
    worst, sizes, index = 0.0, [], 0
    for epoch in _epochs(config):
        while state.epoch < epoch:
            state = reset_epoch(state, optimizer, model)
        window = _window(config, epoch)
        for size in (window, window - 1) if window > 1 else (1,):
            batches = [_micro_batch(index + i, config.batch_size) for i in range(size)]
            index += size
            expected = _large_batch_grads(copy.deepcopy(model), batches, config.max_grad_norm)
            for i, batch in enumerate(batches):
                last = i == size - 1
                state, stepped = accumulate(
                    state, _loss(model, batch), model, is_final_batch=last and size < window
                )
                _expect(
                    stepped == last,
                    f"epoch {epoch}: the window of {size} closed after {i + 1} micro-batches",
                )
            state = apply_step(state, optimizer, model)
            pairs = zip(stepped_with.pop(), expected, strict=True)
            worst = max(worst, *((got - want).abs().max().item() for got, want in pairs))
            sizes.append(size)
    _expect(
        worst <= TOLERANCE,
        f"windows of {_sizes(sizes)}: max |accumulated - large batch| = {worst:.3g} "
        f"> tolerance {TOLERANCE:g}",
    )
    return (
        f"{_plural(len(sizes), 'window')} of {_sizes(sizes)} micro-batches "
        f"({config.batch_size} samples each), each equal to one large batch: max |difference| "
        f"{worst:.2g} (float64, tolerance {TOLERANCE:g})"
    )


def _sizes(sizes: Sequence[int]) -> str:
    """``"4, 4 and 3"``."""
    words = [str(size) for size in sizes]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


# -- 2. counters ----------------------------------------------------------------------------


def check_counters(config: AccumulationConfig) -> str:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer_steps = 0

    def count(*_: object) -> None:
        nonlocal optimizer_steps
        optimizer_steps += 1

    optimizer.register_step_post_hook(count)
    acc = GradientAccumulator.from_config(optimizer, config)
    epochs = max(_epochs(config)) + 2
    per_epoch = 2 * max(_window(config, e) for e in range(epochs)) + 1
    expected_steps = total = 0
    for epoch in range(epochs):
        if epoch:
            acc.reset_epoch()
        window = _window(config, epoch)
        batch = config.batch_size * window
        _expect(
            (acc.accumulation_steps, acc.effective_batch_size) == (window, batch),
            f"epoch {epoch}: window {acc.accumulation_steps}, effective batch "
            f"{acc.effective_batch_size}; the config says {window} and {batch}",
        )
        for i in range(per_epoch):
            last = i == per_epoch - 1
            stepped = acc.accumulate(
                _loss(model, _micro_batch(total, config.batch_size)), model, is_final_batch=last
            )
            in_window = i % window + 1
            closes = in_window == window or last
            total += 1
            expected_steps += closes
            stats = acc.stats
            seen = (stepped, stats.current_accumulation, stats.total_steps, stats.optimizer_steps)
            wanted = (closes, 0 if closes else in_window, total, expected_steps)
            _expect(
                seen == wanted and optimizer_steps == expected_steps,
                f"epoch {epoch}, after {i + 1} micro-batches: (stepped, in window, micro-steps, "
                f"optimizer steps) = {seen}, optimizer.step() ran {optimizer_steps} times; "
                f"expected {wanted}",
            )
    _expect(acc.effective_step == expected_steps, f"effective_step {acc.effective_step}")
    phases = ", ".join(
        f"{_split(per_epoch, window)} in {_span(list(group))}"
        for window, group in itertools.groupby(range(epochs), lambda e: _window(config, e))
    )
    return (
        f"{epochs} epochs x {per_epoch} micro-batches of {config.batch_size}, windows "
        f"{phases}: {expected_steps} optimizer steps; window, micro-step, step and "
        f"effective-batch counters as the config says after each of {total} micro-steps"
    )


def _split(micro_batches: int, window: int) -> str:
    """``"4+4+1"``: the windows ``micro_batches`` make, the last one short."""
    full, rest = divmod(micro_batches, window)
    return "+".join([str(window)] * full + ([str(rest)] if rest else []))


def _span(epochs: list[int]) -> str:
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


# -- 3. resume in a fresh process -----------------------------------------------------------


def _training(config: AccumulationConfig, epoch: int = 0) -> dict[str, Any]:
    """Model, AdamW, StepLR and accumulator, the accumulator moved on to ``epoch``."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    acc = GradientAccumulator.from_config(optimizer, config, scheduler=scheduler)
    for _ in range(epoch):
        acc.reset_epoch()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "acc": acc}


def _train(parts: dict[str, Any], config: AccumulationConfig, start: int, stop: int) -> None:
    for index in range(start, stop):
        batch = _micro_batch(index, config.batch_size)
        parts["acc"].accumulate(_loss(parts["model"], batch), parts["model"])


def resume(checkpoint: Path, out: Path) -> None:
    """The fresh process: restore ``checkpoint``, train to its end, save the parameters."""
    saved = load_checkpoint(checkpoint)
    config = AccumulationConfig(**saved["config"])
    parts = _training(config)
    for name in ("model", "optimizer", "scheduler"):
        parts[name].load_state_dict(saved[name])
    parts["acc"].load_state_dict(saved["accum"])
    _train(parts, config, saved["position"], saved["end"])
    save_checkpoint([p.detach() for p in parts["model"].parameters()], out)


def _fresh_process(checkpoint: Path, out: Path) -> None:
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "accumfn.cli._check", "resume", str(checkpoint), str(out)],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    _expect(done.returncode == 0, f"the fresh process failed: {done.stderr.strip()[-600:]}")


def check_resume(config: AccumulationConfig) -> str:
    epoch = next((e for e in _epochs(config) if _window(config, e) > 1), 0)
    window = _window(config, epoch)
    end = 3 * window
    stop = window + max(1, window // 2) if window > 1 else 1
    uninterrupted, interrupted = _training(config, epoch), _training(config, epoch)
    _train(uninterrupted, config, 0, end)
    _train(interrupted, config, 0, stop)
    in_window = interrupted["acc"].stats.current_accumulation
    _expect(window == 1 or in_window > 0, f"micro-step {stop} is not inside a window")
    with tempfile.TemporaryDirectory(prefix="accumfn-check-") as directory:
        checkpoint, out = Path(directory, "mid_window.pt"), Path(directory, "resumed.pt")
        save_checkpoint(
            {
                **{name: interrupted[name].state_dict() for name in ("model", "optimizer")},
                "scheduler": interrupted["scheduler"].state_dict(),
                "accum": interrupted["acc"].state_dict(),
                "config": dataclasses.asdict(config),
                "position": stop,
                "end": end,
            },
            checkpoint,
        )
        _fresh_process(checkpoint, out)
        resumed = load_checkpoint(out)
    expected = [p.detach() for p in uninterrupted["model"].parameters()]
    worst = max((r - e).abs().max().item() for r, e in zip(resumed, expected, strict=True))
    where = f"{in_window} of {window} in the window" if window > 1 else "window 1"
    where += f", epoch {epoch}" if epoch else ""
    _expect(
        all(torch.equal(r, e) for r, e in zip(resumed, expected, strict=True)),
        f"resumed at micro-step {stop} ({where}): max |resumed - uninterrupted| = {worst:.3g}",
    )
    return (
        f"checkpoint at micro-step {stop} ({where}) restored in a fresh process, trained to "
        f"micro-step {end}: parameters equal the uninterrupted run bit for bit"
    )


# -- the command ----------------------------------------------------------------------------

CHECKS: dict[str, Callable[[AccumulationConfig], str]] = {
    "gradients": check_gradients,
    "counters": check_counters,
    "resume": check_resume,
}


def run_checks(config: AccumulationConfig) -> Iterator[CheckResult]:
    """Run each check; a failure or an error is a failed check, never an exception."""
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            figure, passed = check(config), True
        except Exception as exc:
            figure = str(exc) if isinstance(exc, _Failed) else f"{type(exc).__name__}: {exc}"
            passed = False
        yield CheckResult(name, passed, figure, time.perf_counter() - started)


def describe(config: AccumulationConfig) -> str:
    steps = config.schedule
    clipping = f"; clipping {clipping_text(config.max_grad_norm)}"
    if isinstance(steps, dict):
        return (
            f"batch_size {config.batch_size}, gradient_accumulation_steps {steps} by epoch"
            f"{clipping}"
        )
    return (
        f"batch_size {config.batch_size} x gradient_accumulation_steps {steps} = effective "
        f"batch {config.effective_batch_size}{clipping}"
    )


def check_command(path: str | None, section: str = "training", ignore: Sequence[str] = ()) -> int:
    """``accumfn check [--config PATH]``: the seed's config by default.

    The file is read by ``AccumulationConfig.from_yaml(path, section, ignore=ignore)``, as
    ``accumfn plan --config`` and the user's training script read it.
    """
    if path is None:
        return main(AccumulationConfig(gradient_accumulation_steps=4, batch_size=8), "default")
    config = AccumulationConfig.from_yaml(path, section, ignore=ignore)
    return main(config, f"{path} [{section or 'whole file'}]")


def main(config: AccumulationConfig, source: str) -> int:
    """Print each check's PASS/FAIL line with its figure; 0 only if all pass."""
    started = time.perf_counter()
    print(f"accumfn check: {source}: {describe(config)}", flush=True)
    passed = 0
    for result in run_checks(config):
        passed += result.passed
        verdict = "PASS" if result.passed else "FAIL"
        print(f"{verdict}  {result.name:<9}  {result.figure} ({result.seconds:.1f} s)", flush=True)
    seconds = time.perf_counter() - started
    print(
        f"{passed} of {len(CHECKS)} checks passed in {seconds:.1f} s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, CPU)"
    )
    return 0 if passed == len(CHECKS) else 1


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "resume":
        sys.exit("usage: python -m accumfn.cli._check resume CHECKPOINT OUT")
    resume(Path(sys.argv[2]), Path(sys.argv[3]))
