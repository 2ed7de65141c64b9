"""What each rank of a distributed equivalence check runs: accumulated training, recorded.

The parent writes a ``RankJob`` to ``job.pt``; every rank builds the model, loads the
parent's initial weights, wraps it (DDP, FSDP2 or the user's callable), trains its own
shard with accumfn, and after each window records the gradients its optimizer used and
the full parameters and buffers (FSDP2 shards gathered) in ``rank{r}.pt``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn

from .. import core
from ..errors import ConfigError
from ..step import LRScheduler, accumulate, prepare_forward, step_window
from ._equivalence import Grads, WindowRecord, quiet_skips
from ._spawn import FINISHED, connect, report_progress

__all__ = ["WRAPS", "RankJob", "WindowRecord", "describe", "load_weights", "rank_main"]

Wrap = str | Callable[[nn.Module], nn.Module]
WRAPS = ("ddp", "fsdp2")


@attrs.frozen
class RankJob:
    """Everything a rank needs; pickled by the parent, so every field must pickle."""

    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    make_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    num_items: Callable[[Any], int] | None
    wrap: Wrap
    steps: core.StepsSpec
    max_grad_norm: float | None
    seed: int
    initial: dict[str, torch.Tensor]
    """The parent's initial parameters and buffers, by name."""
    shards: list[list[Any]]
    """``shards[r]``: the micro-batches of rank ``r``, in order."""


def describe(value: object) -> str:
    """``'ddp'``, ``my_wrap``, ``partial(DistributedDataParallel, bucket_cap_mb=1)``."""
    if isinstance(value, functools.partial):
        args = [describe(value.func), *map(describe, value.args)]
        args += [f"{key}={describe(v)}" for key, v in value.keywords.items()]
        return f"partial({', '.join(args)})"
    name = getattr(value, "__qualname__", None)
    return name if isinstance(name, str) else repr(value)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached full copy (an FSDP2 shard is gathered: every rank must call this)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    full = full_tensor() if callable(full_tensor) else tensor
    assert isinstance(full, torch.Tensor)
    return full.detach().clone()


def _grads(model: nn.Module) -> Grads:
    """Every gradient in full (None where a parameter has none). Every rank gathers every
    parameter's, a zero one where it has none, so the ranks' collectives pair up."""
    found: Grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        full = _full(torch.zeros_like(p) if grad is None else grad)
        found[name] = None if grad is None else full
    return found


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy parameters and buffers by name into a plain (not yet wrapped) model."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.copy_(weights[name])


def _shard_fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # children before parents: every submodule that owns parameters, then the root
    for module in reversed(list(model.modules())[1:]):
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _wrapped(model: nn.Module, wrap: Wrap) -> nn.Module:
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if wrap == "fsdp2":
        return _shard_fsdp2(model)
    assert callable(wrap)
    wrapped = wrap(model)
    if not isinstance(wrapped, nn.Module):
        raise ConfigError(
            f"wrap returned {type(wrapped).__name__}, not an nn.Module: it must return the "
            f"wrapped model (e.g. DistributedDataParallel(model))."
        )
    held = {id(p) for p in wrapped.parameters()}
    missing = [name for name, p in model.named_parameters() if id(p) not in held]
    if missing:
        raise ConfigError(
            f"wrap returned a model that does not hold the parameters of the model it was "
            f"given ({', '.join(missing[:3])}...): it must wrap that model, as "
            f"DistributedDataParallel or fully_shard do, not a copy of it."
        )
    return wrapped


def _train(rank: int, job: RankJob, progress: Callable[[str], None]) -> list[WindowRecord]:
    progress("building the model (make_model)")
    torch.manual_seed(job.seed)
    model = job.make_model()
    load_weights(model, job.initial)
    progress(f"wrapping the model (wrap={describe(job.wrap)})")
    wrapped = _wrapped(model, job.wrap)
    progress("building the optimizer")
    optimizer = job.make_optimizer(wrapped)
    scheduler = job.make_scheduler(optimizer) if job.make_scheduler is not None else None
    seen: list[Grads] = []
    state = core.init(job.steps, max_grad_norm=job.max_grad_norm)
    prepare_forward(state, wrapped)
    batches = job.shards[rank]
    records: list[WindowRecord] = []
    for index, batch in enumerate(batches):
        progress(f"micro-batch {index} of {len(batches)} (window {len(records)})")
        items = job.num_items(batch) if job.num_items is not None else None
        state, stepped = accumulate(
            state,
            job.loss_fn(wrapped, batch),
            wrapped,
            is_final_batch=index == len(batches) - 1,
            num_items=items,
        )
        if stepped:
            progress(f"stepping window {len(records)}")
            seen.clear()
            with quiet_skips():  # a window without items: the parent reports it
                report = step_window(
                    state,
                    optimizer,
                    wrapped,
                    scheduler=scheduler,
                    before_step=lambda _: seen.append(_grads(model)),
                )
            state = report.state
            records.append(
                WindowRecord(
                    applied=report.applied,
                    grads=seen[-1] if seen else None,
                    params={name: _full(p) for name, p in model.named_parameters()},
                    buffers={name: _full(b) for name, b in model.named_buffers()},
                )
            )
    progress("finished training, saving what it recorded")
    return records


def rank_main(rank: int, world: int, port: int, workdir: str, timeout: float) -> None:
    """Entry point of one spawned rank."""
    torch.set_num_threads(1)
    report_progress(workdir, rank, "joining the process group")
    connect(rank, world, port, timeout)
    try:
        job: RankJob = torch.load(Path(workdir) / "job.pt", weights_only=False)
        records = _train(rank, job, lambda doing: report_progress(workdir, rank, doing))
        torch.save(records, Path(workdir) / f"rank{rank}.pt")
        report_progress(workdir, rank, FINISHED)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
