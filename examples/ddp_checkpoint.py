"""Checkpoint a DDP run three ways and resume each exactly (docs/checkpoints.md).

    torchrun --standalone --nproc_per_node 2 examples/ddp_checkpoint.py [RUN_DIR]

Runs on CPU (gloo); ``python examples/ddp_checkpoint.py`` runs it as a job of one process.
Every rank trains the same model on micro-batches of its own, windows of 3 (the last one, of
2, closed by ``is_final_batch``), and checkpoints it:

1. rank 0 saves at a window boundary, every rank loads that file;
2. every rank saves its own file inside a window;
3. ``torch.distributed.checkpoint`` (DCP) inside a window.

A new run on every rank loads each checkpoint and trains to the end; its parameters must
equal those of the run that never stopped, bit for bit. The files go to RUN_DIR (by default
``accumfn-ddp-checkpoint`` in the temporary folder).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn.checkpoint import distributed_state, load_checkpoint, save_checkpoint

STEPS = 3
MICRO_BATCHES = 8  # per rank: windows of 3, 3 and 2
Batch = tuple[torch.Tensor, torch.Tensor]


def rank_batches(rank: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(4, 8, generator=generator), torch.randn(4, 1, generator=generator))
        for _ in range(MICRO_BATCHES)
    ]


def build() -> tuple[nn.Module, torch.optim.Optimizer, accumfn.GradientAccumulator]:
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accumulator = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=1.0)
    accumulator.prepare(model)  # the first forward must already know not to sync
    return model, optimizer, accumulator


def train(
    model: nn.Module,
    accumulator: accumfn.GradientAccumulator,
    data: list[Batch],
    start: int,
    stop: int,
) -> bool:
    """Micro-batches ``start`` to ``stop - 1``; whether the last one closed a window."""
    stepped = False
    for i in range(start, stop):
        x, y = data[i]
        loss = F.mse_loss(model(x), y)
        stepped = accumulator.accumulate(loss, model, is_final_batch=i == len(data) - 1)
    return stepped


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def rank0_at_a_boundary(folder: Path, data: list[Batch], reference: nn.Module) -> bool:
    model, optimizer, accumulator = build()
    stepped = train(model, accumulator, data, 0, STEPS)  # the first window closes
    path = folder / "ckpt.pt"
    if stepped and dist.get_rank() == 0:  # at a boundary
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "accum": accumulator.state_dict(),
            },
            path,
        )
    dist.barrier()  # the file is written before any rank reads it

    model, optimizer, accumulator = build()  # a new run, on every rank
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    accumulator.load_state_dict(ckpt["accum"])
    train(model, accumulator, data, STEPS, len(data))
    return same(model, reference)


def every_rank_inside_a_window(folder: Path, data: list[Batch], reference: nn.Module) -> bool:
    model, optimizer, accumulator = build()
    stop = STEPS + 1  # one micro-batch into the second window
    train(model, accumulator, data, 0, stop)
    path = folder / f"ckpt-rank{dist.get_rank()}.pt"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "accum": accumulator.state_dict(),
        },
        path,
    )

    model, optimizer, accumulator = build()
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    accumulator.load_state_dict(ckpt["accum"])
    train(model, accumulator, data, stop, len(data))
    return same(model, reference)


def dcp_inside_a_window(folder: Path, data: list[Batch], reference: nn.Module) -> bool:
    model, optimizer, accumulator = build()
    stop = STEPS + 1
    train(model, accumulator, data, 0, stop)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_sd, "optim": optim_sd, "accum": distributed_state(accumulator, model)},
        checkpoint_id=folder / "dcp",
    )

    model, optimizer, accumulator = build()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "accum": distributed_state(accumulator, model)}
    dcp.load(state, checkpoint_id=folder / "dcp")
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    train(model, accumulator, data, stop, len(data))
    return same(model, reference)


def main() -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29512")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    default = Path(tempfile.gettempdir()) / "accumfn-ddp-checkpoint"
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    folder.mkdir(parents=True, exist_ok=True)

    data = rank_batches(rank)
    reference, _, accumulator = build()
    train(reference, accumulator, data, 0, len(data))  # the run that never stops
    results = {
        "1. rank 0's file, saved at a window boundary, loaded by every rank": rank0_at_a_boundary,
        "2. a file per rank, saved inside a window": every_rank_inside_a_window,
        "3. torch.distributed.checkpoint, inside a window": dcp_inside_a_window,
    }
    failed = 0
    for name, pattern in results.items():
        equal = pattern(folder, data, reference)
        failed += not equal
        if rank == 0:
            verdict = "equals" if equal else "DIFFERS from"
            print(f"{name}: the resumed run {verdict} the uninterrupted run bit for bit")
    if rank == 0:
        print(f"{dist.get_world_size()} rank(s), checkpoints in {folder}")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
