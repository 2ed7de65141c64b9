"""The models and data every benchmark variant runs on: a small MLP and a transformer block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WINDOW", "Batch", "Workload", "make_optimizer", "workload"]

Batch = tuple[torch.Tensor, torch.Tensor]
WINDOW = 8
"""Micro-batches per optimizer step in every benchmark."""
MAX_GRAD_NORM = 1.0


class TransformerBlock(nn.Module):
    """One pre-norm encoder layer and a linear head, on (batch, seq, dim) inputs."""

    def __init__(self, dim: int = 128, heads: int = 4, ff: int = 512) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.layer(x))
        return out


@dataclass(frozen=True)
class Workload:
    """A model factory and its micro-batches (inputs, regression targets)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def batches(self, count: int, *, scale: int = 1, seed: int = 1) -> list[Batch]:
        """``count`` micro-batches, each ``scale`` times the base micro-batch."""
        generator = torch.Generator().manual_seed(seed)
        rows = self.input_shape[0] * scale
        return [
            (
                torch.randn(rows, *self.input_shape[1:], generator=generator),
                torch.randn(rows, *self.output_shape[1:], generator=generator),
            )
            for _ in range(count)
        ]

    @staticmethod
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.mse_loss(model(batch[0]), batch[1])


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 256)
    )


_WORKLOADS = {
    "mlp": Workload("mlp", _mlp, (32, 256), (32, 256)),
    "transformer": Workload("transformer", TransformerBlock, (4, 64, 128), (4, 64, 128)),
}


def workload(name: str) -> Workload:
    """The workload called ``name`` (``mlp`` or ``transformer``)."""
    return _WORKLOADS[name]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW, as most of the runs these loops stand for use."""
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
