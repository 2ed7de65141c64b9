"""DDP and FSDP2 gradient-sync control, and the few collectives accumfn issues itself."""

from __future__ import annotations

import sys
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "averaged_over",
    "forward_synced",
    "global_sum",
    "is_ddp",
    "is_fsdp",
    "mean_allreduce_grads_",
    "set_backward_sync",
    "set_forward_sync",
]


def _fsdp_module_type() -> type | None:
    """FSDP2's module class, if FSDP2 is in use (its import is slow, so it is not done here).

    A model can only be an ``FSDPModule`` once ``torch.distributed.fsdp`` has been imported.
    """
    module = sys.modules.get("torch.distributed.fsdp")
    found = getattr(module, "FSDPModule", None)
    return found if isinstance(found, type) else None


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, DistributedDataParallel)


def is_fsdp(model: nn.Module) -> bool:
    fsdp_module = _fsdp_module_type()
    return fsdp_module is not None and isinstance(model, fsdp_module)


def _group(model: nn.Module) -> dist.ProcessGroup | None:
    if is_ddp(model):
        return cast(dist.ProcessGroup, model.process_group)
    if is_fsdp(model) and dist.is_initialized():
        return dist.group.WORLD
    return None


def averaged_over(model: nn.Module) -> int:
    """How many processes DDP/FSDP averages gradients over (1 for a plain module)."""
    group = _group(model)
    return 1 if group is None else dist.get_world_size(group)


def set_forward_sync(model: nn.Module, sync: bool) -> None:
    """Tell DDP whether the backward of the next forward must all-reduce.

    DDP reads this flag in forward, so it must be set before the forward it applies to.
    """
    if is_ddp(model):
        setattr(model, "require_backward_grad_sync", sync)  # noqa: B010 - typed as Module


def set_backward_sync(model: nn.Module, sync: bool) -> None:
    """Tell FSDP2 whether the coming backward must reduce-scatter (decided at backward)."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def forward_synced(model: nn.Module) -> bool:
    """Whether the backward about to run will reduce gradients across processes."""
    if is_ddp(model):
        return bool(model.require_backward_grad_sync)
    return True


def mean_allreduce_grads_(model: nn.Module) -> None:
    """Average gradients across the DDP group in one all-reduce of a flat buffer.

    Used when a window closes at a micro-step whose forward was told not to sync.
    """
    group = _group(model)
    if group is None:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    chunks = torch.split(flat, [g.numel() for g in grads])
    for param, chunk in zip(params, chunks, strict=True):
        if param.grad is None:
            param.grad = chunk.view_as(param).clone()
        else:
            param.grad.copy_(chunk.view_as(param))


def global_sum(model: nn.Module, count: int, device: torch.device) -> int:
    """The sum of ``count`` over the model's process group (the count itself when local)."""
    group = _group(model)
    if group is None:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())
