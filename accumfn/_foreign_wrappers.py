"""Data-parallel wrappers accumfn cannot steer, refused before they make a window wrong.

Given a plain module, accumfn neither skips a gradient reduction inside a window nor sums
item counts over the ranks: right for a module no wrapper reduces, wrong for the module
inside a live ``DistributedDataParallel`` (``ddp.module``), whose every backward is then
averaged while the window is rescaled by this rank's own counts, and for FSDP1
(``FullyShardedDataParallel``), which accumfn does not drive.
"""

from __future__ import annotations

import gc
import sys

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError

__all__ = ["check_steerable"]

_INNER_KEYS = ("module", "_fsdp_wrapped_module", "_orig_mod")
"""Where DDP, FSDP1 and ``torch.compile`` keep the module they wrap (in their ``_modules``)."""


def _fsdp1_type() -> type | None:
    """FSDP1's wrapper class, if its module was imported (a model can only be one then)."""
    module = sys.modules.get("torch.distributed.fsdp")
    found = getattr(module, "FullyShardedDataParallel", None)
    return found if isinstance(found, type) else None


def _wrapping(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The live modules that wrap ``module`` (hold it in ``_modules`` under one of
    ``_INNER_KEYS``), with that key; found through the garbage collector's referrers: the
    ``_modules`` dict, then its owner (directly, or through the owner's ``__dict__``)."""
    found: list[tuple[nn.Module, str]] = []
    for holder in gc.get_referrers(module):
        key = next(
            (k for k in _INNER_KEYS if isinstance(holder, dict) and holder.get(k) is module), None
        )
        if key is None:
            continue
        for owner in gc.get_referrers(holder):
            owners = [owner]
            if isinstance(owner, dict) and owner.get("_modules") is holder:
                owners = gc.get_referrers(owner)  # the wrapper, through its __dict__
            found.extend(
                (wrapper, key)
                for wrapper in owners
                if isinstance(wrapper, nn.Module) and wrapper._modules is holder
            )
    return found


def _wrapper_of(module: nn.Module, wrappers: tuple[type, ...], depth: int = 0) -> nn.Module | None:
    """A live wrapper of one of ``wrappers`` types around ``module``, directly or around a
    ``torch.compile`` of it. A few scans of the heap, once per model and only in a job of
    several processes."""
    for wrapper, key in _wrapping(module):
        if isinstance(wrapper, wrappers):
            return wrapper
        if key == "_orig_mod" and depth < 2:  # DDP(torch.compile(module))
            found = _wrapper_of(wrapper, wrappers, depth + 1)
            if found is not None:
                return found
    return None


def check_steerable(module: nn.Module) -> None:
    """Raise ConfigError if ``module`` (neither DDP nor FSDP2 itself) has its gradients
    reduced by a wrapper accumfn cannot steer: FSDP1, a DDP inside it, or a live DDP or
    FSDP1 wrapper around it."""
    fsdp1 = _fsdp1_type()
    for inner in module.modules():
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
            f"this model is the module inside a {name} wrapper (its .module), which reduces "
            f"its gradients on every backward: given the inner module, accumfn can neither "
            f"defer that reduction to the window's end nor sum item counts and micro-steps "
            f"over the ranks, so the ranks would step differently. Pass the wrapper itself, "
            f"the model you call forward on, to accumulate, apply_step, prepare_forward and "
            f"GradientAccumulator."
        )
