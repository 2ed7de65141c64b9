"""Log one W&B row per optimizer step with MetricsTracker, and the same rows to JSONL.

W&B runs offline unless WANDB_MODE is set (e.g. WANDB_MODE=online to upload).

    python examples/metrics_wandb.py [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile

import torch
from torch import nn

from accumfn import GradientAccumulator, JsonlSink, MetricsTracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for metrics.jsonl and wandb/")
    parser.add_argument("--micro-batches", type=int, default=22)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="accumfn-metrics-")
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", out)
    jsonl = os.path.join(out, "metrics.jsonl")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    accumulator = GradientAccumulator(
        optimizer, args.window, max_grad_norm=1.0, batch_size=8, scheduler=scheduler
    )
    tracker = MetricsTracker(
        use_wandb=True,
        gradient_accumulation_steps=args.window,
        sinks=[JsonlSink(jsonl)],
        wandb_init={"project": "accumfn-example", "dir": out},
    )
    with tracker:
        for index in range(args.micro_batches):
            x = torch.randn(8, 8)
            step = accumulator.effective_step  # the window this micro-batch belongs to
            loss = model(x).pow(2).mean()
            tracker.log_scalar("train/loss", loss.detach(), step=step)  # window mean, read once
            lr = optimizer.param_groups[0]["lr"]  # the LR this window's step uses
            last = index == args.micro_batches - 1
            if accumulator.accumulate(loss, model, is_final_batch=last):
                tracker.log_scalar("train/grad_norm", accumulator.stats.last_grad_norm, step=step)
                tracker.log_scalar("train/lr", lr, step=step)

    with open(jsonl, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    for row in rows:
        print(json.dumps(row))
    run_dirs = sorted(glob.glob(os.path.join(out, "wandb", "*run-*")))
    print(
        f"OK: {args.micro_batches} micro-batches -> {len(rows)} rows at steps "
        f"{[row['_step'] for row in rows]}; JSONL {jsonl}; W&B ({os.environ['WANDB_MODE']}) "
        f"{run_dirs[-1]}"
    )


if __name__ == "__main__":
    main()
