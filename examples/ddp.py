"""Gradient accumulation under DDP, token-normalized, with one all-reduce round per window.

Run: torchrun --nproc_per_node 2 examples/ddp.py   (CPU, gloo; plain ``python`` runs 1 rank)

Each rank trains on its own ragged, masked token batches. The loss is a SUM over tokens and
``num_items`` their count; at each window's end accumfn divides by the tokens of the window
on all ranks, so every update equals one large batch of all ranks' data (checked below
against a single-process twin). DDP all-reduces only on the last micro-batch of a window;
the short last window is closed by ``is_final_batch`` with one explicit all-reduce.
"""

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import accumfn

VOCAB, WIDTH, LENGTH, IGNORE = 50, 32, 16, -100
STEPS, MICRO_BATCHES, BATCH = 4, 10, 4  # windows of 4, 4 and a short one of 2


def tiny_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Tanh(), nn.Linear(WIDTH, VOCAB))


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches: next-token labels, a random tail of each sequence masked."""
    generator = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=generator)
        lengths = torch.randint(2, LENGTH + 1, (BATCH, 1), generator=generator)
        labels = tokens[:, 1:].masked_fill(torch.arange(LENGTH) >= lengths, IGNORE)
        out.append((tokens[:, :-1], labels))
    return out


def summed_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def large_batch_twin(world: int) -> nn.Module:
    """The same training in one process: one step per window on all ranks' data at once."""
    twin = tiny_lm()
    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    data = [rank_batches(rank) for rank in range(world)]
    for start in range(0, MICRO_BATCHES, STEPS):
        window = [batch for batches in data for batch in batches[start : start + STEPS]]
        tokens, labels = (torch.cat(parts) for parts in zip(*window, strict=True))
        (summed_loss(twin, tokens, labels) / (labels != IGNORE).sum()).backward()
        nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return twin


def main() -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = DistributedDataParallel(tiny_lm())
    rounds: list[int] = []  # one entry per DDP all-reduce round (bucket 0 opens a round)

    # DDP checks these annotations at run time, so they are real objects (no __future__ import)
    def counting_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if bucket.index() == 0:
            rounds.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accumulator = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=1.0)
    accumulator.prepare(model)  # the first forward must already know not to sync

    batches = rank_batches(rank)
    for i, (tokens, labels) in enumerate(batches):
        step = accumulator.effective_step  # this window's step, from 0
        loss = summed_loss(model, tokens, labels)
        stepped = accumulator.accumulate(
            loss,
            model,
            is_final_batch=i == len(batches) - 1,
            num_items=int((labels != IGNORE).sum()),  # count on the host, before .to(device)
        )
        if stepped and rank == 0:
            print(f"step {step}: pre-clip grad norm {accumulator.stats.last_grad_norm:.3f}")

    twin = large_batch_twin(world)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(model.module.parameters(), twin.parameters(), strict=True)
    )
    assert diff < 1e-5, f"rank {rank}: differs from the large batch by {diff}"
    if rank == 0:
        stats = accumulator.stats
        print(
            f"DDP x{world}: {stats.optimizer_steps} optimizer steps from {stats.total_steps} "
            f"micro-batches per rank, {len(rounds)} DDP all-reduce rounds (the short last window "
            f"closes with one explicit all-reduce), max |param - large batch| = {diff:.1e}"
        )
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
