"""``distributed_state``: the accumulator as a ``torch.distributed.checkpoint`` Stateful.

DCP treats every entry whose key is the same on all ranks as one replicated value and keeps
a single copy. An open window differs per rank (its gradients under DDP, its item count,
its shard under FSDP2), so each rank's ``capture`` is stored under a key of its own, as one
opaque entry, with the world size beside it. Loading reads back each rank's own entry and
restores it with every check of ``restore``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.amp import GradScaler

from ..core import AccumState, init
from ..errors import CheckpointError, ConfigError
from ..grads import optimizer_params
from ._capture import agreeing_groups, capture, refuse_together, restore

__all__ = ["DistributedState", "StateHolder", "distributed_state"]


@attrs.define
class StateHolder:
    """A mutable home for the functional API's state, so DCP can load into it.

    ``holder = StateHolder(state, optimizer, scaler)``; after ``dcp.load``, continue from
    ``holder.state``.
    """

    state: AccumState
    optimizer: torch.optim.Optimizer
    scaler: GradScaler | None = None


@runtime_checkable
class Accumulator(Protocol):
    """What this module uses of a ``GradientAccumulator`` (the layer above: not imported)."""

    optimizer: Any

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None: ...
    def prepare(self, model: nn.Module) -> None: ...


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DistributedState:
    """``Stateful`` view of an accumulator (or a ``StateHolder``) and its model."""

    def __init__(self, target: Accumulator | StateHolder, model: nn.Module) -> None:
        if not isinstance(target, Accumulator | StateHolder):
            raise ConfigError(
                f"distributed_state needs a GradientAccumulator or an "
                f"accumfn.checkpoint.StateHolder(state, optimizer, scaler), got "
                f"{type(target).__name__}."
            )
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.target = target
        self.model = model

    def _names(self) -> list[str]:
        names = {id(p): name for name, p in self.model.named_parameters()}
        params = list(optimizer_params(self.target.optimizer))
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise CheckpointError(
                f"{len(missing)} of the optimizer's parameters are not parameters of the model "
                f"given to distributed_state; pass the model the optimizer trains."
            )
        return [names[id(p)] for p in params]

    def state_dict(self) -> dict[str, Any]:
        """``{"world_size": W, "rank<r>": bytes}``: each rank's capture under its own key."""
        target = self.target
        if isinstance(target, StateHolder):
            data = capture(target.state, target.optimizer, target.scaler)
        else:
            data = target.state_dict()
        grads = data["partial_grads"]
        if grads is not None:
            data["partial_grads"] = dict(zip(self._names(), grads, strict=True))
        buffer = io.BytesIO()
        torch.save(data, buffer)
        rank, world = _rank_and_world()
        return {"world_size": world, f"rank{rank}": buffer.getvalue()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore this rank's entry (checked whole first, as ``restore`` does); a rank
        whose entry is refused tells the others, which raise too."""
        try:
            data = self._entry(state_dict)
        except Exception:
            refuse_together(init(), agreeing_groups(self.model))
            raise
        target = self.target
        if isinstance(target, StateHolder):
            target.state = restore(
                data, target.state, target.optimizer, target.scaler, model=self.model
            )
        else:
            target.prepare(self.model)  # it knows the model, whose ranks agree on the load
            target.load_state_dict(data)

    def _entry(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's ``capture`` dict from the loaded entries, gradients in its order."""
        rank, world = _rank_and_world()
        saved_world = state_dict.get("world_size")
        if saved_world != world:
            raise CheckpointError(
                f"the accumulator state was saved by {saved_world} ranks and is loaded by "
                f"{world}: each rank's entry is its own, so it loads only into as many "
                f"ranks as saved it. Resume with {saved_world} ranks; to change the number "
                f"of ranks, save the accumulator at a window boundary with rank 0's "
                f"accumulator.state_dict() in a file of its own (save_checkpoint) and load "
                f"that on every rank."
            )
        raw = state_dict.get(f"rank{rank}")
        if not isinstance(raw, bytes | bytearray):
            raise CheckpointError(
                f"the accumulator entry of rank {rank} is missing or not what "
                f"distributed_state saved (got {type(raw).__name__})."
            )
        data = torch.load(io.BytesIO(raw), weights_only=True)
        grads = data.get("partial_grads")
        if isinstance(grads, Mapping):
            names = self._names()
            if set(grads) != set(names):
                raise CheckpointError(
                    f"the open-window gradients in the checkpoint name other parameters than "
                    f"the model's: missing {sorted(set(names) - set(grads))[:5]}, unknown "
                    f"{sorted(set(grads) - set(names))[:5]}; load into the model it was saved "
                    f"from."
                )
            data["partial_grads"] = [grads[name] for name in names]
        return dict(data)


def distributed_state(target: Accumulator | StateHolder, model: nn.Module) -> DistributedState:
    """The accumulator (or a ``StateHolder``) as a ``torch.distributed.checkpoint`` Stateful.

    ``dcp.save({"model": ..., "optim": ..., "accum": distributed_state(acc, model)}, ...)``
    and the same dict to ``dcp.load`` resume at any micro-step under DDP, and under FSDP2
    at window boundaries or with ``sync_every_micro_step=True`` (inside a window FSDP2 keeps
    the gradients out of reach: the save raises ``CheckpointError`` on every rank).
    """
    return DistributedState(target, model)
