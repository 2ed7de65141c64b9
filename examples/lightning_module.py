"""A LightningModule under Trainer(accumulate_grad_batches=4), as in the guide, made exact.

GradientAccumulator(trainer=self.trainer) delegates to Lightning and reports its counters;
the ExactAccumulation callback makes the short window at each epoch's end a true mean, so
the run equals large-batch training. Tiny and CPU only.

    python examples/lightning_module.py
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accumfn import GradientAccumulator
from accumfn.lightning_callback import ExactAccumulation

MICRO, WINDOW, SAMPLES, EPOCHS, LR = 8, 4, 8 * 10, 3, 0.1  # 10 micro-batches: 4 | 4 | 2


class Regression(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.accumulator: GradientAccumulator | None = None

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        if self.accumulator is None:
            self.accumulator = GradientAccumulator(
                optimizer=self.optimizers().optimizer,
                accumulation_steps=1,  # Lightning accumulates
                batch_size=MICRO,
                trainer=self.trainer,
            )
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.accumulator.accumulate(loss, self)  # checks the loss; Lightning does backward
        assert self.accumulator.effective_step == self.trainer.global_step
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def large_batch(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for _ in range(EPOCHS):
        for start in range(0, len(x), MICRO * WINDOW):
            optimizer.zero_grad()
            xs, ys = x[start : start + MICRO * WINDOW], y[start : start + MICRO * WINDOW]
            nn.functional.mse_loss(net(xs), ys).backward()
            optimizer.step()
    return net


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, exact: bool) -> Regression:
    module = Regression(net)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        accumulate_grad_batches=WINDOW,
        callbacks=[ExactAccumulation()] if exact else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=MICRO))
    return module


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q).detach().abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(SAMPLES, 4), torch.randn(SAMPLES, 1)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    reference = large_batch(copy.deepcopy(net), x, y)
    plain = train(copy.deepcopy(net), x, y, exact=False)
    exact = train(copy.deepcopy(net), x, y, exact=True)
    assert exact.accumulator is not None
    print(
        f"global_step = effective_step = {exact.accumulator.effective_step}, "
        f"effective_batch_size = {exact.accumulator.effective_batch_size}"
    )
    plain_diff, exact_diff = max_diff(plain.net, reference), max_diff(exact.net, reference)
    print(f"Lightning alone vs large batch:         max |param diff| = {plain_diff:.2e}")
    print(f"Lightning + ExactAccumulation vs large: max |param diff| = {exact_diff:.2e}")
    ok = exact_diff < 1e-6
    print(
        ("OK" if ok else "MISMATCH")
        + ": Lightning with ExactAccumulation equals large-batch training"
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
