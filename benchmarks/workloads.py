"""The models, optimizers and data every benchmark runs on.

Timing: ``linear`` (Linear(4, 1)), ``mlp`` (128-256-256-1, batch 8), ``linears50`` (50 x
Linear(8, 8) in a row), ``tensors2`` ... ``tensors1000`` (2 to 1000 parameter tensors of
8 values, SGD foreach), ``mlp_noclip`` (the MLP without clipping) and ``transformer`` (one
encoder layer and a head). Memory: ``wide_mlp`` (256-512-512-256, batch 32) and
``transformer``, whose activations are large enough to show in the process's RSS.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MAX_GRAD_NORM",
    "SWEEP",
    "WINDOW",
    "Batch",
    "Workload",
    "workload",
]

Batch = tuple[torch.Tensor, torch.Tensor]
WINDOW = 8
"""Micro-batches per optimizer step in every benchmark."""
MAX_GRAD_NORM = 1.0
SWEEP = (2, 10, 100, 1000)
"""Parameter tensors of the ``tensorsN`` workloads (the boundary-cost sweep)."""


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


class ManyTensors(nn.Module):
    """``count`` parameter tensors of 8 values, stacked into one (count, 8) weight.

    One stack in the forward and one in the backward: the micro-step stays cheap, so the
    per-tensor work at the window boundary is what the timing shows.
    """

    def __init__(self, count: int) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(8) / 8) for _ in range(count))
        self._list = list(self.tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ torch.stack(self._list).T).sum(1, keepdim=True)


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, as most of the runs these loops stand for use (torch's default kernel)."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def sgd_foreach(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True)


@dataclass(frozen=True)
class Workload:
    """A model factory, its optimizer, clipping, and its micro-batches (regression targets)."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] = adamw
    max_grad_norm: float | None = MAX_GRAD_NORM

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return self.optimizer(list(model.parameters()))

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
        nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1)
    )


def _wide_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 256)
    )


_WORKLOADS = {
    w.name: w
    for w in [
        Workload("linear", "Linear(4, 1)", lambda: nn.Linear(4, 1), (8, 4), (8, 1)),
        Workload("mlp", "MLP 128-256-256-1, batch 8", _mlp, (8, 128), (8, 1)),
        Workload(
            "linears50",
            "50 x Linear(8, 8) in a row",
            lambda: nn.Sequential(*(nn.Linear(8, 8) for _ in range(50))),
            (8, 8),
            (8, 8),
        ),
        *(
            Workload(
                f"tensors{n}",
                f"{n} parameter tensors, SGD foreach",
                functools.partial(ManyTensors, n),
                (8, 8),
                (8, 1),
                optimizer=sgd_foreach,
            )
            for n in SWEEP
        ),
        Workload(
            "mlp_noclip",
            "MLP, no clipping (max_grad_norm=None)",
            _mlp,
            (8, 128),
            (8, 1),
            max_grad_norm=None,
        ),
        Workload(
            "transformer",
            "transformer block (dim 128, 4 heads), batch 4 x 64",
            TransformerBlock,
            (4, 64, 128),
            (4, 64, 128),
        ),
        Workload("wide_mlp", "MLP 256-512-512-256, batch 32", _wide_mlp, (32, 256), (32, 256)),
    ]
}


def workload(name: str) -> Workload:
    """The workload called ``name``."""
    return _WORKLOADS[name]
