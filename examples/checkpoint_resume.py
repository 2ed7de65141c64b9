"""Train a small MLP with accumulation, checkpoint every k micro-steps, resume after a kill.

    python examples/checkpoint_resume.py [RUN_DIR] [--scenario plain|amp] [--every K]

Run it, kill it at any moment (even with SIGKILL, even while it saves), run the same command
again: it resumes from RUN_DIR/checkpoint.pt and writes RUN_DIR/final.pt, whose parameters
equal those of a run that was never interrupted, bit for bit. RUN_DIR defaults to
accumfn-checkpoint-resume-<scenario> in the system's temporary folder; delete it to start
over. Everything the next micro-step
depends on is in the checkpoint: model, optimizer, LR scheduler, the accumulator (its state,
the open window's gradients, the GradScaler), the position in the data and the RNG state
(dropout).

Scenarios: ``plain`` uses ``GradientAccumulator`` with an epoch schedule {0: 3, 1: 4}, clipping
and a StepLR; ``amp`` uses the functional API with a callable schedule, bf16 autocast and a
GradScaler whose scale overflows now and then (skipped windows).

To rehearse a preemption at an exact point, ``--kill-at M`` makes the run SIGKILL itself
right after micro-step M (before its checkpoint), and ``--kill-in-save M`` while saving the
checkpoint of micro-step M, between writing the temporary file and renaming it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.amp import GradScaler
from torch.nn import functional as F

import accumfn
from accumfn.checkpoint import capture, load_checkpoint, restore, save_checkpoint

SEED = 0
SAMPLES, BATCH, EPOCHS = 22, 2, 2  # 11 micro-batches per epoch, the last window is short
LOSS_WEIGHT = 100.0  # amp: large enough that the scaled grads overflow now and then (skips)


def schedule(effective_step: int) -> int:
    """Callable schedule of the ``amp`` scenario: windows of 2, then 3."""
    return 2 if effective_step < 3 else 3


def build(scenario: str) -> dict[str, Any]:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7)
    parts: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if scenario == "plain":
        parts["acc"] = accumfn.GradientAccumulator(
            optimizer, {0: 3, 1: 4}, max_grad_norm=0.5, scheduler=scheduler
        )
    else:
        parts["scaler"] = GradScaler("cpu", init_scale=2.0**120, growth_interval=1)
        parts["state"] = accumfn.init(schedule, max_grad_norm=1.0)
    return parts


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(SAMPLES, 8, generator=gen)
    return x, x.sum(dim=1, keepdim=True).sin()


def batch_order(epoch: int) -> list[torch.Tensor]:
    """A fixed shuffle per epoch, so the data position is just (epoch, batch index)."""
    gen = torch.Generator().manual_seed(SEED + 1 + epoch)
    return list(torch.randperm(SAMPLES, generator=gen).split(BATCH))


def say(line: str) -> None:
    print(line, flush=True)


def checkpoint(parts: dict[str, Any], micro_step: int, position: tuple[int, int]) -> dict[str, Any]:
    if "acc" in parts:
        accum = parts["acc"].state_dict()
    else:
        accum = capture(parts["state"], parts["optimizer"], parts["scaler"])
    return {
        "model": parts["model"].state_dict(),
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": parts["scheduler"].state_dict(),
        "accum": accum,
        "micro_step": micro_step,
        "position": list(position),
        "rng": torch.get_rng_state(),
    }


def resume(parts: dict[str, Any], ckpt: dict[str, Any]) -> None:
    parts["model"].load_state_dict(ckpt["model"])
    parts["optimizer"].load_state_dict(ckpt["optimizer"])
    parts["scheduler"].load_state_dict(ckpt["scheduler"])
    if "acc" in parts:
        parts["acc"].load_state_dict(ckpt["accum"])
    else:
        parts["state"] = restore(ckpt["accum"], parts["state"], parts["optimizer"], parts["scaler"])
    torch.set_rng_state(ckpt["rng"])


def micro_step(parts: dict[str, Any], x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
    model = parts["model"]
    if "acc" in parts:
        parts["acc"].accumulate(F.mse_loss(model(x), y), model, is_final_batch=last)
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.mse_loss(model(x).float(), y) * LOSS_WEIGHT
    state, stepped = accumfn.accumulate(
        parts["state"], loss, model, is_final_batch=last, scaler=parts["scaler"]
    )
    if stepped:
        state = accumfn.apply_step(
            state, parts["optimizer"], model, scaler=parts["scaler"], scheduler=parts["scheduler"]
        )
    parts["state"] = state


def new_epoch(parts: dict[str, Any]) -> None:
    if "acc" in parts:
        parts["acc"].reset_epoch()
    else:
        parts["state"] = accumfn.reset_epoch(parts["state"], parts["optimizer"], parts["model"])


def die(why: str) -> None:
    """SIGKILL this process: no cleanup, no flush of anything not yet written, as a preemption."""
    say(f"killed {why}")
    os.kill(os.getpid(), signal.SIGKILL)


def train(run_dir: Path, scenario: str, every: int, kill_at: int, kill_in_save: int) -> None:
    parts = build(scenario)
    path = run_dir / "checkpoint.pt"
    done, (start_epoch, start_batch) = 0, (0, 0)
    if path.exists():
        ckpt = load_checkpoint(path)
        resume(parts, ckpt)
        done, (start_epoch, start_batch) = ckpt["micro_step"], ckpt["position"]
        say(f"resumed at micro-step {done}")
        say(f"  from {path}")
    x, y = data()
    for epoch in range(start_epoch, EPOCHS):
        batches = batch_order(epoch)
        for index in range(start_batch if epoch == start_epoch else 0, len(batches)):
            rows = batches[index]
            micro_step(parts, x[rows], y[rows], last=index == len(batches) - 1)
            done += 1
            if done == kill_at:
                die(f"after micro-step {done}")
            if done % every:
                continue
            ckpt = checkpoint(parts, done, (epoch, index + 1))

            def crash(temp: Path, at: int = done) -> None:
                if at == kill_in_save:
                    die(f"saving micro-step {at}, {temp.name} written, not renamed")

            save_checkpoint(ckpt, path, before_replace=crash)
            say(f"micro-step {done} saved")
        new_epoch(parts)
    state = parts["acc"].state if "acc" in parts else parts["state"]
    final = {
        "params": parts["model"].state_dict(),
        "counters": [state.optimizer_steps, state.skipped_steps, state.total_micro_steps],
        "scale": parts["scaler"].get_scale() if "scaler" in parts else None,
    }
    save_checkpoint(final, run_dir / "final.pt")
    applied, skipped, micro_steps = final["counters"]
    say(
        f"done: {done} micro-steps; optimizer steps {applied}, skipped steps {skipped}, "
        f"micro-steps counted {micro_steps}; GradScaler scale {final['scale']}"
    )
    say(f"  final parameters and counters: {run_dir / 'final.pt'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir",
        type=Path,
        nargs="?",
        default=None,
        help="where checkpoint.pt and final.pt go (default: "
        f"{Path(tempfile.gettempdir()) / 'accumfn-checkpoint-resume-SCENARIO'})",
    )
    parser.add_argument(
        "--scenario",
        choices=["plain", "amp"],
        default="plain",
        help="plain: GradientAccumulator; amp: functional API with a GradScaler",
    )
    parser.add_argument("--every", type=int, default=1, help="checkpoint every K micro-steps")
    parser.add_argument(
        "--kill-at", type=int, default=-1, metavar="M", help="SIGKILL itself after micro-step M"
    )
    parser.add_argument(
        "--kill-in-save",
        type=int,
        default=-1,
        metavar="M",
        help="SIGKILL itself while saving the checkpoint of micro-step M",
    )
    args = parser.parse_args(argv)
    if args.run_dir is None:
        args.run_dir = Path(tempfile.gettempdir()) / f"accumfn-checkpoint-resume-{args.scenario}"
    torch.set_num_threads(1)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    train(args.run_dir, args.scenario, args.every, args.kill_at, args.kill_in_save)


if __name__ == "__main__":
    sys.exit(main())
