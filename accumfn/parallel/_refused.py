"""Data-parallel wrappers accumfn cannot steer, refused before they make a window wrong.

Given a plain module, accumfn neither skips a gradient reduction inside a window nor sums
item counts over the ranks: right for a module no wrapper reduces, wrong for a module whose
parameters a live ``DistributedDataParallel`` reduces (``ddp.module``, a part of it, or
composable ``replicate``, refused from the moment ``replicate`` is applied, before its DDP
exists), whose every backward is then averaged while the window is
rescaled by this rank's own counts, and for FSDP1 (``FullyShardedDataParallel``), which
accumfn does not drive.
"""

from __future__ import annotations

import gc
import sys

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError

__all__ = ["check_steerable", "fsdp_class"]


def fsdp_class(name: str) -> type | None:
    """``torch.distributed.fsdp.<name>`` (``FSDPModule``, ``FullyShardedDataParallel``) if
    that module was imported: a model can only be an FSDP module then, and importing it
    here would be slow."""
    found = getattr(sys.modules.get("torch.distributed.fsdp"), name, None)
    return found if isinstance(found, type) else None


def _live_wrappers(module: nn.Module, wrappers: tuple[type, ...]) -> list[nn.Module]:
    """The wrappers of these types alive in this process that reduce a parameter of
    ``module``: around it, around a model holding it, or over its parameters (composable
    ``replicate`` builds a DDP over a parameter list). One pass over the heap."""
    owned = {id(param) for param in module.parameters()}
    classes: set[type] = set(wrappers)
    pending: list[type] = list(wrappers)
    while pending:  # subclasses too; a set lookup of type() per object keeps the pass fast
        subclasses: list[type] = pending.pop().__subclasses__()
        for subclass in subclasses:
            if subclass not in classes:
                classes.add(subclass)
                pending.append(subclass)
    found = [wrapper for wrapper in gc.get_objects() if type(wrapper) in classes]
    return [
        wrapper
        for wrapper in found
        if isinstance(wrapper, nn.Module)
        and any(id(param) in owned for param in wrapper.parameters())
    ]


def _wrapper_of(module: nn.Module, wrappers: tuple[type, ...]) -> nn.Module | None:
    """A live wrapper reducing ``module``'s gradients, once garbage no longer counts (a
    wrapper dropped but not yet collected would make the answer depend on when each rank
    last collected). Once per model, and only in a job of several processes."""
    if not _live_wrappers(module, wrappers):
        return None
    gc.collect()
    found = _live_wrappers(module, wrappers)
    return found[0] if found else None


def check_steerable(module: nn.Module) -> None:
    """Raise ConfigError if ``module`` (neither DDP nor FSDP2 itself) has its gradients
    reduced by a wrapper accumfn cannot steer: FSDP1, a DDP or FSDP2 module inside it, or a
    live DDP or FSDP1 wrapper reducing its parameters."""
    fsdp1 = fsdp_class("FullyShardedDataParallel")
    fsdp2 = fsdp_class("FSDPModule")
    contract = sys.modules.get("torch.distributed._composable.contract")
    registry = getattr(contract, "_get_registry", None)
    for inner in module.modules():
        if registry is not None and "replicate" in (registry(inner) or ()):
            raise ConfigError(
                "this model is under composable replicate(), which builds a "
                "DistributedDataParallel at its first forward that reduces gradients on every "
                "backward, where accumfn cannot defer it to the window's end: wrap the model "
                "in DistributedDataParallel instead and pass that (or shard it with "
                "fully_shard)."
            )
        if fsdp2 is not None and isinstance(inner, fsdp2):
            raise ConfigError(
                f"this model ({type(module).__name__}) holds FSDP2 modules but is not one "
                f"itself: the root's own parameters would never be reduced, and accumfn "
                f"steers FSDP2's gradient sync from the root. Apply fully_shard to the root "
                f"module too (after its submodules), and pass that root."
            )
        if fsdp1 is not None and isinstance(inner, fsdp1):
            raise ConfigError(
                "this model is wrapped in FSDP1 (FullyShardedDataParallel), whose gradient "
                "reduction accumfn cannot defer to a window's end nor rescale by the counts "
                "over all ranks: shard it with FSDP2 (torch.distributed.fsdp.fully_shard) or "
                "wrap it in DistributedDataParallel instead."
            )
        if isinstance(inner, DistributedDataParallel):
            raise ConfigError(
                f"this model ({type(module).__name__}) holds a DistributedDataParallel inside "
                f"it, which reduces gradients on every backward where accumfn cannot defer it "
                f"to the window's end: pass the DistributedDataParallel model itself, or wrap "
                f"the whole model in it."
            )
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return  # no wrapper reduces over several processes
    wrappers: tuple[type, ...] = (DistributedDataParallel,) + ((fsdp1,) if fsdp1 else ())
    wrapper = _wrapper_of(module, wrappers)
    if wrapper is not None:
        name = type(wrapper).__name__
        raise ConfigError(
            f"this model's parameters are reduced by a {name} (this model is its .module, or "
            f"inside it), which reduces gradients on every backward: given this model, "
            f"accumfn can neither defer that reduction to the window's end nor sum item "
            f"counts and micro-steps over the ranks, so the ranks would step differently. "
            f"Pass the {name} itself, the model you call forward on, to accumulate, "
            f"apply_step, prepare_forward and GradientAccumulator (or delete that wrapper if "
            f"it is no longer used)."
        )
