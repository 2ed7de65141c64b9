"""accumfn beside Accelerate, Lightning Fabric and DeepSpeed (real Accelerate and Fabric on CPU).

Accelerate accumulating too (``gradient_accumulation_steps > 1``, what
``accelerator.accumulate`` acts on) is the conflict error Lightning's is, before anything
changes; ``prepare`` and then accumfn alone is exact. Fabric on one device is driven
exactly; Fabric's loss-scaling precision and DeepSpeed's objects are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import accumfn
from accumfn import AccumulationConflictError, ConfigError
from tests.support import data, large_batch_run, max_param_diff, mlp, mse, same

accelerate = pytest.importorskip("accelerate")
fabric_module = pytest.importorskip("lightning.fabric")

STEPS, MICRO = 4, 3


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps its state process-wide: every test starts and ends without it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _micro(seed: int, windows: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(seed, STEPS * MICRO * windows)
    return list(zip(x.double().split(MICRO), y.double().split(MICRO), strict=True))


def _reference(model: nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """The large-batch run: one AdamW step per window of STEPS micro-batches."""
    reference = copy.deepcopy(model)
    windows = [
        (torch.cat([x for x, _ in micro[i:][:STEPS]]), torch.cat([y for _, y in micro[i:][:STEPS]]))
        for i in range(0, len(micro), STEPS)
    ]
    large_batch_run(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), windows, None)
    return reference


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


@pytest.mark.parametrize("api", ["object", "functional"])
def test_prepare_then_accumfn_alone_equals_the_large_batch(api: str) -> None:
    from accelerate import Accelerator

    model = mlp(1).double()
    micro = _micro(1)
    reference = _reference(model, micro)
    accelerator = Accelerator(cpu=True)  # gradient_accumulation_steps=1: accumfn accumulates
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    accumulator = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=None)
    state = accumfn.init(STEPS, max_grad_norm=None)
    for batch in micro:
        if api == "object":
            accumulator.accumulate(mse(model, *batch), model)
            continue
        state, stepped = accumfn.accumulate(state, mse(model, *batch), model)
        if stepped:
            state = accumfn.apply_step(state, optimizer, model)
    assert max_param_diff(model, reference) < 1e-12


def test_accelerate_accumulating_too_is_a_conflict_before_anything_changes() -> None:
    """The issue's script: Accelerator(gradient_accumulation_steps=3), accumfn window 4."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = mlp(2).double()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = _snapshot(model, optimizer)
    with pytest.raises(AccumulationConflictError, match="Resolution options") as info:
        accumfn.GradientAccumulator(optimizer, STEPS)
    assert "Accelerate gradient_accumulation_steps: 3" in str(info.value)
    assert "gradient_accumulation_steps=1" in str(info.value)
    # The functional API meets the prepared model first, inside accelerator.accumulate.
    state = accumfn.init(STEPS)
    with accelerator.accumulate(model), pytest.raises(AccumulationConflictError):
        accumfn.accumulate(state, mse(model, *_micro(2)[0]), model)
    assert same(before, _snapshot(model, optimizer)), "the refusal changed something"


def test_accelerate_fp16_loss_scaling_is_refused() -> None:
    """Accelerate's fp16 scales the loss in accelerator.backward, which accumfn never calls."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = mlp(6)
    scaled = AcceleratedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu")
    )
    with pytest.raises(ConfigError, match=r"mixed_precision='fp16'.*GradScaler"):
        accumfn.GradientAccumulator(scaled, STEPS)


def test_fabric_on_one_device_is_driven_exactly() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    micro = _micro(3)
    model = mlp(3).double()
    twin = copy.deepcopy(model)
    reference, ref_optimizer = fabric.setup(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2))
    for i in range(0, len(micro), STEPS):  # Fabric's own loop, one large batch per step
        x, y = (torch.cat(part) for part in zip(*micro[i : i + STEPS], strict=True))
        fabric.backward(mse(reference, x, y))
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    accumulator = accumfn.GradientAccumulator(optimizer, STEPS, max_grad_norm=None)
    for batch in micro:
        accumulator.accumulate(mse(model, *batch), model)
    assert accumulator.stats.optimizer_steps == len(micro) // STEPS
    assert max_param_diff(model, reference) < 1e-12


def test_fabric_with_a_loss_scaler_is_refused() -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    precision = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[precision])
    model = mlp(4)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match=r"Lightning Fabric's .* GradScaler"):
        accumfn.GradientAccumulator(optimizer, STEPS)


# DeepSpeed is not installed here: stand-ins of the same names and modules, as accumfn
# recognises them by type without importing deepspeed.
DeepSpeedEngine = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})
DeepSpeedZeroOptimizer = type(
    "DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"}
)


def test_deepspeed_engines_and_optimizers_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"DeepSpeed's \(DeepSpeedZeroOptimizer\)"):
        accumfn.GradientAccumulator(DeepSpeedZeroOptimizer(), STEPS)  # type: ignore[arg-type]
    engine = DeepSpeedEngine()
    engine.module = mlp(5)
    x, y = data(5, 3)
    loss = mse(engine.module, x, y)
    with pytest.raises(ConfigError, match=r"DeepSpeed's \(DeepSpeedEngine\).*accumulates by"):
        accumfn.accumulate(accumfn.init(STEPS), loss, engine)
    assert all(p.grad is None for p in engine.parameters())
