"""Shared test helpers: tiny models, data, a large-batch reference, a host-sync counter."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import accumfn
from accumfn.testing import HostSyncCounter as HostSyncCounter  # re-exported for tests


def mlp(seed: int, sizes: Sequence[int] = (6, 16, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def data(seed: int, n: int, features: int = 6, outputs: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, features, generator=g), torch.randn(n, outputs, generator=g)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def large_batch_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: Sequence[tuple[torch.Tensor, torch.Tensor]],
    max_grad_norm: float | None,
) -> None:
    """One optimizer step per window, on the whole window as one batch."""
    for x, y in windows:
        optimizer.zero_grad(set_to_none=True)
        mse(model, x, y).backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()


def functional_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    max_grad_norm: float | None,
) -> accumfn.AccumState:
    state = accumfn.init(steps=steps, max_grad_norm=max_grad_norm)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        state, stepped = accumfn.accumulate(state, mse(model, x, y), model, is_final_batch=last)
        if stepped:
            state = accumfn.apply_step(state, optimizer, model)
    return state


def windows_of(
    x: torch.Tensor, y: torch.Tensor, micro: int, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    per_window = micro * steps
    return [(x[s : s + per_window], y[s : s + per_window]) for s in range(0, len(x), per_window)]


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


def same(a: object, b: object) -> bool:
    """Equal, tensors compared exactly, through nested dicts and lists."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b
