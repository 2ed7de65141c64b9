"""Helpers for the distributed tests: spawn 2 gloo ranks, ragged token data, references.

Workers run in spawned processes, write their result with ``torch.save`` into a temporary
directory, and the parent test asserts on what they wrote.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from accumfn.testing import _spawn as spawn
from accumfn.testing._spawn import FINISHED, connect, report_progress

__all__ = [
    "Batch",
    "CollectiveCounter",
    "free_port",
    "make_windows",
    "reference_run",
    "run_ranks",
    "sharded_token_model",
    "token_loss",
    "token_model",
]

WORLD = 2
_GLOO_TIMEOUT_S = 60.0
"""How long a rank waits in a gloo collective before gloo raises."""
FEATURES, HIDDEN, CLASSES, SEQ = 8, 16, 5, 6

Batch = tuple[torch.Tensor, torch.Tensor]
"""(inputs of shape (b, SEQ, FEATURES), labels of shape (b, SEQ); -100 marks a masked item)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torchrun's --master_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    out: str,
    timeout: float,
    worker: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)
    connect(rank, world, port, _GLOO_TIMEOUT_S)
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        report_progress(out, rank, FINISHED)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def run_ranks(
    worker: Callable[..., Any], *args: Any, world: int = WORLD, timeout: float = 120.0
) -> list[Any]:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo ranks; return each rank's result.

    ``accumfn.testing``'s rank runner does the spawning: a rank that raises, dies or is
    still running after ``timeout`` seconds is a ``RankFailedError``, and none is left
    running.
    """
    with tempfile.TemporaryDirectory() as out:
        spawn.run_ranks(_entry, world, out, timeout, (worker, args))
        return [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(world)]


def token_model(seed: int = 0) -> nn.Module:
    """A per-token classifier: three linear layers over the last dimension."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, CLASSES),
    )


def token_loss(model: nn.Module, batch: Batch, reduction: str) -> torch.Tensor:
    """Cross-entropy over the unmasked items, ``"sum"`` or ``"mean"``."""
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(
        logits.reshape(-1, CLASSES), y.reshape(-1), ignore_index=-100, reduction=reduction
    )


def sharded_token_model(seed: int = 0) -> nn.Module:
    """``token_model(seed)`` with each linear layer and the root under FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    model = token_model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def items(batch: Batch) -> int:
    """How many labels of ``batch`` are not masked."""
    return int((batch[1] != -100).sum())


def token_batch(g: torch.Generator, micro_batch: int, ragged: bool) -> Batch:
    """One micro-batch of token sequences; with ``ragged`` every sequence masks a random
    tail of its labels (at least one label stays)."""
    x = torch.randn(micro_batch, SEQ, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (micro_batch, SEQ), generator=g)
    if ragged:
        keep = torch.randint(1, SEQ + 1, (micro_batch, 1), generator=g)
        y = y.masked_fill(torch.arange(SEQ) >= keep, -100)
    return x, y


def make_windows(
    seed: int, window_lengths: Sequence[int], micro_batch: int, ragged: bool, world: int = WORLD
) -> list[list[list[Batch]]]:
    """``data[w][m][r]``: micro-batch ``m`` of window ``w`` on rank ``r`` (``token_batch``)."""
    g = torch.Generator().manual_seed(seed)
    return [
        [[token_batch(g, micro_batch, ragged) for _ in range(world)] for _ in range(length)]
        for length in window_lengths
    ]


def reference_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[list[list[Batch]]],
    max_grad_norm: float | None = None,
) -> list[float]:
    """One large batch per window (all micro-batches of all ranks), token-mean loss.

    Returns the pre-clip gradient norm of each window.
    """
    norms = []
    for window in data:
        batches = [batch for ranks in window for batch in ranks]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        token_loss(model, (x, y), "mean").backward()
        params = list(model.parameters())
        if max_grad_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        norms.append(float(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Detached full copies of the parameters (gathers FSDP2 shards: call on every rank)."""
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


class CollectiveCounter:
    """Records, per window, the gradient collectives a run issues.

    ``hook`` is a DDP comm hook that records each bucket reduced and then all-reduces it like
    DDP's default. ``spy()`` wraps ``torch.distributed.all_reduce`` (and FSDP2's
    ``reduce_scatter_single``) so calls made outside the hook are recorded too; the real
    function always runs.
    """

    def __init__(self) -> None:
        self.window = 0
        self.buckets: list[tuple[int, int]] = []
        """(window, bucket index) per DDP bucket all-reduced by the hook."""
        self.all_reduces: list[tuple[int, str, int]] = []
        """(window, dtype, numel) per all_reduce outside the hook."""
        self.reduce_scatters: list[int] = []
        """window per reduce-scatter."""
        self.all_gathers: list[tuple[int, str, int]] = []
        """(window, dtype, numel per rank) per all_gather_single (accumfn's window header)."""
        self._in_hook = False

    def hook(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Any:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.buckets.append((self.window, bucket.index()))
        self._in_hook = True
        try:
            return default_hooks.allreduce_hook(group, bucket)
        finally:
            self._in_hook = False

    @contextmanager
    def spy(self) -> Iterator[None]:
        real_all_reduce = dist.all_reduce
        real_reduce_scatter = dist.reduce_scatter_single
        real_all_gather = dist.all_gather_single

        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self._in_hook:
                self.all_reduces.append((self.window, str(tensor.dtype), tensor.numel()))
            return real_all_reduce(tensor, *args, **kwargs)

        def reduce_scatter(*args: Any, **kwargs: Any) -> Any:
            self.reduce_scatters.append(self.window)
            return real_reduce_scatter(*args, **kwargs)

        def all_gather(
            output: torch.Tensor, tensor: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            self.all_gathers.append((self.window, str(tensor.dtype), tensor.numel()))
            return real_all_gather(output, tensor, *args, **kwargs)

        dist.all_reduce = all_reduce  # type: ignore[assignment]
        dist.reduce_scatter_single = reduce_scatter  # type: ignore[assignment]
        dist.all_gather_single = all_gather  # type: ignore[assignment]
        try:
            yield
        finally:
            dist.all_reduce = real_all_reduce  # type: ignore[assignment]
            dist.reduce_scatter_single = real_reduce_scatter  # type: ignore[assignment]
            dist.all_gather_single = real_all_gather  # type: ignore[assignment]

    def summary(self) -> dict[str, Any]:
        return {
            "buckets": list(self.buckets),
            "all_reduces": list(self.all_reduces),
            "reduce_scatters": list(self.reduce_scatters),
            "all_gathers": list(self.all_gathers),
        }
