"""``ExactAccumulation`` under Lightning's DDP on 2 gloo ranks, against one large batch over
both ranks' samples per window (the last window of each epoch short on both ranks)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._dist_utils import run_ranks
from .support import data, mlp

lightning = pytest.importorskip("lightning")

MICRO, N_MICRO, WINDOW, EPOCHS, LR, CLIP, WORLD = 4, 6, 4, 2, 0.2, 0.5, 2


class _Regression(lightning.pytorch.LightningModule):  # type: ignore[misc]
    def __init__(self, net: nn.Module, items: bool, callback: Any) -> None:
        super().__init__()
        self.net = net
        self.items = items
        self.callback = callback
        self.seen: list[list[int]] = []

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        index, x, y, weight = batch
        self.seen.append(index.tolist())
        errors = ((self.net(x) - y) ** 2).mean(dim=1) * weight
        if self.items:  # a sum over the micro-batch's items (rows of weight 1)
            self.callback.add_items(int(weight.sum()))
            return errors.sum()
        return errors.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def _samples() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = data(31, WORLD * MICRO * N_MICRO)
    weight = (torch.arange(len(x)) % 3 != 1).to(x.dtype)  # some items masked out
    return x, y, weight


def _fit(rank: int, world: int, items: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Lightning's own DDP on the process group the test harness opened; returns the
    parameters and the samples of each micro-batch (its DistributedSampler's order)."""
    from accumfn.lightning_callback import ExactAccumulation

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore")
    callback = ExactAccumulation()
    module = _Regression(mlp(5), items, callback)
    trainer = lightning.pytorch.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_epochs=EPOCHS,
        accumulate_grad_batches=WINDOW,
        gradient_clip_val=CLIP,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    x, y, weight = _samples()
    dataset = TensorDataset(torch.arange(len(x)), x, y, weight)
    trainer.fit(module, DataLoader(dataset, batch_size=MICRO, shuffle=False))
    assert trainer.global_step == EPOCHS * -(-N_MICRO // WINDOW)
    return [p.detach().clone() for p in module.net.parameters()], module.seen


def _reference(items: bool, seen: list[list[list[int]]]) -> list[torch.Tensor]:
    """One step per window over both ranks' micro-batches, clipped as Lightning clips."""
    x, y, weight = _samples()
    net = mlp(5)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for epoch in range(EPOCHS):
        for start in range(0, N_MICRO, WINDOW):
            batches = range(epoch * N_MICRO + start, epoch * N_MICRO + min(start + WINDOW, N_MICRO))
            rows = torch.tensor([i for rank in seen for b in batches for i in rank[b]])
            errors = ((net(x[rows]) - y[rows]) ** 2).mean(dim=1) * weight[rows]
            loss = errors.sum() / weight[rows].sum() if items else errors.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if CLIP is not None:
                nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            optimizer.step()
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize("items", [False, True], ids=["mean", "items"])
def test_exact_accumulation_under_lightning_ddp_equals_the_large_batch(items: bool) -> None:
    results = run_ranks(_fit, items, timeout=180)
    reference = _reference(items, [seen for _, seen in results])
    for params, _ in results:
        for got, want in zip(params, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
