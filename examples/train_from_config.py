"""Train from config.yaml: its batch_size and gradient_accumulation_steps drive accumulation.

    python examples/train_from_config.py [--config examples/config.yaml] [--run-dir DIR]
                                         [--stop-after M] [--every K]

The script reads the ``training:`` section into an ``AccumulationConfig``, builds the
accumulator with ``GradientAccumulator.from_config`` and checkpoints every K micro-steps
(mid-window too) to DIR/checkpoint.pt. ``--stop-after M`` stops after micro-step M, as a
preemption would; the same command again resumes from the checkpoint and ends on the
parameters of a run that never stopped, bit for bit.

With no --run-dir it shows exactly that in a temporary directory: a run stopped in the middle
of a window, resumed from its checkpoint, against one uninterrupted run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from accumfn import AccumulationConfig, GradientAccumulator
from accumfn.checkpoint import load_checkpoint, save_checkpoint

HERE = Path(__file__).resolve().parent
MICRO_BATCHES, EPOCHS = 9, 2  # per epoch: with a window of 4, windows of 4, 4 and 1
DEFAULT_LR = 0.05  # used when the config sets no learning_rate


def dataset(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MICRO_BATCHES * batch_size, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


def micro_batches(epoch: int, batch_size: int) -> list[torch.Tensor]:
    """Sample indices of each micro-batch: a fixed shuffle per epoch, so resuming needs only
    (epoch, index)."""
    generator = torch.Generator().manual_seed(100 + epoch)
    return list(torch.randperm(MICRO_BATCHES * batch_size, generator=generator).split(batch_size))


def build(config: AccumulationConfig) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    lr = config.scaled_learning_rate or DEFAULT_LR
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return {
        "model": model,
        "optimizer": optimizer,
        "acc": GradientAccumulator.from_config(optimizer, config),
    }


def train(config: AccumulationConfig, run_dir: Path, every: int, stop_after: int | None) -> bool:
    """Train (resuming from run_dir/checkpoint.pt if there is one); True when it finished."""
    parts = build(config)
    model, acc = parts["model"], parts["acc"]
    path = run_dir / "checkpoint.pt"
    done, start = 0, (0, 0)
    if path.exists():
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        parts["optimizer"].load_state_dict(ckpt["optimizer"])
        acc.load_state_dict(ckpt["accum"])
        done, start = ckpt["micro_step"], tuple(ckpt["position"])
        held, window = acc.stats.current_accumulation, acc.accumulation_steps
        print(f"resumed at micro-step {done}, {held} of {window} micro-batches into a window")
    x, y = dataset(config.batch_size)
    for epoch in range(start[0], EPOCHS):
        batches = micro_batches(epoch, config.batch_size)
        for index in range(start[1] if epoch == start[0] else 0, len(batches)):
            rows = batches[index]
            last = index == len(batches) - 1
            window = acc.stats.current_accumulation + 1
            step = acc.effective_step  # this window's step, from 0
            loss = F.mse_loss(model(x[rows]), y[rows])
            done += 1
            if acc.accumulate(loss, model, is_final_batch=last):
                print(
                    f"epoch {epoch}, after {done} micro-steps: step {step} applied "
                    f"{window} micro-batch(es), {window * len(rows)} samples"
                )
            if done % every == 0 or done == stop_after:
                checkpoint = {
                    "model": model.state_dict(),
                    "optimizer": parts["optimizer"].state_dict(),
                    "accum": acc.state_dict(),
                    "micro_step": done,
                    "position": [epoch, index + 1],
                }
                save_checkpoint(checkpoint, path)
            if done == stop_after:
                print(
                    f"stopped after micro-step {done}, {acc.stats.current_accumulation} of "
                    f"{acc.accumulation_steps} micro-batches into a window"
                )
                return False
        acc.reset_epoch()
        start = (epoch + 1, 0)
    save_checkpoint(
        {"model": model.state_dict(), "stats": acc.stats.optimizer_steps}, run_dir / "final.pt"
    )
    print(f"done: {done} micro-steps, {acc.stats.optimizer_steps} optimizer steps")
    return True


def show(config: AccumulationConfig, source: Path) -> None:
    """Stop mid-window, resume, and compare with a run that never stopped."""
    with tempfile.TemporaryDirectory() as directory:
        stopped, straight = Path(directory, "stopped"), Path(directory, "straight")
        stopped.mkdir()
        straight.mkdir()
        stop = config.steps_at(0) + 2 if config.steps_at(0) > 2 else 1
        print(f"-- a run stopped after micro-step {stop}")
        train(config, stopped, every=3, stop_after=stop)
        print("-- the same run started again: it resumes from its checkpoint")
        train(config, stopped, every=3, stop_after=None)
        print("-- a run that never stops")
        train(config, straight, every=10**9, stop_after=None)
        resumed = load_checkpoint(stopped / "final.pt")["model"]
        reference = load_checkpoint(straight / "final.pt")["model"]
    equal = all(torch.equal(resumed[name], reference[name]) for name in reference)
    print(
        f"{source}: resumed run {'equals' if equal else 'DIFFERS from'} the uninterrupted "
        f"run bit for bit"
    )
    if not equal:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "config.yaml")
    parser.add_argument(
        "--run-dir", type=Path, help="checkpoint here (default: a demo in a temp dir)"
    )
    parser.add_argument("--stop-after", type=int, metavar="M", help="stop after micro-step M")
    parser.add_argument("--every", type=int, default=3, metavar="K", help="checkpoint every K")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = AccumulationConfig.from_yaml(args.config)
    lr = config.scaled_learning_rate or DEFAULT_LR
    steps = config.gradient_accumulation_steps
    print(f"{args.config}: batch_size {config.batch_size}, gradient_accumulation_steps {steps}")
    print(f"learning rate {lr:g}" + ("" if config.learning_rate else " (no learning_rate set)"))
    if args.run_dir is None:
        show(config, args.config)
        return
    args.run_dir.mkdir(parents=True, exist_ok=True)
    train(config, args.run_dir, args.every, args.stop_after)


if __name__ == "__main__":
    main()
