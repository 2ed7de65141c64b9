"""Wall time of ``assert_equivalent(..., world_size=2)`` on a small model (DDP and FSDP2).

The check spawns its ranks, so most of its time is starting two Python processes that
import torch, and the first ``DistributedDataParallel`` or ``fully_shard`` in each, which
imports ``torch._dynamo``; the training itself takes milliseconds. Printed beside it: the
same check on one process, and the time two spawned processes take to start, import accumfn
and join a gloo group (what any spawned check pays).

Run: python -m benchmarks.distributed_check [--repeats 3] [--micro-batches 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from accumfn.testing import assert_equivalent
from accumfn.testing._spawn import connect, run_ranks

__all__ = ["main"]


def make_model() -> nn.Module:
    """836 parameters: 8 -> 64 -> 4 with a Tanh."""
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _join_only(rank: int, world: int, port: int, workdir: str, timeout: float) -> None:
    import torch.distributed as dist

    connect(rank, world, port, timeout)
    dist.destroy_process_group()


def _median_s(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=16, help="over both ranks")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g))
        for _ in range(args.micro_batches)
    ]

    def check(**kwargs: object) -> Callable[[], object]:
        return lambda: assert_equivalent(
            make_model, make_optimizer, batches, steps=args.steps, max_grad_norm=1.0, **kwargs
        )

    def spawn_only() -> None:
        with tempfile.TemporaryDirectory() as workdir:
            run_ranks(_join_only, 2, workdir, 120.0, ())

    rows = {
        "one process": check(),
        "2 ranks, wrap='ddp'": check(world_size=2, wrap="ddp"),
        "2 ranks, wrap='fsdp2'": check(world_size=2, wrap="fsdp2"),
        "spawn 2 ranks + join gloo, nothing else": spawn_only,
    }
    print(
        f"{sum(p.numel() for p in make_model().parameters())} parameters, "
        f"{args.micro_batches} micro-batches of 8, window {args.steps}, "
        f"median of {args.repeats}, {torch.get_num_threads()} torch threads in the parent"
    )
    for name, run in rows.items():
        print(f"  {name:<42} {_median_s(run, args.repeats):6.2f} s")


if __name__ == "__main__":
    main()
