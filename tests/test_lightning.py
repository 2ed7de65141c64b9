"""The real Lightning Trainer on CPU: the guide's delegation, and exact accumulation.

Datasets are 10 micro-batches long with windows of 4, so every epoch ends in a short window
of 2, over several epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accumfn import GradientAccumulator

from .support import data, large_batch_run, max_param_diff, mlp, mse, twin

lightning = pytest.importorskip("lightning")
pl = lightning.pytorch
from accumfn.lightning_callback import ExactAccumulation  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
]

MICRO, N_MICRO, WINDOW, EPOCHS, LR, CLIP = 4, 10, 4, 3, 0.2, 0.5
WINDOWS_PER_EPOCH = -(-N_MICRO // WINDOW)  # 4 | 4 | 2


def make_trainer(accumulate: int, callbacks: list[Any] | None = None, **kwargs: Any) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def loader(*tensors: torch.Tensor) -> DataLoader[tuple[torch.Tensor, ...]]:
    return DataLoader(TensorDataset(*tensors), batch_size=MICRO, shuffle=False)


class Regression(pl.LightningModule):
    """Mean squared error of a small MLP; training_step may add per-step checks."""

    def __init__(self, net: nn.Module, hook: Callable[[Regression, torch.Tensor, int], Any]):
        super().__init__()
        self.net = net
        self.hook = hook

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = mse(self.net, x, y)
        self.hook(self, loss, batch_idx)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


# -- the guide: GradientAccumulator(trainer=self.trainer) under accumulate_grad_batches ------
def test_guide_delegation_tracks_global_step_over_epochs() -> None:
    seen: list[tuple[int, int, int, bool]] = []
    accumulators: dict[str, GradientAccumulator] = {}

    def hook(module: Regression, loss: torch.Tensor, batch_idx: int) -> None:
        if "acc" not in accumulators:
            accumulators["acc"] = GradientAccumulator(
                optimizer=module.optimizers().optimizer,
                accumulation_steps=1,
                batch_size=MICRO,
                trainer=module.trainer,
            )
        acc = accumulators["acc"]
        assert acc.is_lightning_managed
        assert acc.effective_batch_size == MICRO * WINDOW
        should_step = acc.accumulate(loss, module)
        assert should_step is True
        seen.append((acc.effective_step, module.trainer.global_step, batch_idx, should_step))

    module = Regression(mlp(0), hook)
    trainer = make_trainer(WINDOW)
    trainer.fit(module, loader(*data(0, MICRO * N_MICRO)))
    assert len(seen) == EPOCHS * N_MICRO
    assert all(effective == global_step for effective, global_step, _, _ in seen)
    # global_step counts windows, the short final window of each epoch included
    expected_steps = [
        epoch * WINDOWS_PER_EPOCH + batch // WINDOW
        for epoch in range(EPOCHS)
        for batch in range(N_MICRO)
    ]
    assert [effective for effective, *_ in seen] == expected_steps
    acc = accumulators["acc"]
    assert trainer.global_step == acc.effective_step == EPOCHS * WINDOWS_PER_EPOCH
    assert acc.stats.total_steps == EPOCHS * N_MICRO
    assert acc.stats.optimizer_steps == trainer.global_step


def test_conflict_error_with_the_real_trainer_inside_training_step() -> None:
    def hook(module: Regression, loss: torch.Tensor, batch_idx: int) -> None:
        GradientAccumulator(module.optimizers().optimizer, 4, trainer=module.trainer)

    module = Regression(mlp(1), hook)
    with pytest.raises(ValueError, match="Gradient accumulation conflict detected") as err:
        make_trainer(WINDOW).fit(module, loader(*data(1, MICRO * N_MICRO)))
    assert "Lightning accumulate_grad_batches: 4" in str(err.value)


# -- exact accumulation with the callback ------------------------------------------------------
def _reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    ref = twin(net)
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    per_window = MICRO * WINDOW
    windows = [(x[s : s + per_window], y[s : s + per_window]) for s in range(0, len(x), per_window)]
    for _ in range(EPOCHS):
        large_batch_run(ref, optimizer, windows, CLIP)
    return ref


def _no_hook(module: Regression, loss: torch.Tensor, batch_idx: int) -> None:
    return None


def test_callback_makes_the_short_final_window_a_mean() -> None:
    x, y = data(2, MICRO * N_MICRO)
    net = mlp(2)
    ref = _reference(net, x, y)
    plain, exact = Regression(twin(net), _no_hook), Regression(twin(net), _no_hook)
    make_trainer(WINDOW, gradient_clip_val=CLIP).fit(plain, loader(x, y))
    callback = ExactAccumulation()
    trainer = make_trainer(WINDOW, [callback], gradient_clip_val=CLIP)
    trainer.fit(exact, loader(x, y))
    assert trainer.global_step == EPOCHS * WINDOWS_PER_EPOCH
    assert callback.state is not None and callback.state.optimizer_steps == trainer.global_step
    assert max_param_diff(exact.net, ref) < 1e-6
    assert max_param_diff(plain.net, ref) > 1e-4  # Lightning alone underweights the short window


def test_callback_follows_lightnings_accumulation_scheduler() -> None:
    x, y = data(6, MICRO * N_MICRO)
    net = mlp(6)
    ref = twin(net)
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    for window in (4, 3, 3):  # {0: 4, 1: 3}: 4 | 4 | 2, then 3 | 3 | 3 | 1
        per_window = MICRO * window
        windows = [
            (x[s : s + per_window], y[s : s + per_window]) for s in range(0, len(x), per_window)
        ]
        large_batch_run(ref, optimizer, windows, None)
    callback = ExactAccumulation()
    scheduler = pl.callbacks.GradientAccumulationScheduler({0: 4, 1: 3})
    module = Regression(twin(net), _no_hook)
    trainer = make_trainer(1, [scheduler, callback])
    trainer.fit(module, loader(x, y))
    assert trainer.global_step == 3 + 4 + 4
    assert max_param_diff(module.net, ref) < 1e-6


class MaskedRegression(pl.LightningModule):
    """Item mode: the loss sums over the valid entries; their count goes to the callback."""

    def __init__(self, net: nn.Module, callback: ExactAccumulation) -> None:
        super().__init__()
        self.net = net
        self.callback = callback

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, mask = batch
        self.callback.add_items(int(mask.sum()))
        return ((self.net(x) - y).pow(2) * mask).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def test_callback_item_mode_matches_the_mean_over_all_items_of_each_window() -> None:
    x, y = data(3, MICRO * N_MICRO)
    generator = torch.Generator().manual_seed(3)
    mask = (torch.rand(y.shape, generator=generator) < 0.6).float()
    mask[:, 0] = 1.0  # at least one item per sample
    net = mlp(3)
    ref = twin(net)
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    per_window = MICRO * WINDOW
    for _ in range(EPOCHS):
        for s in range(0, len(x), per_window):
            xs, ys, ms = x[s : s + per_window], y[s : s + per_window], mask[s : s + per_window]
            optimizer.zero_grad(set_to_none=True)
            (((ref(xs) - ys).pow(2) * ms).sum() / ms.sum()).backward()
            optimizer.step()
    callback = ExactAccumulation()
    module = MaskedRegression(twin(net), callback)
    make_trainer(WINDOW, [callback]).fit(module, loader(x, y, mask))
    assert max_param_diff(module.net, ref) < 1e-5


def test_callback_refuses_manual_optimization() -> None:
    class Manual(Regression):
        def __init__(self) -> None:
            super().__init__(mlp(4), _no_hook)
            self.automatic_optimization = False

    with pytest.raises(Exception, match="ExactAccumulation works with automatic optimization"):
        make_trainer(1, [ExactAccumulation()]).fit(Manual(), loader(*data(4, MICRO * 2)))


# -- the recipe for manual optimization: accumfn does everything -------------------------------
class ManualAccumulation(pl.LightningModule):
    """``automatic_optimization=False``; GradientAccumulator owns backward, clip, step, LR."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.automatic_optimization = False
        self.accumulator: GradientAccumulator | None = None
        self.steps_seen: list[tuple[int, int]] = []

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return [optimizer], [scheduler]

    def on_train_start(self) -> None:
        self.accumulator = GradientAccumulator(
            self.optimizers(),  # the LightningOptimizer: its step() advances global_step
            accumulation_steps=WINDOW,
            max_grad_norm=CLIP,
            batch_size=MICRO,
            scheduler=self.lr_schedulers(),
        )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        assert self.accumulator is not None
        x, y = batch
        last = batch_idx == self.trainer.num_training_batches - 1
        self.accumulator.accumulate(mse(self.net, x, y), self, is_final_batch=last)
        self.steps_seen.append((self.accumulator.effective_step, self.trainer.global_step))


def test_manual_optimization_recipe_is_exact_and_keeps_global_step() -> None:
    x, y = data(5, MICRO * N_MICRO)
    net = mlp(5)
    ref = twin(net)
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    per_window = MICRO * WINDOW
    windows = [(x[s : s + per_window], y[s : s + per_window]) for s in range(0, len(x), per_window)]
    for _ in range(EPOCHS):
        for window in windows:
            large_batch_run(ref, optimizer, [window], CLIP)
            scheduler.step()
    module = ManualAccumulation(twin(net))
    trainer = make_trainer(1)
    trainer.fit(module, loader(x, y))
    assert module.accumulator is not None
    assert trainer.global_step == module.accumulator.effective_step == EPOCHS * WINDOWS_PER_EPOCH
    assert all(effective == global_step for effective, global_step in module.steps_seen)
    assert max_param_diff(module.net, ref) < 1e-6
